using System;
using System.Linq;
using ILGPU;
using ILGPU.Runtime;
using NUnit.Framework;
using StickBreaking.ILGPU.Kernels.Common;
using StickBreaking.ILGPU.Kernels.TensorCore;
using StickBreaking.ILGPU.Launch;
using StickBreaking.ILGPU.Tests.Infrastructure;
using StickBreaking.ILGPU.Tests.Reference;
using static StickBreaking.ILGPU.Tests.Rounding;
using static StickBreaking.ILGPU.Tests.Infrastructure.Errors;

namespace StickBreaking.ILGPU.Tests;

/// <summary>
/// The tensor-core forward (<see cref="TensorCoreForwardKernel"/>) for fp16 and bf16 storage against the float64
/// reference computed from the SAME rounded inputs (q, k, v rounded to the storage type first). On the CPU
/// accelerator the mma runs as an emulation of its fragment layout, on CUDA as the instruction.
/// <para>
/// Tolerance of o: the output is rounded to 16 bits, so no kernel can beat the floor
/// max |round(o_exact) - o_exact| (about half a unit in the last place near |o|max). On top of that the kernel
/// rounds the weights to 16 bits before the P V product (relative 2^-9 for bf16, 2^-12 for fp16, per weight,
/// errors of both signs), so the allowed error is max(2 floor, 1.5 ulp of the storage type at |o|max): twice
/// the floor as docs/math.md, section 5 allows at most, or, where the floor happens to be small, 1.5 ulp
/// (measured on the CPU accelerator: 1.2x to 1.9x the floor, and 3.5x = 0.9 ulp for T = 1 in bf16; the half ulp
/// above 1 leaves room for the GPU's own mma accumulation order). With <see cref="SplitWeights"/> the weights go into the product
/// as two 16-bit parts, P V is exact to about 2^-17 and only the final rounding is left: max(1.2 floor, half an ulp)
/// (measured: 1.00x the floor in every case).
/// rem and LogRem are fp32: 2e-5 absolute, plus 1e-6 |LogRem| where the stick is used up (a sum of hundreds of
/// terms of size 3 in fp32, each with a relative error of a few 1e-8).
/// </para>
/// </summary>
public sealed class TensorCoreForwardTests(string backend) : TensorCoreFixture(backend, "the tensor-core forward")
{
    [TestCase(false, InputKind.Standard, 1, 2, 1, 64, false)]
    [TestCase(true, InputKind.Standard, 1, 1, 1, 128, true)]
    [TestCase(false, InputKind.Standard, 1, 1, 15, 128, true)]
    [TestCase(true, InputKind.Standard, 2, 1, 64, 64, false)]
    [TestCase(false, InputKind.Standard, 1, 1, 65, 128, false)]
    [TestCase(true, InputKind.Standard, 1, 1, 65, 64, true)]
    [TestCase(true, InputKind.Standard, 1, 1, 130, 128, false)]
    [TestCase(false, InputKind.Standard, 1, 2, 130, 64, true)]
    [TestCase(true, InputKind.Saturated, 1, 1, 130, 64, false)]
    [TestCase(false, InputKind.Saturated, 1, 1, 97, 128, true)]
    [TestCase(true, InputKind.UsedUp, 1, 1, 130, 64, true)]
    [TestCase(false, InputKind.UsedUp, 1, 1, 130, 64, false)]
    public void MatchesReferenceOnRoundedInputs(bool bf16, InputKind kind, int batch, int heads, int length, int headDim,
        bool attendCurrent) => CheckAgainstReference(bf16, kind, batch, heads, length, headDim, attendCurrent, plan: null);

