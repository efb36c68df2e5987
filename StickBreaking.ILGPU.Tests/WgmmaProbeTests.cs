using System;
using System.Linq;
using ILGPU;
using ILGPU.Runtime;
using ILGPU.Runtime.Cuda;
using NUnit.Framework;
using StickBreaking.ILGPU.Kernels.TensorCore;
using StickBreaking.ILGPU.Launch;
using StickBreaking.ILGPU.Tests.Infrastructure;

namespace StickBreaking.ILGPU.Tests;

/// <summary>Arguments of <see cref="WgmmaProbeTests.Probe"/>.</summary>
internal struct WgmmaProbeArgs
{
    /// <summary>A, 64 x 16 bf16 row-major: row m is words 8m .. 8m+7, k = 2w (low half) and 2w + 1.</summary>
    public ArrayView<uint> A;
    /// <summary>B as 64 rows n of 16 bf16 (k contiguous): piece 2n + h holds k = 8h .. 8h+7.</summary>
    public ArrayView<U4> B;
    /// <summary>C = A B^T, 64 x 64 fp32 row-major.</summary>
    public ArrayView<float> C;
    /// <summary>The shared-memory descriptor of B without its start address: low word (leading byte offset / 16 at bit
    /// 16), high word (stride byte offset / 16 at bit 0, the layout in bits 30-31).</summary>
    public uint DescriptorLow, DescriptorHigh;
    /// <summary>
    /// 0: B K-major as above (as K in S = Q K^T). 1: B given MN-major, 16 rows k of 64 n (as V in P V): piece 8k + j holds
    /// n = 8j .. 8j+7 of row k, core matrix (n / 8, k / 8) holds rows k of those 8 n; the wgmma's trans-b is 1.
    /// </summary>
    public int NMajor;
}

