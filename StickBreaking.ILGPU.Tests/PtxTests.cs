using System;
using System.Reflection;
using System.Text.RegularExpressions;
using ILGPU;
using ILGPU.Runtime;
using ILGPU.Runtime.Cuda;
using NUnit.Framework;
using StickBreaking.ILGPU.Tests.Infrastructure;
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
    public static readonly object[] Kernels =
    [
        new object[] { typeof(ForwardKernel), nameof(ForwardKernel.Kernel), typeof(Fp32Element) },
        new object[] { typeof(ForwardKernel), nameof(ForwardKernel.Kernel), typeof(Fp16Storage) },
        new object[] { typeof(ForwardKernel), nameof(ForwardKernel.Kernel), typeof(Bf16Storage) },
        new object[] { typeof(BackwardQueryKernel), nameof(BackwardQueryKernel.Kernel), typeof(Fp32Element) },
        new object[] { typeof(BackwardQueryKernel), nameof(BackwardQueryKernel.Kernel), typeof(Fp16Storage) },
        new object[] { typeof(BackwardQueryKernel), nameof(BackwardQueryKernel.Kernel), typeof(Bf16Storage) },
        new object[] { typeof(BackwardKeyKernel), nameof(BackwardKeyKernel.Kernel), typeof(Fp32Element) },
        new object[] { typeof(BackwardKeyKernel), nameof(BackwardKeyKernel.Kernel), typeof(Fp16Storage) },
        new object[] { typeof(BackwardKeyKernel), nameof(BackwardKeyKernel.Kernel), typeof(Bf16Storage) },
        new object[] { typeof(StickBreaking.ILGPU.Kernels.Cuda.CudaForwardKernel), nameof(StickBreaking.ILGPU.Kernels.Cuda.CudaForwardKernel.Kernel), null! },
        new object[] { typeof(StickBreaking.ILGPU.Kernels.Cuda.CudaBackwardQueryKernel), nameof(StickBreaking.ILGPU.Kernels.Cuda.CudaBackwardQueryKernel.Kernel), null! },
        new object[] { typeof(StickBreaking.ILGPU.Kernels.Cuda.CudaBackwardKeyKernel), nameof(StickBreaking.ILGPU.Kernels.Cuda.CudaBackwardKeyKernel.Kernel), null! },
    ];

    /// <summary>A kernel method, a portable one specialized for <paramref name="element"/> (its storage type follows).</summary>
    private static MethodInfo KernelMethod(Type type, string method, Type? element)
    {
        var kernel = type.GetMethod(method, BindingFlags.Public | BindingFlags.Static)!;
        return element is null ? kernel : kernel.MakeGenericMethod(element == typeof(Fp32Element) ? typeof(float) : typeof(ushort), element);
    }

    [TestCaseSource(nameof(Kernels))]
    public void KernelUsesNoLocalMemory(Type type, string method, Type? element)
    {
        string ptx = CompileForSm90(KernelMethod(type, method, element));
        if (Environment.GetEnvironmentVariable("STICKBREAKING_PTX_DIR") is { Length: > 0 } dir)
            System.IO.File.WriteAllText(System.IO.Path.Combine(dir, $"{type.Name}.{element?.Name ?? "fp32"}.ptx"), ptx);
        Assert.That(ptx, Does.Contain(".entry"), "the PTX holds the kernel");
        var local = Regex.Matches(ptx, @"\.local\b");
        Assert.That(local, Is.Empty, $"{type.Name} uses local memory:\n" + string.Join("\n", Regex.Matches(ptx, @".*\.local.*")));
    }

    /// <summary>
    /// One body, specialized per storage: the fp32 instantiation of a portable kernel touches no 16-bit memory; the
    /// fp16 and bf16 ones load q, k, v (and dO) as 16-bit words and store their outputs as 16-bit words, with the
    /// conversions inlined (no calls). The 16-bit store count includes the OpenCL scratch path's own store, which the
    /// PTX keeps behind a comparison of two constants for ptxas to fold (see OutputAccumulator). The fp32 instantiation's
    /// instructions are those of the kernels before they became generic, bar two loads of the (unused) scratch view's
    /// parameter (compared by hand when the change was made).
    /// </summary>
    [TestCase(typeof(ForwardKernel), 3, 2)]
    [TestCase(typeof(BackwardQueryKernel), 5, 1)]
    [TestCase(typeof(BackwardKeyKernel), 6, 4)]
    public void PortableKernelsConvertStorageInline(Type kernel, int loads16, int stores16)
    {
        foreach (var element in new[] { typeof(Fp32Element), typeof(Fp16Storage), typeof(Bf16Storage) })
        {
            string ptx = CompileForSm90(KernelMethod(kernel, "Kernel", element));
            int loads = Regex.Matches(ptx, @"\bld\.[a-z.]*b16\b").Count;
            int stores = Regex.Matches(ptx, @"\bst\.[a-z.]*b16\b").Count;
            int calls = Regex.Matches(ptx, @"\bcall\b").Count;
            TestContext.Out.WriteLine($"{kernel.Name}<{element.Name}>: ld.b16 {loads}, st.b16 {stores}, calls {calls}");
            bool wide = element == typeof(Fp32Element);
            Assert.Multiple(() =>
            {
                Assert.That(loads, Is.EqualTo(wide ? 0 : loads16), $"{element.Name}: 16-bit loads");
                Assert.That(stores, Is.EqualTo(wide ? 0 : stores16), $"{element.Name}: 16-bit stores");
                Assert.That(calls, Is.Zero, $"{element.Name}: conversions inlined");
            });
        }
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
    /// each of dk and dv in pass 2, outside the hot loops) read the same 12 vectors as the others; pass 1 compiles
    /// its masked step twice (one copy per visibility, so that the band's bounds are constants), which adds 11
    /// vector loads (the PTX shares one between the copies).
    /// </summary>
    [TestCase(typeof(StickBreaking.ILGPU.Kernels.Cuda.CudaBackwardQueryKernel), 2 * 2 * 2 + 3 * 12 + 4 - 1, 4 + 4)]
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

    /// <summary>
    /// The tensor-core forward, specialized for each storage type: the mma is the inline PTX instruction of that
    /// type only (the storage branch folds away). Per tile a warp issues 16 mma per 32 head dimensions for S (64, 32 of
    /// them under the D = 128 branch) and 64 for P V (16 output n-tiles x 4 k-steps, 32 of them under the D = 128
    /// branch): 128 in the code; 128 for P V when the weights are split into two 16-bit parts. Every fragment is a
    /// 16-byte shared load: 2 of Q and 8 of K per 32 head dimensions, 32 of V. Each plan (staging, groups per SM) is
    /// its own specialization; the cases are the library's mma plan (the other plans, kept for TimingOnCuda, share this code).
    /// <para>
    /// Local memory: ILGPU passes each operand of inline PTX through a 4-byte <c>.local</c> slot (stored before
    /// and loaded after the instruction), 10 per mma and 1 per <c>cvt.rn</c> pair conversion, <c>ex2</c> or <c>rcp</c>. ptxas kept all 848 of
    /// them in memory here (a 3392-byte stack per thread on the H200), so the loader rewrites them into registers
    /// (<see cref="StickBreaking.ILGPU.Launch.PtxOperandSlots"/>). The check: every local declaration is such a
    /// 4-byte slot, 10 per mma and 1 per conversion, nothing else (no array of registers spilled by ILGPU), and
    /// after the rewrite no local memory is left. The emulation of the mma for other accelerators sits behind
    /// <c>CudaAsm.IsSupported</c>, which the PTX compares as two constants (<c>setp.ne.s32 %p, 1, 1</c>) for
    /// ptxas to fold away.
    /// </para>
    /// </summary>
    [TestCase(typeof(StickBreaking.ILGPU.Kernels.Common.Bf16Storage), "bf16.bf16", "f16.f16", false, typeof(StickBreaking.ILGPU.Kernels.TensorCore.ThreeGroupsPerSmNoPrefetch))]
    [TestCase(typeof(StickBreaking.ILGPU.Kernels.Common.Fp16Storage), "f16.f16", "bf16.bf16", false, typeof(StickBreaking.ILGPU.Kernels.TensorCore.ThreeGroupsPerSmNoPrefetch))]
    [TestCase(typeof(StickBreaking.ILGPU.Kernels.Common.Bf16Storage), "bf16.bf16", "f16.f16", true, typeof(StickBreaking.ILGPU.Kernels.TensorCore.ThreeGroupsPerSmNoPrefetch))]
    [TestCase(typeof(StickBreaking.ILGPU.Kernels.Common.Fp16Storage), "f16.f16", "bf16.bf16", true, typeof(StickBreaking.ILGPU.Kernels.TensorCore.ThreeGroupsPerSmNoPrefetch))]
    public void TensorCoreForwardUsesMmaAndOnlyOperandSlots(Type storage, string type, string otherType, bool split, Type plan)
    {
        string ptx = CompileForSm90(TensorCoreForward(storage, split, plan));
        bool promotes = StickBreaking.ILGPU.Launch.PtxOperandSlots.TryPromote(ptx, out string promoted);
        if (Environment.GetEnvironmentVariable("STICKBREAKING_PTX_DIR") is { Length: > 0 } dir)
        {
            // As the loader hands it to the driver: the operand slots as registers.
            System.IO.File.WriteAllText(System.IO.Path.Combine(dir, $"TensorCoreForward.{storage.Name}.{(split ? "Split" : "Rounded")}.{plan.Name}.ptx"), promoted);
        }
        int Count(string pattern) => Regex.Matches(ptx, pattern).Count;
        int mma = Count(@"mma\.sync\.aligned\.m16n8k16\.row\.col\.f32\." + Regex.Escape(type) + @"\.f32");
        int slots = Count(@"\.local \.align 4 \.b8 __local_depot\d+\[4\];");
        int localDeclarations = Count(@"\.local \.align");
        int vectorLoads = Count(@"ld\.shared\.v4\.b32");
        int packs = Count(@"cvt\.rn\." + (type == "bf16.bf16" ? "bf16x2" : "f16x2") + @"\.f32");
        int approx = Count(@"(?:ex2|rcp)\.approx\.ftz\.f32");
        TestContext.Out.WriteLine($"{storage.Name}: mma.sync {mma}, 16-bit pair conversions {packs}, 4-byte local slots {slots} of {localDeclarations} local declarations, " +
            $"ld.shared.v4.b32 {vectorLoads}, st.shared.v4.b32 {Count(@"st\.shared\.v4\.b32")}, ld.v4.b32 (global) {Count(@"ld\.v4\.b32")}, " +
            $"shfl {Count(@"shfl\.")}, ex2 {Count(@"ex2\.approx")}, lines {ptx.Split('\n').Length}");
        Assert.Multiple(() =>
        {
            Assert.That(mma, Is.EqualTo(64 + (split ? 128 : 64)), "mma.sync of the storage type");
            Assert.That(ptx, Does.Not.Contain("." + otherType + "."), "no mma of the other type");
            Assert.That(localDeclarations, Is.EqualTo(slots), "every local declaration is a 4-byte operand slot");
            Assert.That(packs, Is.EqualTo((split ? 32 : 16) + 2 * 16), "pair conversions: 16 A fragments of P (and 16 of its residuals), 2 rows x 16 n-tiles of o");
            Assert.That(approx, Is.EqualTo(2 * 3 * 32), "per score ex2 twice (2^-|z|, the weight) and rcp once, 32 scores per thread, in the masked (diagonal) and the unmasked code");
            Assert.That(slots, Is.EqualTo(10 * mma + packs + approx), "10 operand slots per mma, 1 per conversion, ex2 and rcp, nothing else");
            Assert.That(vectorLoads, Is.EqualTo(4 * (2 + 8) + 32), "16-byte fragment loads: Q 2 and K 8 per 32 head dimensions, V 32");
            Assert.That(promotes, Is.True, "the loader's rewrite applies (PtxOperandSlots)");
            Assert.That(Regex.Matches(promoted, @"\.local\b|__local_depot"), Is.Empty, "no local memory once the slots are registers");
            Assert.That(Regex.Matches(promoted, @"mma\.sync").Count, Is.EqualTo(mma), "the rewrite keeps every mma");
        });
    }

    /// <summary>
    /// The forward's Hopper plan (<see cref="StickBreaking.ILGPU.Kernels.TensorCore.WgmmaPlan"/>), as the loader hands it
    /// to the driver (operand slots promoted, retargeted to sm_90a): S issued as one block of 8 (D = 128) or 4 (D = 64)
    /// m64n64 wgmma of the storage type and taken by a wait; P V as one block per tile of 4 wgmma (one per k-step;
    /// m64n128 at D = 128, m64n64 at D = 64; twice that with split weights), waited for; O taken once after the loop (two
    /// waits, one per half of D); every wgmma accumulating into the plan's own registers (sbS, sbO), which no ILGPU
    /// register copy touches; the shared-memory stores fenced for the async proxy; no local memory.
    /// </summary>
    [TestCase(typeof(StickBreaking.ILGPU.Kernels.Common.Bf16Storage), "bf16.bf16", true, typeof(StickBreaking.ILGPU.Kernels.TensorCore.WgmmaPlan))]
    [TestCase(typeof(StickBreaking.ILGPU.Kernels.Common.Bf16Storage), "bf16.bf16", false, typeof(StickBreaking.ILGPU.Kernels.TensorCore.WgmmaTwoWarpgroupsPlan))]
    [TestCase(typeof(StickBreaking.ILGPU.Kernels.Common.Bf16Storage), "bf16.bf16", false, typeof(StickBreaking.ILGPU.Kernels.TensorCore.WgmmaPlan))]
    public void TensorCoreForwardWgmmaPlanPtx(Type storage, string type, bool split, Type plan)
    {
        string ptx = CompileForSm90(TensorCoreForward(storage, split, plan));
        Assert.That(StickBreaking.ILGPU.Launch.PtxOperandSlots.TryPromote(ptx, out string promoted), Is.True, "the loader's rewrite applies");
        promoted = StickBreaking.ILGPU.Launch.PtxTarget.Hopper(promoted);
        if (Environment.GetEnvironmentVariable("STICKBREAKING_PTX_DIR") is { Length: > 0 } dir)
            System.IO.File.WriteAllText(System.IO.Path.Combine(dir, $"TensorCoreForward.{storage.Name}.{(split ? "Split" : "Rounded")}.{plan.Name}.ptx"), promoted);

        int Count(string pattern) => Regex.Matches(promoted, pattern).Count;
        int wgmma = Count(@"wgmma\.mma_async\.sync\.aligned\.m64n(?:64|128)k16\.f32\." + Regex.Escape(type) + @" ");
        int blocks = Count(@"wgmma\.fence\.sync\.aligned");
        int waits = Count(@"wgmma\.wait_group\.sync\.aligned 0");
        var accumulators = Regex.Matches(promoted, @"wgmma\.mma_async\.sync\.aligned\.\S+ \{([^}]*)\}");
        TestContext.Out.WriteLine($"{storage.Name} {(split ? "split" : "rounded")}: wgmma {wgmma} in {blocks} blocks, waits {waits}, " +
            $"proxy fences {Count(@"fence\.proxy\.async\.shared::cta")}, lines {promoted.Split('\n').Length}");
        int perOutputBlock = split ? 8 : 4;           // one wgmma per k-step, per weight part
        Assert.Multiple(() =>
        {
            // Each product has a D = 128 and a D = 64 site (D is a run-time argument).
            Assert.That(wgmma, Is.EqualTo(8 + 4 + 2 * perOutputBlock), "S: 8 + 4 wgmma; P V: 4 k-steps per weight part, per site");
            Assert.That(blocks, Is.EqualTo(2 + 2), "one fence per block");
            Assert.That(waits, Is.EqualTo(1 + 2 + 2), "S taken, P V waited for, O taken in two halves");
            Assert.That(Count(@"cp\.async\.cg\.shared\.global"), Is.EqualTo(2 * (8 + 4)), "the next tile's K and V pieces by cp.async: one block each at D = 128 (8 pieces) and 64 (4)");
            Assert.That(Count(@"cp\.async\.wait_group 0"), Is.EqualTo(1), "waited for once a tile");
            Assert.That(accumulators.Count, Is.EqualTo(wgmma));
            foreach (Match m in accumulators)
                Assert.That(m.Groups[1].Value, Does.Match(@"^(?:sbS\d+,){31}sbS\d+$|^(?:sbO\d+,){31,63}sbO\d+$"), "accumulators only in the plan's registers");
            Assert.That(Count(@"fence\.proxy\.async\.shared::cta"), Is.GreaterThanOrEqualTo(2), "stores fenced for the tensor cores (first and next tiles)");
            Assert.That(promoted, Does.Contain("\n.target sm_90a\n"), "retargeted to sm_90a");
            Assert.That(Regex.Matches(promoted, @"\.local\b|__local_depot"), Is.Empty, "no local memory once the slots are registers");
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

    private static string CompileForSm90(MethodInfo kernel) => Ptx.Compile(kernel);

    /// <summary>The tensor-core forward's specialization for a storage type, rounded or split weights, and a plan.</summary>
    private static MethodInfo TensorCoreForward(Type storage, bool split, Type plan) =>
        typeof(StickBreaking.ILGPU.Kernels.TensorCore.TensorCoreForwardKernel)
            .GetMethod(nameof(StickBreaking.ILGPU.Kernels.TensorCore.TensorCoreForwardKernel.Kernel), BindingFlags.Public | BindingFlags.Static)!
            .MakeGenericMethod(storage, split ? typeof(StickBreaking.ILGPU.Kernels.TensorCore.SplitWeights)
                : typeof(StickBreaking.ILGPU.Kernels.TensorCore.RoundedWeights), plan);
}
