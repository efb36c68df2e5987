using System.Reflection;
using ILGPU;
using ILGPU.Backends.EntryPoints;
using ILGPU.Backends.PTX;
using ILGPU.Runtime;
using ILGPU.Runtime.CPU;
using ILGPU.Runtime.Cuda;
using NUnit.Framework;

namespace StickBreaking.ILGPU.Tests.Infrastructure;

/// <summary>
/// The one CPU accelerator, with 32-thread warps, on which every fixture runs the CUDA-only kernels' code (register
/// tiles, warp shuffles, the tensor cores' emulated mma): <see cref="CudaCodeOnCpuFixture"/>'s subclasses and the
/// tensor-core fixtures' CPU instances. Shared, so that ILGPU compiles each kernel specialization once per test run
/// (its accelerator caches compiled kernels) rather than once per fixture: that compilation, not running the
/// kernels, was most of the suite's time.
/// </summary>
/// <remarks>
/// Its context compiles at <see cref="OptimizationLevel.Debug"/>: ILGPU's IR optimizations on the large unrolled
/// tensor-core kernels took several times longer than running them at the tests' shapes. These fixtures check the
/// CUDA kernels' logic (indexing, masking, fragment layouts, the scans) against float64; the CUDA code itself is
/// compiled at the default level in the PTX tests and on a GPU, and the CPU accelerator that a user gets is tested at
/// the default level by the <see cref="BackendFixture"/> fixtures.
/// </remarks>
internal static class CudaCodeOnCpu
{
    private static readonly object Gate = new();
    private static Context? context;
    private static Accelerator? accelerator;

    /// <summary>The shared accelerator, created on first use; disposed by <see cref="SharedAcceleratorsTeardown"/>.</summary>
    public static Accelerator Accelerator
    {
        get
        {
            lock (Gate)
            {
                if (accelerator is null)
                {
                    context = Context.Create(b => b.CPU(CPUDeviceKind.Nvidia).EnableAlgorithms().Optimize(OptimizationLevel.Debug));
                    accelerator = context.GetCPUDevice(0).CreateAccelerator(context);
                }
                return accelerator;
            }
        }
    }

    internal static void Dispose()
    {
        lock (Gate)
        {
            accelerator?.Dispose();
            context?.Dispose();
            accelerator = null;
            context = null;
        }
    }
}

/// <summary>
/// The one CUDA context and PTX backend (SM_90, PTX ISA 8.8, no device needed) through which the PTX tests compile
/// kernels: ILGPU's context keeps the IR of every method it has read, so the kernels' shared helpers are read once per
/// run rather than once per test. Compiled at the default optimization level, as the library's CUDA kernels are.
/// </summary>
internal static class Ptx
{
    private static readonly object Gate = new();
    private static Context? context;
    private static PTXBackend? backend;

    /// <summary>The PTX of explicitly grouped <paramref name="kernel"/>, for <paramref name="specialization"/> (none by default).</summary>
    public static string Compile(MethodInfo kernel, KernelSpecialization? specialization = null)
    {
        lock (Gate)
        {
            if (backend is null)
            {
                context = Context.Create(b => b.Cuda().EnableAlgorithms());
                backend = new PTXBackend(context, new CudaCapabilityContext(CudaArchitecture.SM_90), CudaArchitecture.SM_90,
                    CudaInstructionSet.ISA_88, null);
            }
            var entry = EntryPointDescription.FromExplicitlyGroupedKernel(kernel);
            return ((PTXCompiledKernel)backend.Compile(entry, specialization ?? KernelSpecialization.Empty)).PTXAssembly;
        }
    }

    internal static void Dispose()
    {
        lock (Gate)
        {
            backend?.Dispose();
            context?.Dispose();
            backend = null;
            context = null;
        }
    }
}

/// <summary>Disposes the shared accelerators and the PTX compiler after the last test of the assembly.</summary>
[SetUpFixture]
public sealed class SharedAcceleratorsTeardown
{
    [OneTimeTearDown]
    public void DisposeShared()
    {
        CudaCodeOnCpu.Dispose();
        Ptx.Dispose();
    }
}