    /// <summary>
    /// The Hopper plan (<see cref="WgmmaPlan"/>: both products on wgmma from the core-matrix layouts) against float64 with
    /// the same tolerances; on the CPU accelerator its products run as the emulated mma on fragments read from those
    /// layouts, so the layouts and the key permutation are checked without a GPU. Prints whether o equals the mma plan's
    /// bitwise.
    /// </summary>
    [TestCase(true, InputKind.Standard, 1, 2, 130, 128, false)]
    [TestCase(false, InputKind.Standard, 1, 1, 97, 64, true)]
    [TestCase(true, InputKind.Saturated, 1, 1, 70, 64, false)]
    [TestCase(false, InputKind.UsedUp, 1, 1, 130, 128, true)]
    [TestCase(true, InputKind.LongRange, 1, 1, 200, 128, true)]
    public void WgmmaPlanMatchesReference(bool bf16, InputKind kind, int batch, int heads, int length, int headDim, bool attendCurrent)
    {
        RequireWgmma();
        if (Backend == Backends.Cpu && kind != InputKind.Standard)
            Assert.Ignore("CUDA only but for the two Standard cases (CI time: the emulated products take seconds a case)");
        CheckAgainstReference(bf16, kind, batch, heads, length, headDim, attendCurrent, typeof(WgmmaPlan));
        var shape = new AttentionShape(batch, heads, length, headDim);
        var x = TestInputs.Create(kind, batch, heads, length, headDim, seed: 5 + length);
        var q = RoundBits(x.Q, bf16); var k = RoundBits(x.K, bf16); var v = RoundBits(x.V, bf16);
        float scale = (float)(1.0 / Math.Sqrt(headDim));
        var mma = Run(bf16, shape, q.Bits, k.Bits, v.Bits, scale, attendCurrent, snapshots: true, split: bf16);
        var wgmma = Run(bf16, shape, q.Bits, k.Bits, v.Bits, scale, attendCurrent, snapshots: true, split: bf16, typeof(WgmmaPlan));
        var again = Run(bf16, shape, q.Bits, k.Bits, v.Bits, scale, attendCurrent, snapshots: true, split: bf16, typeof(WgmmaPlan));
        TestContext.Out.WriteLine($"wgmma plan bitwise equal to the mma plan: o {wgmma.O.SequenceEqual(mma.O)}, rem {wgmma.Rem.SequenceEqual(mma.Rem)}, " +
            $"snapshots {wgmma.Snapshots.SequenceEqual(mma.Snapshots)}");
        Assert.Multiple(() =>
        {
            Assert.That(again.O, Is.EqualTo(wgmma.O), "O repeats");
            Assert.That(again.Rem, Is.EqualTo(wgmma.Rem), "Rem repeats");
            Assert.That(again.Snapshots, Is.EqualTo(wgmma.Snapshots), "snapshots repeat");
            // The scans are the same fp32 code on the same scores: rem and the snapshots agree with the mma plan's to
            // rounding (the products' summation order inside the tensor cores may differ).
            Assert.That(Errors.MaxAbs(wgmma.Rem, mma.Rem.Select(r => (double)r).ToArray()), Is.LessThanOrEqualTo(2e-5), "Rem against the mma plan");
        });
    }

    /// <summary>
    /// A non-finite value in a diagonal tile reaches exactly the rows that see it with the Hopper plans too; with two
    /// warpgroups a group, in either warpgroup's diagonal tile (key 70: the second's; key 30: the first's, a full tile for
    /// the second).
    /// </summary>
    [TestCase(true, false, 5, typeof(WgmmaPlan))]
    [TestCase(false, true, 70, typeof(WgmmaPlan))]
    [TestCase(true, false, 70, typeof(WgmmaTwoWarpgroupsPlan))]
    [TestCase(false, true, 30, typeof(WgmmaTwoWarpgroupsPlan))]
    public void WgmmaPlansNonFiniteValueReachesOnlyTheRowsThatSeeIt(bool bf16, bool attendCurrent, int badKey, Type plan)
    {
        RequireWgmma();
        if (Backend == Backends.Cpu && badKey != 70)
            Assert.Ignore("CUDA only but for the key-70 cases (CI time)");
        NonFiniteValue(bf16, attendCurrent, badKey, plan);
    }

