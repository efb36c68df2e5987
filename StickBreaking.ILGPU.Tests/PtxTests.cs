using System;
using System.Reflection;
using System.Text.RegularExpressions;
using ILGPU;
using ILGPU.Backends.EntryPoints;
using ILGPU.Backends.PTX;
using ILGPU.Runtime;
using ILGPU.Runtime.Cuda;
using NUnit.Framework;
using StickBreaking.ILGPU.Kernels.Common;
using StickBreaking.ILGPU.Kernels.Portable;

namespace StickBreaking.ILGPU.Tests;

/// <summary>
/// Compiles the CUDA kernels to PTX for SM_90 without a GPU (ILGPU's PTX backend runs anywhere), so that CI
/// holds what a machine with an NVIDIA GPU measures: the hot kernels keep everything in registers and shared memory (no
/// <c>.local</c> state space, the spills of ILGPU's non-unrolled arrays).
/// </summary>
[TestFixture]
public sealed class PtxTests
{
    private Context context = null!;

    [OneTimeSetUp]
    public void CreateContext() => context = Context.Create(b => b.Cuda().EnableAlgorithms());

    [OneTimeTearDown]
    public void DisposeContext() => context.Dispose();

    public static readonly object[] Kernels =
    [
        new object[] { typeof(ForwardKernel), nameof(ForwardKernel.Kernel) },
        new object[] { typeof(BackwardQueryKernel), nameof(BackwardQueryKernel.Kernel) },
        new object[] { typeof(BackwardKeyKernel), nameof(BackwardKeyKernel.Kernel) },
        new object[] { typeof(StickBreaking.ILGPU.Kernels.Cuda.CudaForwardKernel), nameof(StickBreaking.ILGPU.Kernels.Cuda.CudaForwardKernel.Kernel) },
        new object[] { typeof(StickBreaking.ILGPU.Kernels.Cuda.CudaBackwardQueryKernel), nameof(StickBreaking.ILGPU.Kernels.Cuda.CudaBackwardQueryKernel.Kernel) },
        new object[] { typeof(StickBreaking.ILGPU.Kernels.Cuda.CudaBackwardKeyKernel), nameof(StickBreaking.ILGPU.Kernels.Cuda.CudaBackwardKeyKernel.Kernel) },
    ];

    [TestCaseSource(nameof(Kernels))]
    public void KernelUsesNoLocalMemory(Type type, string method)
    {
        string ptx = CompileForSm90(type.GetMethod(method, BindingFlags.Public | BindingFlags.Static)!);
        Assert.That(ptx, Does.Contain(".entry"), "the PTX holds the kernel");
        var local = Regex.Matches(ptx, @"\.local\b");
        Assert.That(local, Is.Empty, $"{type.Name} uses local memory:\n" + string.Join("\n", Regex.Matches(ptx, @".*\.local.*")));
    }

    /// <summary>
    /// The CUDA forward was bound by shared-memory bandwidth until its inner loops read 16-byte vectors: its q.k
    /// and A v steps must stay ld.shared.v4 (scalar shared loads only for the 16 segment sums of the scan). The
    /// diagonal tile's masked A v step (once per tile, outside the hot loop) reads vectors too.
    /// </summary>
    [Test]
    public void CudaForwardReadsSharedMemoryInVectors()
    {
        string ptx = CompileForSm90(typeof(StickBreaking.ILGPU.Kernels.Cuda.CudaForwardKernel)
            .GetMethod(nameof(StickBreaking.ILGPU.Kernels.Cuda.CudaForwardKernel.Kernel), BindingFlags.Public | BindingFlags.Static)!);
        int vector = Regex.Matches(ptx, @"ld\.shared\.v4\.f32").Count;
        int scalar = Regex.Matches(ptx, @"ld\.shared\.f32").Count;
        TestContext.Out.WriteLine($"ld.shared.v4.f32: {vector}, ld.shared.f32: {scalar}");
        Assert.Multiple(() =>
        {
            Assert.That(vector, Is.EqualTo(4 * 2 + 2 * 3 + 3), "4 q.k steps of 2 vector loads, 2 A v steps of 3 and the diagonal's masked one");
            Assert.That(scalar, Is.LessThanOrEqualTo(4), "scalar loads: the segment sums of the 4 rows only");
        });
    }

    /// <summary>
    /// The CUDA backward passes read every matrix-product operand as 16-byte vectors: 2 per step of S = q.k and
    /// G = dO.v (2 steps per loop iteration each), and per step of dq, dk or dv 4 vectors of dz or A plus 8 of
    /// the other operand. Pass 1 also parks G and writes dz as vectors (4 each, plus 4 reads of G back); scalar
    /// shared loads are left to staged per-row values. The diagonal tile's masked steps (one of dq in pass 1, one
    /// each of dk and dv in pass 2, outside the hot loops) read the same 12 vectors as the others.
    /// </summary>
    [TestCase(typeof(StickBreaking.ILGPU.Kernels.Cuda.CudaBackwardQueryKernel), 2 * 2 * 2 + 2 * 12 + 4, 4 + 4)]
    [TestCase(typeof(StickBreaking.ILGPU.Kernels.Cuda.CudaBackwardKeyKernel), 2 * 2 * 2 + 4 * 12, 0)]
    public void CudaBackwardReadsSharedMemoryInVectors(Type kernel, int vectorLoads, int vectorStores)
    {
        string ptx = CompileForSm90(kernel.GetMethod("Kernel", BindingFlags.Public | BindingFlags.Static)!);
        int vector = Regex.Matches(ptx, @"ld\.shared\.v4\.f32").Count;
        int stores = Regex.Matches(ptx, @"st\.shared\.v4\.f32").Count;
        int scalar = Regex.Matches(ptx, @"ld\.shared\.f32").Count;
        TestContext.Out.WriteLine($"{kernel.Name}: ld.shared.v4.f32: {vector}, st.shared.v4.f32: {stores}, ld.shared.f32: {scalar}");
        Assert.Multiple(() =>
        {
            Assert.That(vector, Is.EqualTo(vectorLoads), "vector loads of the matrix products");
            Assert.That(stores, Is.EqualTo(vectorStores), "vector stores of G and dz (pass 1)");
        });
    }

    /// <summary>The check itself: a kernel with a dynamically indexed local array does show <c>.local</c>.</summary>
    [Test]
    public void CheckSeesLocalMemoryWhereThereIsSome()
    {
        string ptx = CompileForSm90(typeof(PtxTests).GetMethod(nameof(SpillingKernel), BindingFlags.NonPublic | BindingFlags.Static)!);
        Assert.That(Regex.Matches(ptx, @"\.local\b"), Is.Not.Empty);
    }

    private static void SpillingKernel(ArrayView<float> x)
    {
        var scratch = LocalMemory.Allocate<float>(64);
        for (int i = 0; i < 64; i++)
            scratch[(i * 7 + global::ILGPU.Group.IdxX) % 64] = x[i];
        x[global::ILGPU.Group.IdxX] = scratch[global::ILGPU.Group.IdxX % 64];
    }

    private string CompileForSm90(MethodInfo kernel)
    {
        var backend = new PTXBackend(context, new CudaCapabilityContext(CudaArchitecture.SM_90),
            CudaArchitecture.SM_90, CudaInstructionSet.ISA_88, null);
        var entry = EntryPointDescription.FromExplicitlyGroupedKernel(kernel);
        var compiled = (PTXCompiledKernel)backend.Compile(entry, KernelSpecialization.Empty);
        return compiled.PTXAssembly;
    }
}
