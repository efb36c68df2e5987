using System;
using ILGPU;
using ILGPU.Runtime;
using NUnit.Framework;
using StickBreaking.ILGPU.Launch;

namespace StickBreaking.ILGPU.Tests.Infrastructure;

/// <summary>
/// One fixture per backend for the tensor-core kernels' own tests, launched through the library's
/// <see cref="KernelLauncher"/>: CUDA runs the mma instruction, the CPU accelerator its emulation; OpenCL is skipped
/// (no warp shuffles), as is a backend that STICKBREAKING_BACKENDS leaves out or that is absent (a failure if
/// STICKBREAKING_REQUIRE names it).
/// </summary>
[TestFixtureSource(typeof(Backends), nameof(Backends.All))]
public abstract class TensorCoreFixture(string backend, string kernels)
{
    private Context? context;
    private Accelerator? accelerator;
    private KernelLauncher? launcher;

    protected string Backend => backend;

    protected Accelerator Accelerator => accelerator ?? throw new InvalidOperationException("fixture not set up");

    private protected KernelLauncher Launcher => launcher ?? throw new InvalidOperationException("fixture not set up");

    [OneTimeSetUp]
    public void Open()
    {
        if (backend == Backends.OpenCL)
            Assert.Ignore($"{kernels} needs warp shuffles (CUDA, or the CPU accelerator's emulation)");
        if (Backends.Selected is { } selected && !selected.Contains(backend))
            Assert.Ignore($"{backend} not selected by STICKBREAKING_BACKENDS");
        if (backend == Backends.Cpu)
        {
            accelerator = CudaCodeOnCpu.Accelerator;   // shared, not disposed here
            launcher = new KernelLauncher(accelerator, sharedMemoryLimit: null);
            return;
        }
        var (ctx, acc, reason) = Backends.Open(backend);
        if (acc is null)
        {
            if (Backends.Required.Contains(backend))
                Assert.Fail($"{backend} is required (STICKBREAKING_REQUIRE) but absent: {reason}");
            Assert.Ignore($"{backend} absent: {reason}");
        }
        context = ctx;
        accelerator = acc;
        launcher = new KernelLauncher(acc, sharedMemoryLimit: null);
    }

    [OneTimeTearDown]
    public void Close()
    {
        if (context is null)
            return;   // the shared CPU accelerator
        accelerator?.Dispose();
        context.Dispose();
    }
}