    /// <summary>
    /// The Hopper plan with two warpgroups a group (<see cref="WgmmaTwoWarpgroupsPlan"/>: 128 rows sharing each K / V tile)
    /// against float64, and bitwise against the one-warpgroup plan: every row is computed by the same code on the same
    /// tiles, only the staging is shared. T = 200: a second block of 72 rows, whose second warpgroup has 8; T = 150: a
    /// block whose second warpgroup is partly past T.
    /// </summary>
    [TestCase(true, 1, 2, 200, 128, false)]
    [TestCase(false, 1, 1, 150, 64, true)]
    [TestCase(true, 1, 1, 150, 128, true)]
    public void WgmmaTwoWarpgroupsPlanMatchesReferenceAndWgmmaPlan(bool bf16, int batch, int heads, int length, int headDim, bool attendCurrent)
    {
        var plan = typeof(WgmmaTwoWarpgroupsPlan);
        RequireWgmma();
        CheckAgainstReference(bf16, InputKind.Standard, batch, heads, length, headDim, attendCurrent, plan);
        var shape = new AttentionShape(batch, heads, length, headDim);
        var x = TestInputs.Create(InputKind.Standard, batch, heads, length, headDim, seed: 11 + length);
        var q = RoundBits(x.Q, bf16); var k = RoundBits(x.K, bf16); var v = RoundBits(x.V, bf16);
        float scale = (float)(1.0 / Math.Sqrt(headDim));
        var one = Run(bf16, shape, q.Bits, k.Bits, v.Bits, scale, attendCurrent, snapshots: true, split: bf16, typeof(WgmmaPlan));
        var two = Run(bf16, shape, q.Bits, k.Bits, v.Bits, scale, attendCurrent, snapshots: true, split: bf16, plan);
        Assert.Multiple(() =>
        {
            Assert.That(two.O, Is.EqualTo(one.O), "O");
            Assert.That(two.Rem, Is.EqualTo(one.Rem), "Rem");
            Assert.That(two.LogRem, Is.EqualTo(one.LogRem), "LogRem");
            Assert.That(two.Snapshots, Is.EqualTo(one.Snapshots), "snapshots");
        });
    }

    /// <summary>The Hopper plan runs on the CPU accelerator (emulated) and on SM 9.0 CUDA devices; elsewhere an ignore with the reason.</summary>
    private void RequireWgmma()
    {
        if (Accelerator is global::ILGPU.Runtime.Cuda.CudaAccelerator cuda && cuda.Architecture is not { Major: 9 })
            Assert.Ignore($"the wgmma plan needs an SM 9.0 device; this one is {cuda.Architecture}");
    }

    private void CheckAgainstReference(bool bf16, InputKind kind, int batch, int heads, int length, int headDim,
        bool attendCurrent, Type? plan)
    {
        var shape = new AttentionShape(batch, heads, length, headDim);
        var x = TestInputs.Create(kind, batch, heads, length, headDim, seed: 7 * length + headDim + (bf16 ? 1 : 0));
        double scale = 1.0 / Math.Sqrt(headDim);
        var q = RoundBits(x.Q, bf16); var k = RoundBits(x.K, bf16); var v = RoundBits(x.V, bf16);
        var expected = Float64Reference.Forward(q.Values, k.Values, v.Values, batch, heads, length, headDim, scale, attendCurrent);
        double floor = 0, oMax = 0;
        foreach (double e in expected.O)
        {
            floor = Math.Max(floor, Math.Abs(ToDouble(FromDouble(e, bf16), bf16) - e));
            oMax = Math.Max(oMax, Math.Abs(e));
        }
        foreach (bool split in new[] { false, true })
            Check(split);

        void Check(bool split)
        {
        var run = Run(bf16, shape, q.Bits, k.Bits, v.Bits, (float)scale, attendCurrent, snapshots: false, split, plan);
        double tolerance = split ? Math.Max(1.2 * floor, Ulp(oMax, bf16) / 2) : Math.Max(2 * floor, 1.5 * Ulp(oMax, bf16));
        double oError = Errors.MaxAbs(run.O.Select(b => (float)ToDouble(b, bf16)).ToArray(), expected.O);
        double remError = Errors.MaxAbs(run.Rem, expected.Rem);
        double logRemExcess = expected.LogRem.Select((e, i) => Math.Abs(run.LogRem[i] - e) - 1e-6 * Math.Abs(e)).Max();
        TestContext.Out.WriteLine($"{(bf16 ? "bf16" : "fp16")} {(split ? "split" : "rounded")} {kind} T={length} D={headDim}: o error {oError:E2} " +
            $"(floor {floor:E2}, ratio {oError / Math.Max(floor, 1e-30):F2}, tolerance {tolerance:E2}), rem {remError:E2}, " +
            $"LogRem excess over 1e-6 |LogRem| {logRemExcess:E2}");
        Assert.Multiple(() =>
        {
            Assert.That(oError, Is.LessThanOrEqualTo(tolerance), split ? "O (split weights)" : "O (rounded weights)");
            Assert.That(remError, Is.LessThanOrEqualTo(2e-5), "Rem");
            Assert.That(logRemExcess, Is.LessThanOrEqualTo(2e-5), "LogRem");
        });
        }
    }

