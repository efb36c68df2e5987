using System.Linq;
using NUnit.Framework;
using StickBreaking.ILGPU.Tests.Infrastructure;

namespace StickBreaking.ILGPU.Tests;

/// <summary>
/// One test per backend, saying whether its fixtures run here. An absent backend generates no fixture
/// (<see cref="Backends.Tested"/>); this test is its one trace in the output: skipped, with the reason
/// (absent, or not selected by STICKBREAKING_BACKENDS). A required backend (STICKBREAKING_REQUIRE) that is
/// absent fails here as well as in every one of its fixtures.
/// </summary>
[TestFixture]
public sealed class BackendAvailabilityTests
{
    [TestCaseSource(typeof(Backends), nameof(Backends.All))]
    public void Backend(string backend)
    {
        var leftOut = Backends.LeftOut.Where(l => l.Backend == backend).Select(l => l.Reason).FirstOrDefault();
        if (leftOut is not null)
            Assert.Ignore($"{backend} not tested here: {leftOut}");
        if (Backends.Required.Contains(backend))
        {
            var (context, accelerator, reason) = Backends.Open(backend);
            using (context)
            using (accelerator)
                Assert.That(accelerator, Is.Not.Null, $"{backend} is required (STICKBREAKING_REQUIRE) but absent: {reason}");
        }
        Assert.Pass($"{backend} is tested here");
    }
}