/// <summary>
/// PROBE (not library code): whether Hopper's <c>wgmma</c> runs from ILGPU, and with which descriptor offsets (the facts the forward's <see cref="WgmmaPlan"/> builds on). One
/// warpgroup (128 threads) computes C = A B^T (64 x 64 x 16, bf16 in, fp32 out) with one
/// <c>wgmma.mma_async.m64n64k16</c>: A from registers (each warp's 16 rows as mma.m16n8k16's A fragment), B from
/// dynamic shared memory through a descriptor (no swizzle: 8 x 16-byte core matrices, core matrix (n / 8, k / 8) at
/// byte 256 (n / 8) + 128 (k / 8)), the PTX retargeted to sm_90a (<see cref="PtxTarget"/>); B once K-major (as K in
/// S = Q K^T) and once N-major with trans-b (as V in P V). For each it tries both readings of the descriptor's two
/// offsets (128 and 256 bytes) and passes when one gives the exact product; it prints which.
/// CUDA on an SM 9.0 device only.
/// </summary>
public sealed class WgmmaProbeTests(string backend) : BackendFixture(backend)
{
    internal static void Probe(WgmmaProbeArgs a)
    {
        int tid = Group.IdxX;
        int warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
        var shared = SharedMemory.GetDynamic<U4>();
        if (a.NMajor == 0)
        {
            int n = tid >> 1, half = tid & 1;
            shared[(256 * (n >> 3) + 128 * half + 16 * (n & 7)) / 16] = a.B[2 * n + half];
        }
        else
        {
            int k = tid >> 3, j = tid & 7;
            shared[(256 * j + 128 * (k >> 3) + 16 * (k & 7)) / 16] = a.B[8 * k + j];
        }
        if (!CudaAsm.IsSupported)
            return;
        CudaAsm.Emit("fence.proxy.async.shared::cta;");
        Group.Barrier();
        int row = 16 * warp + g;
        Input<uint> a0 = a.A[8 * row + t], a1 = a.A[8 * (row + 8) + t], a2 = a.A[8 * row + 4 + t], a3 = a.A[8 * (row + 8) + 4 + t];
        Ref<uint> sharedBase = 0u;
        CudaAsm.EmitRef("mov.u32 %0, __dyn_shared_alloca;", ref sharedBase);
        Input<uint> low = ((sharedBase.Value & 0x3FFFFu) >> 4) | a.DescriptorLow, high = a.DescriptorHigh, zero = 0u;
        Ref<float> d0 = 0f, d1 = 0f, d2 = 0f, d3 = 0f, d4 = 0f, d5 = 0f, d6 = 0f, d7 = 0f;
        Ref<float> d8 = 0f, d9 = 0f, d10 = 0f, d11 = 0f, d12 = 0f, d13 = 0f, d14 = 0f, d15 = 0f;
        Ref<float> d16 = 0f, d17 = 0f, d18 = 0f, d19 = 0f, d20 = 0f, d21 = 0f, d22 = 0f, d23 = 0f;
        Ref<float> d24 = 0f, d25 = 0f, d26 = 0f, d27 = 0f, d28 = 0f, d29 = 0f, d30 = 0f, d31 = 0f;
        if (a.NMajor == 0)
        {
            CudaAsm.EmitRef(
                "{ .reg .b64 sbDesc; .reg .pred sbScale; mov.b64 sbDesc, {%36, %37}; setp.ne.b32 sbScale, %38, 0; " +
                "wgmma.fence.sync.aligned; " +
                "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, {%32,%33,%34,%35}, sbDesc, sbScale, 1, 1, 0; " +
                "wgmma.commit_group.sync.aligned; wgmma.wait_group.sync.aligned 0; }",
                ref d0, ref d1, ref d2, ref d3, ref d4, ref d5, ref d6, ref d7, ref d8, ref d9, ref d10, ref d11, ref d12, ref d13, ref d14, ref d15, ref d16, ref d17, ref d18, ref d19, ref d20, ref d21, ref d22, ref d23, ref d24, ref d25, ref d26, ref d27, ref d28, ref d29, ref d30, ref d31, ref a0, ref a1, ref a2, ref a3, ref low, ref high, ref zero);
        }
        else
        {
            CudaAsm.EmitRef(
                "{ .reg .b64 sbDesc; .reg .pred sbScale; mov.b64 sbDesc, {%36, %37}; setp.ne.b32 sbScale, %38, 0; " +
                "wgmma.fence.sync.aligned; " +
                "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, {%32,%33,%34,%35}, sbDesc, sbScale, 1, 1, 1; " +
                "wgmma.commit_group.sync.aligned; wgmma.wait_group.sync.aligned 0; }",
                ref d0, ref d1, ref d2, ref d3, ref d4, ref d5, ref d6, ref d7, ref d8, ref d9, ref d10, ref d11, ref d12, ref d13, ref d14, ref d15, ref d16, ref d17, ref d18, ref d19, ref d20, ref d21, ref d22, ref d23, ref d24, ref d25, ref d26, ref d27, ref d28, ref d29, ref d30, ref d31, ref a0, ref a1, ref a2, ref a3, ref low, ref high, ref zero);
        }
        var c = a.C;
        int top = 64 * row + 2 * t, bottom = top + 8 * 64;
        c[top + 0] = d0.Value;
        c[top + 1] = d1.Value;
        c[bottom + 0] = d2.Value;
        c[bottom + 1] = d3.Value;
        c[top + 8] = d4.Value;
        c[top + 9] = d5.Value;
        c[bottom + 8] = d6.Value;
        c[bottom + 9] = d7.Value;
        c[top + 16] = d8.Value;
        c[top + 17] = d9.Value;
        c[bottom + 16] = d10.Value;
        c[bottom + 17] = d11.Value;
        c[top + 24] = d12.Value;
        c[top + 25] = d13.Value;
        c[bottom + 24] = d14.Value;
        c[bottom + 25] = d15.Value;
        c[top + 32] = d16.Value;
        c[top + 33] = d17.Value;
        c[bottom + 32] = d18.Value;
        c[bottom + 33] = d19.Value;
        c[top + 40] = d20.Value;
        c[top + 41] = d21.Value;
        c[bottom + 40] = d22.Value;
        c[bottom + 41] = d23.Value;
        c[top + 48] = d24.Value;
        c[top + 49] = d25.Value;
        c[bottom + 48] = d26.Value;
        c[bottom + 49] = d27.Value;
        c[top + 56] = d28.Value;
        c[top + 57] = d29.Value;
        c[bottom + 56] = d30.Value;
        c[bottom + 57] = d31.Value;
    }