    /// <summary>
    /// The acc snapshots (per row and 32-key tile) are those the fp32 CUDA-code forward writes for the same
    /// (rounded) inputs, so that the backward can read them; and repeat runs are bitwise identical.
    /// </summary>
    [TestCase(true, 1, 1, 130, 64, false)]
    [TestCase(false, 1, 1, 97, 128, true)]
    [TestCase(true, 2, 3, 70, 64, false)]    // 6 heads: the groups take the heads in chunks, the last one partial
    public void SnapshotsMatchTheFp32ForwardAndRunsRepeat(bool bf16, int batch, int heads, int length, int headDim, bool attendCurrent)
    {
        var shape = new AttentionShape(batch, heads, length, headDim);
        var x = TestInputs.Create(InputKind.LongRange, batch, heads, length, headDim, seed: 19 + length);
        var q = RoundBits(x.Q, bf16); var k = RoundBits(x.K, bf16); var v = RoundBits(x.V, bf16);
        float scale = (float)(1.0 / Math.Sqrt(headDim));
        var first = Run(bf16, shape, q.Bits, k.Bits, v.Bits, scale, attendCurrent, snapshots: true);
        var second = Run(bf16, shape, q.Bits, k.Bits, v.Bits, scale, attendCurrent, snapshots: true);

        float[] Floats(double[] values) => values.Select(d => (float)d).ToArray();
        var rounded = x with { Q = Floats(q.Values), K = Floats(k.Values), V = Floats(v.Values) };
        var options = new StickBreakingOptions { AttendCurrent = attendCurrent };
        using var fp32 = new StickBreakingAttention(Accelerator, null, KernelChoice.Cuda);
        using var tensors = new DeviceTensors(Accelerator, shape, rounded);
        tensors.Forward(fp32, Accelerator.DefaultStream, options);
        Accelerator.Synchronize();
        float[] expected = ((ArrayView1D<float, Stride1D.Dense>)tensors.Workspace.AccFor(shape)).GetAsArray1D();

        // Both kernels write, for a row of 64-row block b, the 32-key tiles 0 .. 2b+1 (those of the 64-key tiles
        // they walk); the other slots are never written (nor read by the backward).
        int tiles = Snapshots.TileCount(length);
        double worst = 0;
        for (int head = 0; head < shape.HeadCount; head++)
        {
            for (int row = 0; row < length; row++)
            {
                for (int tile = 0; tile < Math.Min(tiles, 2 * (row / 64) + 2); tile++)
                {
                    long i = Snapshots.Index(head, row, tile, length, tiles);
                    worst = Math.Max(worst, Math.Abs(first.Snapshots[i] - expected[i]) - 1e-6 * Math.Abs(expected[i]));
                }
            }
        }
        TestContext.Out.WriteLine($"snapshots: worst excess over 1e-6 relative {worst:E2}");
        Assert.Multiple(() =>
        {
            Assert.That(worst, Is.LessThanOrEqualTo(2e-5), "snapshots");
            Assert.That(second.O, Is.EqualTo(first.O), "O repeats");
            Assert.That(second.Rem, Is.EqualTo(first.Rem), "Rem repeats");
            Assert.That(second.LogRem, Is.EqualTo(first.LogRem), "LogRem repeats");
            Assert.That(second.Snapshots, Is.EqualTo(first.Snapshots), "snapshots repeat");
        });
    }

