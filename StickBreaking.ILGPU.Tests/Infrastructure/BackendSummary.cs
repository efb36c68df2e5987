using NUnit.Framework;
using StickBreaking.ILGPU.Tests.Infrastructure;

namespace StickBreaking.ILGPU.Tests;

/// <summary>
/// Says once, at the start of a run, which backends are tested and why each other one is not (absent, or
/// not selected by STICKBREAKING_BACKENDS). Absent backends generate no tests (<see cref="Backends.Tested"/>),
/// so this line is the only trace they leave in the output.
/// </summary>
[SetUpFixture]
public sealed class BackendSummary
{
    [OneTimeSetUp]
    public void Report()
    {
        TestContext.Progress.WriteLine($"backends tested: {(Backends.Tested.Length == 0 ? "none" : string.Join(", ", Backends.Tested))}");
        foreach (var (backend, reason) in Backends.LeftOut)
            TestContext.Progress.WriteLine($"backend {backend} not tested: {reason}");
    }
}
