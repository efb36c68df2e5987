using System;
using ILGPU;
using ILGPU.Runtime;
using NUnit.Framework;

namespace StickBreaking.ILGPU.Tests.Infrastructure;

/// <summary>
/// Base of every per-backend fixture: NUnit instantiates it once per backend in <see cref="Backends.Tested"/>
/// (the backends present here, and the required ones). An absent backend has no fixture: one skipped test
/// per backend says so, with the reason (<see cref="BackendAvailabilityTests"/>). A required one that is
/// absent or not selected fails every test of its fixtures.
/// </summary>
[TestFixtureSource(typeof(Backends), nameof(Backends.Tested))]
public abstract class BackendFixture
{
    private Context? context;
    private Accelerator? accelerator;
    private StickBreakingAttention? attention;

    protected BackendFixture(string backend) => Backend = backend;

    protected string Backend { get; }

    protected Accelerator Accelerator => accelerator ?? throw new InvalidOperationException("fixture not set up");

    protected StickBreakingAttention Attention => attention ?? throw new InvalidOperationException("fixture not set up");

    /// <summary>Max abs error allowed on o and rem against float64, per backend (fp32 kernels).</summary>
    protected double ForwardTolerance => Backend switch
    {
        Backends.Cuda => 2e-5,   // ex2/lg2.approx: about 2e-7 relative each
        _ => 2e-5,
    };

    /// <summary>Relative RMS error allowed on dq, dk, dv against float64, per backend.</summary>
    protected double GradientTolerance => Backend switch
    {
        Backends.Cuda => 2e-5,
        _ => 2e-5,
    };

    [OneTimeSetUp]
    public void OpenBackend()
    {
        if (Backends.Selected is { } selected && !selected.Contains(Backend))
        {
            if (Backends.Required.Contains(Backend))
                Assert.Fail($"{Backend} is required (STICKBREAKING_REQUIRE) but not selected by STICKBREAKING_BACKENDS.");
            Assert.Ignore($"{Backend} not selected by STICKBREAKING_BACKENDS={Environment.GetEnvironmentVariable("STICKBREAKING_BACKENDS")}");
        }
        var (ctx, acc, reason) = Backends.Open(Backend);
        if (acc is null)
        {
            if (Backends.Required.Contains(Backend))
                Assert.Fail($"{Backend} is required (STICKBREAKING_REQUIRE) but absent: {reason}");
            Assert.Ignore($"{Backend} absent: {reason}");
        }
        context = ctx;
        accelerator = acc;
        attention = new StickBreakingAttention(acc);
        TestContext.Progress.WriteLine($"[{Backend}] {acc.Name}: group size {attention.GroupSize}, " +
            $"{acc.MaxSharedMemoryPerGroup} B shared/group, warp {acc.WarpSize}");
    }

    [OneTimeTearDown]
    public void CloseBackend()
    {
        attention?.Dispose();
        accelerator?.Dispose();
        context?.Dispose();
    }
}