    /// <summary>
    /// Every plan with the library's lb (<see cref="IForwardPlan"/>: buffering, prefetch, groups per SM) computes the same thing in the same
    /// order: o, rem, LogRem and the snapshots are bitwise those of the library's plan, over several tiles, with a
    /// non-finite value in a diagonal tile.
    /// </summary>
    [TestCase(true, 200, 128, false)]
    [TestCase(false, 150, 64, true)]
    public void PlansAgreeBitwise(bool bf16, int length, int headDim, bool attendCurrent)
    {
        if (Backend == Backends.Cpu)
            Assert.Ignore("CUDA only: the plans share their code; on the CPU accelerator (an emulated mma) they would take minutes");
        var shape = new AttentionShape(1, 1, length, headDim);
        var x = TestInputs.Create(InputKind.Standard, 1, 1, length, headDim, seed: 31 + length);
        var q = RoundBits(x.Q, bf16); var k = RoundBits(x.K, bf16); var v = RoundBits(x.V, bf16);
        v.Bits[70 * headDim + 3] = FromDouble(double.NaN, bf16);
        float scale = (float)(1.0 / Math.Sqrt(headDim));
        var library = Run(bf16, shape, q.Bits, k.Bits, v.Bits, scale, attendCurrent, snapshots: true, split: bf16);
        foreach (var plan in new[] { typeof(TwoGroupsPerSm), typeof(ThreeGroupsPerSm), typeof(ThreeGroupsPerSmNoPrefetch) })
        {
            var run = Run(bf16, shape, q.Bits, k.Bits, v.Bits, scale, attendCurrent, snapshots: true, split: bf16, plan);
            Assert.Multiple(() =>
            {
                Assert.That(run.O, Is.EqualTo(library.O), $"O, {plan.Name}");
                Assert.That(run.Rem, Is.EqualTo(library.Rem), $"Rem, {plan.Name}");
                Assert.That(run.LogRem, Is.EqualTo(library.LogRem), $"LogRem, {plan.Name}");
                Assert.That(run.Snapshots, Is.EqualTo(library.Snapshots), $"snapshots, {plan.Name}");
            });
        }
    }

    /// <summary>Non-finite keys and values that no row sees (past the last row's reach) reach no output.</summary>
    [TestCase(true, false)]
    [TestCase(false, true)]
    public void UnseenNonFiniteKeysAndValuesReachNoOutput(bool bf16, bool attendCurrent)
    {
        int length = 70, headDim = 64;
        var shape = new AttentionShape(1, 1, length, headDim);
        var x = TestInputs.Create(InputKind.Standard, 1, 1, length, headDim, seed: 3);
        var q = RoundBits(x.Q, bf16); var k = RoundBits(x.K, bf16); var v = RoundBits(x.V, bf16);
        // Without AttendCurrent no row sees the last key: poison its k and v.
        int last = length - 1;
        if (!attendCurrent)
        {
            for (int d = 0; d < headDim; d++)
            {
                k.Bits[last * headDim + d] = FromDouble(double.NaN, bf16);
                v.Bits[last * headDim + d] = FromDouble(d % 2 == 0 ? double.PositiveInfinity : double.NaN, bf16);
            }
        }
        var run = Run(bf16, shape, q.Bits, k.Bits, v.Bits, 0.125f, attendCurrent, snapshots: false);
        Assert.That(run.O.All(b => double.IsFinite(ToDouble(b, bf16))) && run.Rem.All(float.IsFinite), "all outputs finite");
    }

    /// <summary>
    /// A non-finite value of a key inside a row block's diagonal tile (where some rows of the block see the key and
    /// others do not) reaches exactly the rows that see it (non-finite in its columns: the kernel gives NaN there in
    /// the rows of that block, the mma Inf or NaN in the rows of later blocks; Mask16Tests check the other columns); the other rows
    /// equal the reference computed with that value replaced by zero. Keys 5 (block 0) and 70 (block 1).
    /// </summary>
    [TestCase(true, false, 5)]
    [TestCase(false, true, 70)]
    [TestCase(true, true, 70)]
    public void NonFiniteValueReachesOnlyTheRowsThatSeeIt(bool bf16, bool attendCurrent, int badKey) =>
        NonFiniteValue(bf16, attendCurrent, badKey, plan: null);