    [Test]
    public void WgmmaFromIlgpuGivesTheExactProduct()
    {
        if (Backend != Backends.Cuda)
            Assert.Ignore("a probe of a Hopper instruction: CUDA only");
        var cuda = (CudaAccelerator)Accelerator;
        if (cuda.Architecture is not { Major: 9 })
            Assert.Ignore($"wgmma needs an SM 9.0 device; this one is {cuda.Architecture}");
        // Small integers (exact in bf16, and every product sum exact in fp32).
        var random = new Random(5);
        float[] a = Enumerable.Range(0, 64 * 16).Select(_ => (float)random.Next(-4, 5)).ToArray();
        float[] b = Enumerable.Range(0, 64 * 16).Select(_ => (float)random.Next(-4, 5)).ToArray();
        uint[] aWords = new uint[64 * 8];
        for (int i = 0; i < aWords.Length; i++)
            aWords[i] = Bits(a[2 * i]) | ((uint)Bits(a[2 * i + 1]) << 16);
        var bPieces = new U4[128];
        for (int i = 0; i < 128; i++)
        {
            bPieces[i].X0 = Bits(b[8 * i]) | ((uint)Bits(b[8 * i + 1]) << 16);
            bPieces[i].X1 = Bits(b[8 * i + 2]) | ((uint)Bits(b[8 * i + 3]) << 16);
            bPieces[i].X2 = Bits(b[8 * i + 4]) | ((uint)Bits(b[8 * i + 5]) << 16);
            bPieces[i].X3 = Bits(b[8 * i + 6]) | ((uint)Bits(b[8 * i + 7]) << 16);
        }
        var bNMajor = new U4[128];                        // piece 8k + j: n = 8j .. 8j+7 of row k
        for (int k = 0; k < 16; k++)
        {
            for (int j = 0; j < 8; j++)
            {
                float B(int n) => b[16 * n + k];
                bNMajor[8 * k + j].X0 = Bits(B(8 * j)) | ((uint)Bits(B(8 * j + 1)) << 16);
                bNMajor[8 * k + j].X1 = Bits(B(8 * j + 2)) | ((uint)Bits(B(8 * j + 3)) << 16);
                bNMajor[8 * k + j].X2 = Bits(B(8 * j + 4)) | ((uint)Bits(B(8 * j + 5)) << 16);
                bNMajor[8 * k + j].X3 = Bits(B(8 * j + 6)) | ((uint)Bits(B(8 * j + 7)) << 16);
            }
        }
        var expected = new float[64 * 64];
        for (int m = 0; m < 64; m++)
            for (int n = 0; n < 64; n++)
                expected[64 * m + n] = Enumerable.Range(0, 16).Sum(k => a[16 * m + k] * b[16 * n + k]);

        using var aBuffer = Accelerator.Allocate1D(aWords);
        using var bBuffer = Accelerator.Allocate1D(bPieces);
        using var bNMajorBuffer = Accelerator.Allocate1D(bNMajor);
        using var cBuffer = Accelerator.Allocate1D<float>(64 * 64);
        var launch = CudaDriver.Load<WgmmaProbeArgs>(cuda, Probe, 128, 1, 4096, promoteOperandSlots: true, hopperTarget: true);
        var config = new KernelConfig(new Index3D(1, 1, 1), new Index3D(128, 1, 1), SharedMemoryConfig.RequestDynamic<byte>(4096));
        string? matchedK = null, matchedN = null;
        foreach (int nMajor in new[] { 0, 1 })
        {
            foreach (var (leading, stride) in new[] { (128u, 256u), (256u, 128u) })
            {
                cBuffer.MemSetToZero();
                launch(Accelerator.DefaultStream, config, new WgmmaProbeArgs
                {
                    A = aBuffer.View, B = nMajor == 0 ? bBuffer.View : bNMajorBuffer.View, C = cBuffer.View,
                    DescriptorLow = (leading >> 4) << 16, DescriptorHigh = stride >> 4, NMajor = nMajor,
                });
                Accelerator.Synchronize();
                float[] c = cBuffer.GetAsArray1D();
                int wrong = c.Where((x, i) => x != expected[i]).Count();
                TestContext.Out.WriteLine($"B {(nMajor == 0 ? "K-major" : "N-major (trans-b 1)")}, leading byte offset {leading}, " +
                    $"stride byte offset {stride}: {wrong} of 4096 wrong" +
                    (wrong > 0 ? $" (C[0..3] {string.Join(", ", c.Take(4))} against {string.Join(", ", expected.Take(4))})" : ""));
                if (wrong == 0 && nMajor == 0)
                    matchedK ??= $"LBO {leading}, SBO {stride}";
                if (wrong == 0 && nMajor == 1)
                    matchedN ??= $"LBO {leading}, SBO {stride}";
            }
        }
        string? matched = matchedK is null || matchedN is null ? null : $"K-major B with {matchedK}, N-major B with {matchedN}";
        if (CudaDriver.Loaded.TryGetValue($"{nameof(WgmmaProbeTests)}.{nameof(Probe)}", out var resources))
            TestContext.Out.WriteLine($"probe kernel: {resources}");
        Assert.That(matched, Is.Not.Null, "for each layout of B, one reading of the descriptor gives the exact product");
        TestContext.Out.WriteLine($"wgmma from ILGPU: exact with {matched}");
    }

