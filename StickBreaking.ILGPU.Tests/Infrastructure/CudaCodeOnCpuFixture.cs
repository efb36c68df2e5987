using System;
using ILGPU;
using ILGPU.Runtime;
using ILGPU.Runtime.CPU;
using NUnit.Framework;
using StickBreaking.ILGPU.Launch;

namespace StickBreaking.ILGPU.Tests.Infrastructure;

/// <summary>
/// Base of the fixtures that run the CUDA-only kernels' code (register tiles, warp shuffles, the tensor cores'
/// emulated mma) on ILGPU's CPU accelerator with 32-thread warps (<see cref="CPUDeviceKind.Nvidia"/>), the kernels
/// forced to the CUDA family, so that CI checks that code without a GPU.
/// </summary>
public abstract class CudaCodeOnCpuFixture
{
    private StickBreakingAttention? attention;

    /// <summary>The CPU accelerator with 32-thread warps, shared by these fixtures (<see cref="CudaCodeOnCpu"/>).</summary>
    protected static Accelerator Accelerator => CudaCodeOnCpu.Accelerator;

    /// <summary>An instance that runs the CUDA kernels' code on it.</summary>
    protected StickBreakingAttention Attention => attention ?? throw new InvalidOperationException("fixture not set up");

    [OneTimeSetUp]
    public void OpenCudaCodeOnCpu()
    {
        attention = new StickBreakingAttention(Accelerator, null, KernelChoice.Cuda);
    }

    [OneTimeTearDown]
    public void CloseCudaCodeOnCpu()
    {
        attention?.Dispose();
    }
}