    private void NonFiniteValue(bool bf16, bool attendCurrent, int badKey, Type? plan)
    {
        int length = 100, headDim = 64;
        var shape = new AttentionShape(1, 1, length, headDim);
        var x = TestInputs.Create(InputKind.Standard, 1, 1, length, headDim, seed: 23);
        var q = RoundBits(x.Q, bf16); var k = RoundBits(x.K, bf16); var v = RoundBits(x.V, bf16);
        for (int d = 0; d < headDim; d += 3)
        {
            v.Bits[badKey * headDim + d] = FromDouble(d % 2 == 0 ? double.PositiveInfinity : double.NaN, bf16);
            v.Values[badKey * headDim + d] = 0;
        }
        double scale = 0.125;
        var run = Run(bf16, shape, q.Bits, k.Bits, v.Bits, (float)scale, attendCurrent, snapshots: false, plan: plan);
        var expected = Float64Reference.Forward(q.Values, k.Values, v.Values, 1, 1, length, headDim, scale, attendCurrent);
        double worst = 0;
        for (int row = 0; row < length; row++)
        {
            bool sees = attendCurrent ? badKey <= row : badKey < row;
            for (int d = 0; d < headDim; d++)
            {
                double o = ToDouble(run.O[row * headDim + d], bf16);
                if (sees && d % 3 == 0)
                    Assert.That(double.IsFinite(o), Is.False, $"row {row} sees key {badKey}: column {d} must be non-finite");
                else if (!sees)
                    worst = Math.Max(worst, Math.Abs(o - expected.O[row * headDim + d]));
            }
        }
        TestContext.Out.WriteLine($"rows that do not see key {badKey}: max abs error {worst:E2}");
        Assert.That(worst, Is.LessThanOrEqualTo(bf16 ? 4e-3 : 5e-4), "rows that do not see the key");
    }

    /// <summary>
    /// CUDA only (the simulators would take minutes): a long sequence against float64, both weight modes, the
    /// library's plan; with long-range logits (the stick survives across all the
    /// tiles) LogRem is held to 2e-5 + 1e-6 |LogRem| as well.
    /// </summary>
    [TestCase(true, 1024, 128, InputKind.Standard)]
    [TestCase(false, 1024, 64, InputKind.Standard)]
    [TestCase(true, 2048, 128, InputKind.LongRange)]
    public void LongSequenceOnCuda(bool bf16, int length, int headDim, InputKind kind)
    {
        if (Backend != Backends.Cuda)
            Assert.Ignore("CUDA only: the CPU accelerator would take minutes");
        var shape = new AttentionShape(1, 2, length, headDim);
        var x = TestInputs.Create(kind, 1, 2, length, headDim, seed: 29);
        var q = RoundBits(x.Q, bf16); var k = RoundBits(x.K, bf16); var v = RoundBits(x.V, bf16);
        double scale = 1.0 / Math.Sqrt(headDim);
        var expected = Float64Reference.Forward(q.Values, k.Values, v.Values, 1, 2, length, headDim, scale, false);
        double floor = expected.O.Max(e => Math.Abs(ToDouble(FromDouble(e, bf16), bf16) - e));
        double ulp = Ulp(expected.O.Max(Math.Abs), bf16);
        foreach (var plan in new[] { typeof(ThreeGroupsPerSmNoPrefetch) })
        {
            foreach (bool split in new[] { false, true })
            {
                var run = Run(bf16, shape, q.Bits, k.Bits, v.Bits, (float)scale, false, snapshots: false, split, plan);
                double oError = Errors.MaxAbs(run.O.Select(b => (float)ToDouble(b, bf16)).ToArray(), expected.O);
                double remError = Errors.MaxAbs(run.Rem, expected.Rem);
                double logRemExcess = expected.LogRem.Select((e, i) => Math.Abs(run.LogRem[i] - e) - 1e-6 * Math.Abs(e)).Max();
                TestContext.Out.WriteLine($"{(bf16 ? "bf16" : "fp16")} {(split ? "split" : "rounded")} {plan.Name} {kind} T={length} D={headDim}: " +
                    $"o error {oError:E2} ({oError / floor:F2} x floor {floor:E2}), rem {remError:E2}, LogRem excess over 1e-6 |LogRem| {logRemExcess:E2} " +
                    $"(LogRem down to {expected.LogRem.Min():F1})");
                Assert.Multiple(() =>
                {
                    Assert.That(oError, Is.LessThanOrEqualTo(split ? Math.Max(1.2 * floor, ulp / 2) : Math.Max(2 * floor, 1.5 * ulp)), "O");
                    Assert.That(remError, Is.LessThanOrEqualTo(2e-5), "Rem");
                    Assert.That(logRemExcess, Is.LessThanOrEqualTo(2e-5), "LogRem");
                });
            }
        }
    }