    private static ushort Bits(float x) => (ushort)(BitConverter.SingleToUInt32Bits(x) >> 16);   // exact for small integers
}

/// <summary>The wgmma probe's PTX, checked without a GPU (CI).</summary>
public sealed class WgmmaProbePtxTests
{
    /// <summary>
    /// No GPU needed: the probe's PTX, as the loader would hand it to the driver, holds the one wgmma with its fence, commit
    /// and wait, targets sm_90a, and keeps no operand in local memory (<see cref="PtxOperandSlots"/>).
    /// </summary>
    [Test]
    public void ProbePtxTargetsSm90a()
    {
        string ptx = PtxTarget.Hopper(PtxOperandSlots.Promote(Ptx.Compile(typeof(WgmmaProbeTests).GetMethod(nameof(WgmmaProbeTests.Probe),
            System.Reflection.BindingFlags.NonPublic | System.Reflection.BindingFlags.Static)!)));
        if (Environment.GetEnvironmentVariable("STICKBREAKING_PTX_DIR") is { Length: > 0 } dir)
            System.IO.File.WriteAllText(System.IO.Path.Combine(dir, "wgmma-probe.ptx"), ptx);
        Assert.Multiple(() =>
        {
            Assert.That(ptx, Does.Contain("\n.target sm_90a\n"), "retargeted");
            Assert.That(ptx, Does.Not.Contain(".target sm_80"), "no sm_80 target left");
            Assert.That(ptx, Does.Contain("wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16"), "the wgmma");
            Assert.That(ptx, Does.Contain("wgmma.wait_group.sync.aligned 0"), "its wait");
            Assert.That(ptx, Does.Not.Contain(".local"), "no local memory");
        });
        Assert.That(() => PtxTarget.Hopper(".version 8.8\n.target sm_90\n"), Throws.InvalidOperationException,
            "a module without an sm_80 target is refused, not passed through");
    }
}