    /// <summary>
    /// CUDA only: times the specializations (storage x weights x plan) at B=4, H=12, T=4096 (D = 128) and B=4, H=16,
    /// T=4096 (D = 64), and prints milliseconds (mean of 10 launches after a warm-up) and TFLOP/s (4 T^2 D / 2 per
    /// head, causal), the peers' figures being in the project's notes. Asserts nothing but that the outputs are finite.
    /// </summary>
    [TestCase(128)]
    [TestCase(64)]
    public void TimingOnCuda(int headDim)
    {
        if (Backend != Backends.Cuda)
            Assert.Ignore("CUDA only");
        int heads = headDim == 128 ? 12 : 16;
        var plans = new[] { typeof(TwoGroupsPerSm), typeof(ThreeGroupsPerSm), typeof(ThreeGroupsPerSmNoPrefetch) };
        if (Accelerator is global::ILGPU.Runtime.Cuda.CudaAccelerator { Architecture: { Major: 9 } })
            plans = [.. plans, typeof(WgmmaPlan), typeof(WgmmaTwoWarpgroupsPlan)];
        foreach (var plan in plans)
        {
            foreach (bool bf16 in new[] { true, false })
            {
                foreach (bool split in new[] { false, true })
                    Time(4, heads, 4096, headDim, bf16, split, plan);
            }
        }
    }

    /// <summary>CUDA only: the library's choices (bf16 split, fp16 rounded, library plan) over T = 1024 .. 16384 at D = 128, as <see cref="TimingOnCuda"/>.</summary>
    [Test]
    public void LengthSweepOnCuda()
    {
        if (Backend != Backends.Cuda)
            Assert.Ignore("CUDA only");
        foreach (int length in new[] { 1024, 2048, 4096, 8192, 16384 })
        {
            foreach (bool bf16 in new[] { true, false })
                Time(4, 12, length, 128, bf16, split: bf16, typeof(ThreeGroupsPerSmNoPrefetch));
        }
    }

    private void Time(int batch, int heads, int length, int headDim, bool bf16, bool split, Type plan)
    {
        var shape = new AttentionShape(batch, heads, length, headDim);
        // Uniform values in [-0.25, 0.25): 4096 random 16-bit values repeated (the speed does not depend on the values,
        // and at T = 16384 drawing every one would take longer than the timing).
        var random = new Random(3);
        ushort[] Make()
        {
            var table = Enumerable.Range(0, 4096).Select(_ => FromDouble(0.25 * (random.NextDouble() * 2 - 1), bf16)).ToArray();
            int start = random.Next(4096);
            var bits = new ushort[shape.TensorLength];
            for (long i = 0; i < bits.LongLength; i++)
                bits[i] = table[(start + i * 7) & 4095];
            return bits;
        }
        var q = Make(); var k = Make(); var v = Make();
        var acc = Accelerator;
        using var qb = acc.Allocate1D(q);
        using var kb = acc.Allocate1D(k);
        using var vb = acc.Allocate1D(v);
        using var ob = acc.Allocate1D<ushort>(q.Length);
        using var rem = acc.Allocate1D<float>(shape.RowCount);
        using var logRem = acc.Allocate1D<float>(shape.RowCount);
        var args = new TensorCoreForwardArgs
        {
            Q = qb.View, K = kb.View, V = vb.View, O = ob.View, Rem = rem.View, LogRem = logRem.View,
            AccSnapshots = ArrayView<float>.Empty, SnapshotTiles = Snapshots.TileCount(length),
            Rows = AttentionRows.Contiguous(shape.Heads, shape.KeyValueHeads, shape.Length, shape.HeadDim), Length = length, HeadDim = headDim, Scale = (float)(1.0 / Math.Sqrt(headDim)),
        };
        var kernel = KernelFor(bf16, split, plan);
        Launcher.Launch(kernel, acc.DefaultStream, shape, args);
        acc.Synchronize();
        const int runs = 10;
        var watch = System.Diagnostics.Stopwatch.StartNew();
        for (int r = 0; r < runs; r++)
            Launcher.Launch(kernel, acc.DefaultStream, shape, args);
        acc.Synchronize();
        double ms = watch.Elapsed.TotalMilliseconds / runs;
        double flops = 4.0 * length * length * headDim / 2 * batch * heads;
        TestContext.Out.WriteLine($"{(bf16 ? "bf16" : "fp16")} {(split ? "split" : "rounded")} {plan.Name} B={batch} H={heads} T={length} " +
            $"D={headDim}: {ms:F3} ms, {flops / ms / 1e9:F1} TFLOP/s");
        if (StickBreaking.ILGPU.Launch.CudaDriver.Loaded.TryGetValue("TensorCoreForwardKernel.Kernel", out var resources))
            TestContext.Out.WriteLine($"  {resources}");
        Assert.That(rem.GetAsArray1D().All(float.IsFinite), "finite rem");
    }

    /// <summary>The launch description of one specialization: the tests launch it through the library's own launch layer.</summary>
    private static KernelLaunch<TensorCoreForwardArgs> KernelFor(bool bf16, bool split) =>
        (bf16, split) switch
        {
            (true, false) => TensorCoreForwardKernel.LaunchFor<Bf16Storage, RoundedWeights>(),
            (true, true) => TensorCoreForwardKernel.LaunchFor<Bf16Storage, SplitWeights>(),
            (false, false) => TensorCoreForwardKernel.LaunchFor<Fp16Storage, RoundedWeights>(),
            (false, true) => TensorCoreForwardKernel.LaunchFor<Fp16Storage, SplitWeights>(),
        };

    /// <summary>The launch description of one specialization with an explicit plan (<see cref="IForwardPlan"/>).</summary>
    private static KernelLaunch<TensorCoreForwardArgs> KernelFor(bool bf16, bool split, Type plan)
    {
        var method = typeof(TensorCoreForwardKernel).GetMethods(System.Reflection.BindingFlags.Public | System.Reflection.BindingFlags.Static)
            .Single(m => m.Name == nameof(TensorCoreForwardKernel.LaunchFor) && m.GetGenericArguments().Length == 3)
            .MakeGenericMethod(bf16 ? typeof(Bf16Storage) : typeof(Fp16Storage), split ? typeof(SplitWeights) : typeof(RoundedWeights), plan);
        return (KernelLaunch<TensorCoreForwardArgs>)method.Invoke(null, null)!;
    }

    private sealed record Result(ushort[] O, float[] Rem, float[] LogRem, float[] Snapshots);

    private Result Run(bool bf16, AttentionShape shape, ushort[] q, ushort[] k, ushort[] v, float scale, bool attendCurrent,
        bool snapshots, bool split = false, Type? plan = null)
    {
        var acc = Accelerator;
        using var qb = acc.Allocate1D(q);
        using var kb = acc.Allocate1D(k);
        using var vb = acc.Allocate1D(v);
        using var ob = acc.Allocate1D<ushort>(q.Length);
        using var rem = acc.Allocate1D<float>(shape.RowCount);
        using var logRem = acc.Allocate1D<float>(shape.RowCount);
        int tiles = Snapshots.TileCount(shape.Length);
        using var snaps = acc.Allocate1D<float>(shape.RowCount * tiles);
        ob.MemSetToZero();
        snaps.MemSetToZero();
        var args = new TensorCoreForwardArgs
        {
            Q = qb.View, K = kb.View, V = vb.View, O = ob.View, Rem = rem.View, LogRem = logRem.View,
            AccSnapshots = snaps.View, WriteSnapshots = snapshots ? 1 : 0, SnapshotTiles = tiles,
            Rows = AttentionRows.Contiguous(shape.Heads, shape.KeyValueHeads, shape.Length, shape.HeadDim), Length = shape.Length, HeadDim = shape.HeadDim, AttendCurrent = attendCurrent ? 1 : 0, Scale = scale,
        };
        Launcher.Launch(plan is null ? KernelFor(bf16, split) : KernelFor(bf16, split, plan), acc.DefaultStream, shape, args);
        acc.Synchronize();
        return new Result(ob.GetAsArray1D(), rem.GetAsArray1D(), logRem.GetAsArray1D(), snaps.GetAsArray1D());
    }
}
