using System;
using System.Collections.Generic;
using System.Linq;
using System.Reflection;
using System.Text.RegularExpressions;
using ILGPU;
using ILGPU.Runtime;
using ILGPU.Runtime.Cuda;
using NUnit.Framework;
using StickBreaking.ILGPU.Kernels.Common;
using StickBreaking.ILGPU.Kernels.Portable;
using StickBreaking.ILGPU.Kernels.TensorCore;
using StickBreaking.ILGPU.Launch;
using StickBreaking.ILGPU.Tests.Infrastructure;
using StickBreaking.ILGPU.Tests.Reference;
using static StickBreaking.ILGPU.Tests.Rounding;
using static StickBreaking.ILGPU.Tests.Infrastructure.Errors;

namespace StickBreaking.ILGPU.Tests;

/// <summary>
/// The tensor-core backward pass 2 (<see cref="TensorCoreBackwardKeyKernel"/>: dk and dv) for fp16 and bf16 storage.
/// The acc snapshots and LogRem come from the tensor-core forward (snapshots written), the P snapshots from the
/// portable 16-bit pass 1 (<see cref="BackwardQueryKernel"/>), all on inputs rounded to the storage type first, and
/// the float64 reference (<see cref="Float64Reference.Backward"/>) runs on the same ROUNDED values, so that only
/// the kernels' own error is measured. On the CPU accelerator the mma runs as an emulation of its fragment layout,
/// on CUDA as the instruction.
/// <para>
/// Tolerance (docs/math.md, "16-bit storage"): the relative RMS error of dk and of dv within twice the floor, the
/// relative RMS of round(g) - g of the exact gradient g (no 16-bit output can beat it). The kernel rounds A and dz
/// to 16 bits before the dv and dk products (rounded weights: relative 2^-9 in bf16, 2^-12 in fp16 per term, errors
/// of both signs) or splits them into two 16-bit parts (split weights: exact to about 2^-17), then accumulates in
/// fp32 and rounds once; the tests print the ratio to the floor.
/// </para>
/// </summary>
public sealed class TensorCoreBackwardKeyTests(string backend) : TensorCoreFixture(backend, "the tensor-core backward")
{
    private static readonly int[] Lengths = [1, 15, 64, 65, 130, 200];

    public static IEnumerable<TestCaseData> Cases()
    {
        // Every length with both head dimensions in Standard inputs; storage, visibility and dRem alternate so that
        // each occurs with every length and head dimension without the full product.
        int n = 0;
        foreach (int t in Lengths)
            foreach (int d in new[] { 64, 128 })
            {
                bool bf16 = n % 2 == 0, attend = n / 2 % 2 == 0, zeroDRem = n % 3 == 0;
                n++;
                yield return Case(bf16, InputKind.Standard, t, d, attend, zeroDRem);
            }
        yield return Case(true, InputKind.Saturated, 130, 64, false, false);
        yield return Case(false, InputKind.Saturated, 65, 128, true, true);
        yield return Case(false, InputKind.UsedUp, 130, 64, true, false);
        yield return Case(true, InputKind.UsedUp, 200, 128, false, true);
        yield return Case(true, InputKind.UsedUp, 130, 64, true, false);
        yield return Case(false, InputKind.Saturated, 200, 64, false, false);
    }

    private static TestCaseData Case(bool bf16, InputKind kind, int t, int d, bool attend, bool zeroDRem) =>
        new TestCaseData(bf16, kind, t, d, attend, zeroDRem).SetArgDisplayNames(bf16 ? "bf16" : "fp16", kind.ToString(),
            $"T={t}", $"D={d}", attend ? "AttendCurrent" : "Strict", zeroDRem ? "dRem=0" : "dRem");

    /// <summary>(a) dk and dv against float64 on the same rounded inputs, rounded and split weights.</summary>
    [TestCaseSource(nameof(Cases))]
    public void MatchesReferenceOnRoundedInputs(bool bf16, InputKind kind, int length, int headDim, bool attendCurrent,
        bool zeroDRem)
    {
        if (!Backends.RunsEmulatedMmaCase(Backend, length, headDim))
            Assert.Ignore(Backends.EmulatedMmaSkip);
        int batch = 1, heads = kind == InputKind.Standard ? 1 : 2;
        var shape = new AttentionShape(batch, heads, length, headDim);
        var x = TestInputs.Create(kind, batch, heads, length, headDim, seed: 13 * length + headDim + (bf16 ? 1 : 0));
        var q = RoundBits(x.Q, bf16); var k = RoundBits(x.K, bf16); var v = RoundBits(x.V, bf16); var dO = RoundBits(x.DO, bf16);
        float[] dRem = zeroDRem ? new float[x.DRem.Length] : x.DRem;
        double scale = 1.0 / Math.Sqrt(headDim);
        var gradients = Float64Reference.Backward(q.Values, k.Values, v.Values, dO.Values, TestInputs.ToDouble(dRem),
            batch, heads, length, headDim, scale, attendCurrent);
        foreach (bool split in new[] { false, true })
        {
            var run = Run(bf16, split, shape, q.Bits, k.Bits, v.Bits, dO.Bits, dRem, (float)scale, attendCurrent);
            var (dkError, dkFloor) = GradientError(run.DK, gradients.DK, bf16);
            var (dvError, dvFloor) = GradientError(run.DV, gradients.DV, bf16);
            TestContext.Out.WriteLine($"{Backend} {(bf16 ? "bf16" : "fp16")} {(split ? "split" : "rounded")} {kind} T={length} " +
                $"D={headDim} {(attendCurrent ? "AttendCurrent" : "Strict")} {(zeroDRem ? "dRem=0" : "dRem")}: rel RMS " +
                $"dk {dkError:E2} ({Ratio(dkError, dkFloor)} x floor {dkFloor:E2}), dv {dvError:E2} ({Ratio(dvError, dvFloor)} x floor {dvFloor:E2})");
            Assert.Multiple(() =>
            {
                Assert.That(dkError, Is.LessThanOrEqualTo(2 * dkFloor), $"DK ({(split ? "split" : "rounded")})");
                Assert.That(dvError, Is.LessThanOrEqualTo(2 * dvFloor), $"DV ({(split ? "split" : "rounded")})");
            });
        }
    }

    /// <summary>(b) Repeat runs are bitwise identical (every output summed by one owner in a fixed order).</summary>
    [TestCase(true, 130, 128, false, false)]
    [TestCase(false, 200, 64, true, true)]
    public void RepeatsBitwise(bool bf16, int length, int headDim, bool attendCurrent, bool split)
    {
        if (!Backends.RunsEmulatedMmaCase(Backend, length, headDim))
            Assert.Ignore(Backends.EmulatedMmaSkip);
        var shape = new AttentionShape(1, 2, length, headDim);
        var x = TestInputs.Create(InputKind.Standard, 1, 2, length, headDim, seed: 5 * length + headDim);
        var q = RoundBits(x.Q, bf16); var k = RoundBits(x.K, bf16); var v = RoundBits(x.V, bf16); var dO = RoundBits(x.DO, bf16);
        float scale = (float)(1.0 / Math.Sqrt(headDim));
        var first = Run(bf16, split, shape, q.Bits, k.Bits, v.Bits, dO.Bits, x.DRem, scale, attendCurrent);
        var second = Run(bf16, split, shape, q.Bits, k.Bits, v.Bits, dO.Bits, x.DRem, scale, attendCurrent);
        Assert.Multiple(() =>
        {
            Assert.That(second.DK, Is.EqualTo(first.DK).AsCollection, "DK repeats");
            Assert.That(second.DV, Is.EqualTo(first.DV).AsCollection, "DV repeats");
        });
    }

    public static IEnumerable<TestCaseData> PoisonCases()
    {
        // T = 70 with two heads: the rows of head 1 are what lies past head 0's end (its padding up to 128 rows), and
        // head 0's last key is seen by no row without AttendCurrent.
        const int T = 70;
        foreach (bool attend in new[] { false, true })
        {
            var poisons = new List<Poison>
            {
                // Head 1, first rows: past head 0's T (its last key block's padding).
                new(MaskInput.Q, 1, 0, 3, float.NaN), new(MaskInput.K, 1, 1, 0, float.PositiveInfinity),
                new(MaskInput.V, 1, 2, 5, float.NaN), new(MaskInput.DO, 1, 0, 7, float.NegativeInfinity),
                // Diagonal row block of key block 0: q of row 40 and dO of row 5 (one column), seen by few keys.
                new(MaskInput.Q, 0, 40, 11, float.PositiveInfinity), new(MaskInput.DO, 0, 5, 3, float.NaN),
                // Diagonal row block of key block 1 (rows 64 .. 69): dO of row 66 in one column.
                new(MaskInput.DO, 0, 66, 20, float.PositiveInfinity),
                // A key and value late in the sequence: only the rows after it see it.
                new(MaskInput.K, 0, 67, 9, float.NaN), new(MaskInput.V, 0, 68, 1, float.NegativeInfinity),
            };
            if (!attend)
            {
                // Head 0's last key: no row sees it.
                poisons.Add(new(MaskInput.K, 0, T - 1, 2, float.NaN));
                poisons.Add(new(MaskInput.V, 0, T - 1, 4, float.PositiveInfinity));
            }
            foreach (bool bf16 in new[] { true, false })
                foreach (int d in new[] { 64, 128 })
                    yield return new TestCaseData(bf16, d, attend, poisons.ToArray()).SetArgDisplayNames(
                        bf16 ? "bf16" : "fp16", $"D={d}", attend ? "AttendCurrent" : "Strict", $"{poisons.Count} poisons");
        }
    }

    /// <summary>
    /// (c) Non-finite q, k, v and dO where the dependency rule (<see cref="MaskDependencies"/>) says a gradient cannot
    /// see them: every dk and dv element the rule calls independent of all poisons is bitwise what the clean run
    /// gives, and a key no row sees has dk = dv = 0.
    /// </summary>
    [TestCaseSource(nameof(PoisonCases))]
    public void PoisonedInputsReachOnlyWhatTheyMay(bool bf16, int headDim, bool attendCurrent, Poison[] poisons)
    {
        if (Backend == Backends.Cpu && (headDim > 64 || !bf16 || attendCurrent))
            Assert.Ignore("CUDA only but for one case (the CPU accelerator emulates the mma thread by thread)");
        const int length = 70, heads = 2;
        var shape = new AttentionShape(1, heads, length, headDim);
        var x = TestInputs.Create(InputKind.Standard, 1, heads, length, headDim, seed: 31 + headDim);
        var q = RoundBits(x.Q, bf16); var k = RoundBits(x.K, bf16); var v = RoundBits(x.V, bf16); var dO = RoundBits(x.DO, bf16);
        float scale = (float)(1.0 / Math.Sqrt(headDim));
        var clean = Run(bf16, false, shape, q.Bits, k.Bits, v.Bits, dO.Bits, x.DRem, scale, attendCurrent);
        ushort[] qp = (ushort[])q.Bits.Clone(), kp = (ushort[])k.Bits.Clone(), vp = (ushort[])v.Bits.Clone(), dOp = (ushort[])dO.Bits.Clone();
        foreach (var p in poisons)
        {
            int at = (p.Head * length + p.Token) * headDim + p.Column;
            ushort bits = FromDouble(p.Value, bf16);
            switch (p.Input)
            {
                case MaskInput.Q: qp[at] = bits; break;
                case MaskInput.K: kp[at] = bits; break;
                case MaskInput.V: vp[at] = bits; break;
                case MaskInput.DO: dOp[at] = bits; break;
                default: throw new ArgumentOutOfRangeException(nameof(poisons));
            }
        }
        var poisoned = Run(bf16, false, shape, qp, kp, vp, dOp, x.DRem, scale, attendCurrent);
        int changedIndependent = 0, dependent = 0;
        string? first = null;
        foreach (var (output, name, cleanBits, poisonedBits) in new[]
                 { (MaskOutput.DK, "dk", clean.DK, poisoned.DK), (MaskOutput.DV, "dv", clean.DV, poisoned.DV) })
        {
            for (int h = 0; h < heads; h++)
                for (int token = 0; token < length; token++)
                    for (int c = 0; c < headDim; c++)
                    {
                        int at = (h * length + token) * headDim + c;
                        if (MaskDependencies.MayDepend(output, h, token, c, poisons, length, attendCurrent))
                        {
                            dependent++;
                            continue;
                        }
                        if (cleanBits[at] != poisonedBits[at])
                        {
                            changedIndependent++;
                            first ??= $"{name}[{h},{token},{c}]: clean {ToDouble(cleanBits[at], bf16)}, poisoned {ToDouble(poisonedBits[at], bf16)}";
                        }
                    }
        }
        TestContext.Out.WriteLine($"{poisons.Length} poisons: {dependent} outputs may depend on them, {changedIndependent} independent ones changed");
        Assert.That(changedIndependent, Is.Zero, $"independent outputs changed; first: {first}");
        if (!attendCurrent)
        {
            for (int h = 0; h < heads; h++)
            {
                int last = (h * length + length - 1) * headDim;
                Assert.That(Enumerable.Range(0, headDim).All(c => ToDouble(poisoned.DK[last + c], bf16) == 0
                    && ToDouble(poisoned.DV[last + c], bf16) == 0), $"head {h}: the unseen last key's dk and dv are zero");
            }
        }
    }

    /// <summary>CUDA only (the simulators would take minutes): a long sequence against float64.</summary>
    [TestCase(true, 1024, 128)]
    [TestCase(false, 1024, 64)]
    public void LongSequenceOnCuda(bool bf16, int length, int headDim)
    {
        if (Backend != Backends.Cuda)
            Assert.Ignore("CUDA only: the CPU accelerator would take minutes");
        var shape = new AttentionShape(1, 2, length, headDim);
        var x = TestInputs.Create(InputKind.Standard, 1, 2, length, headDim, seed: 29);
        var q = RoundBits(x.Q, bf16); var k = RoundBits(x.K, bf16); var v = RoundBits(x.V, bf16); var dO = RoundBits(x.DO, bf16);
        double scale = 1.0 / Math.Sqrt(headDim);
        var gradients = Float64Reference.Backward(q.Values, k.Values, v.Values, dO.Values, TestInputs.ToDouble(x.DRem),
            1, 2, length, headDim, scale, false);
        foreach (bool split in new[] { false, true })
        {
            var run = Run(bf16, split, shape, q.Bits, k.Bits, v.Bits, dO.Bits, x.DRem, (float)scale, false);
            var (dkError, dkFloor) = GradientError(run.DK, gradients.DK, bf16);
            var (dvError, dvFloor) = GradientError(run.DV, gradients.DV, bf16);
            TestContext.Out.WriteLine($"{(bf16 ? "bf16" : "fp16")} {(split ? "split" : "rounded")} T={length} D={headDim}: rel RMS " +
                $"dk {dkError:E2} ({Ratio(dkError, dkFloor)} x floor), dv {dvError:E2} ({Ratio(dvError, dvFloor)} x floor)");
            Assert.Multiple(() =>
            {
                Assert.That(dkError, Is.LessThanOrEqualTo(2 * dkFloor), "DK");
                Assert.That(dvError, Is.LessThanOrEqualTo(2 * dvFloor), "DV");
            });
        }
    }

    /// <summary>
    /// CUDA only: times the pass alone at B=4 H=12 T=4096 D=128 and B=4 H=16 T=4096 D=64, bf16 and fp16, rounded and
    /// split, and prints milliseconds and TFLOP/s counting the pass's four causal products (S = Q K^T, dO V^T, dv and dk:
    /// 4 x 2 T^2 D / 2 = 4 T^2 D per head), and the registers, local memory and residency the driver reports. The acc
    /// snapshots are the tensor-core forward's, the P snapshots zero (the work does not depend on them). Asserts nothing
    /// but finite outputs.
    /// </summary>
    [TestCase(128)]
    [TestCase(64)]
    public void TimingOnCuda(int headDim)
    {
        if (Backend != Backends.Cuda)
            Assert.Ignore("CUDA only");
        int batch = 4, heads = headDim == 128 ? 12 : 16, length = 4096;
        var shape = new AttentionShape(batch, heads, length, headDim);
        var random = new Random(3);
        var acc = Accelerator;
        int tiles = Snapshots.TileCount(length);
        ushort[] Make(bool bf16) => Enumerable.Range(0, (int)shape.TensorLength)
            .Select(_ => FromDouble(0.25 * (random.NextDouble() * 2 - 1), bf16)).ToArray();
        foreach (bool bf16 in new[] { true, false })
        {
            using var qb = acc.Allocate1D(Make(bf16));
            using var kb = acc.Allocate1D(Make(bf16));
            using var vb = acc.Allocate1D(Make(bf16));
            using var dOb = acc.Allocate1D(Make(bf16));
            using var ob = acc.Allocate1D<ushort>(shape.TensorLength);
            using var dk = acc.Allocate1D<ushort>(shape.TensorLength);
            using var dv = acc.Allocate1D<ushort>(shape.TensorLength);
            using var dRem = acc.Allocate1D(Enumerable.Range(0, (int)shape.RowCount).Select(_ => (float)random.NextDouble()).ToArray());
            using var rem = acc.Allocate1D<float>(shape.RowCount);
            using var logRem = acc.Allocate1D<float>(shape.RowCount);
            using var accSnapshots = acc.Allocate1D<float>(shape.RowCount * tiles);
            using var prefixSnapshots = acc.Allocate1D<float>(shape.RowCount * tiles);
            prefixSnapshots.MemSetToZero();
            var forwardArgs = new TensorCoreForwardArgs
            {
                Q = qb.View, K = kb.View, V = vb.View, O = ob.View, Rem = rem.View, LogRem = logRem.View,
                AccSnapshots = accSnapshots.View, WriteSnapshots = 1, SnapshotTiles = tiles,
                Rows = AttentionRows.Contiguous(shape.Heads, shape.KeyValueHeads, shape.Length, shape.HeadDim), Length = length, HeadDim = headDim, Scale = (float)(1.0 / Math.Sqrt(headDim)),
            };
            Launcher.Launch(ForwardFor(bf16), acc.DefaultStream, shape, forwardArgs);
            var args = new BackwardArgs<ushort>
            {
                Q = qb.View, K = kb.View, V = vb.View, DO = dOb.View, DRem = dRem.View, LogRem = logRem.View,
                AccSnapshots = accSnapshots.View, PrefixSnapshots = prefixSnapshots.View,
                DQ = ArrayView<ushort>.Empty, DK = dk.View, DV = dv.View, AccumulatorScratch = ArrayView<float>.Empty,
                Rows = AttentionRows.Contiguous(shape.Heads, shape.KeyValueHeads, shape.Length, shape.HeadDim), Length = length, HeadDim = headDim, SnapshotTiles = tiles, Scale = (float)(1.0 / Math.Sqrt(headDim)),
            };
            foreach (bool split in new[] { false, true })
            {
                var kernel = KernelFor(bf16, split);
                Launcher.Launch(kernel, acc.DefaultStream, shape, args);
                acc.Synchronize();
                const int runs = 10;
                var watch = System.Diagnostics.Stopwatch.StartNew();
                for (int r = 0; r < runs; r++)
                    Launcher.Launch(kernel, acc.DefaultStream, shape, args);
                acc.Synchronize();
                double ms = watch.Elapsed.TotalMilliseconds / runs;
                double flops = 4.0 * length * length * headDim * batch * heads;
                TestContext.Out.WriteLine($"dk/dv {(bf16 ? "bf16" : "fp16")} {(split ? "split" : "rounded")} B={batch} H={heads} T={length} " +
                    $"D={headDim}: {ms:F3} ms, {flops / ms / 1e9:F1} TFLOP/s (4 T^2 D per head: S, dO V^T, dv, dk over the causal half)");
                if (CudaDriver.Loaded.TryGetValue("TensorCoreBackwardKeyKernel.Kernel", out var resources))
                    TestContext.Out.WriteLine($"  {resources}");
                var dkBits = dk.GetAsArray1D();
                var dvBits = dv.GetAsArray1D();
                Assert.That(dkBits.All(b => double.IsFinite(ToDouble(b, bf16))) && dvBits.All(b => double.IsFinite(ToDouble(b, bf16))),
                    "finite dk and dv");
            }
        }
    }

    /// <summary>
    /// The PTX for SM_90 (no GPU needed): the mma of the storage type only, as many as designed (16 in the phase-A
    /// loop body: S and dO V^T for 32 head dimensions, 8 each; 64 in phase B: 16 n-tiles x 4 k-steps, 32 of them
    /// under the D = 128 branch; 128 with split weights), every local declaration a 4-byte inline-PTX operand slot,
    /// and no local memory left once the loader's rewrite (<see cref="PtxOperandSlots"/>) made them registers.
    /// </summary>
    [TestCase(typeof(Bf16Storage), "bf16.bf16", "f16.f16", false)]
    [TestCase(typeof(Fp16Storage), "f16.f16", "bf16.bf16", false)]
    [TestCase(typeof(Bf16Storage), "bf16.bf16", "f16.f16", true)]
    [TestCase(typeof(Fp16Storage), "f16.f16", "bf16.bf16", true)]
    public void PtxUsesMmaAndOnlyOperandSlots(Type storage, string type, string otherType, bool split)
    {
        if (Backend != Backends.Cpu)
            Assert.Ignore("the PTX is compiled without a device: once, in the CPU fixture");
        var kernel = typeof(TensorCoreBackwardKeyKernel)
            .GetMethod(nameof(TensorCoreBackwardKeyKernel.Kernel), BindingFlags.Public | BindingFlags.Static)!
            .MakeGenericMethod(storage, split ? typeof(SplitWeights) : typeof(RoundedWeights));
        string ptx = Ptx.Compile(kernel);
        bool promotes = PtxOperandSlots.TryPromote(ptx, out string promoted);
        if (Environment.GetEnvironmentVariable("STICKBREAKING_PTX_DIR") is { Length: > 0 } dir)
            System.IO.File.WriteAllText(System.IO.Path.Combine(dir, $"TensorCoreBackwardKey.{storage.Name}.{(split ? "Split" : "Rounded")}.ptx"), promoted);
        int Count(string pattern) => Regex.Matches(ptx, pattern).Count;
        int mma = Count(@"mma\.sync\.aligned\.m16n8k16\.row\.col\.f32\." + Regex.Escape(type) + @"\.f32");
        int slots = Count(@"\.local \.align 4 \.b8 __local_depot\d+\[4\];");
        int localDeclarations = Count(@"\.local \.align");
        TestContext.Out.WriteLine($"{storage.Name} {(split ? "split" : "rounded")}: mma.sync {mma}, 4-byte local slots {slots} of " +
            $"{localDeclarations} local declarations, ld.shared.v4 {Count(@"ld\.shared\.v4\.b32")}, shfl {Count(@"shfl\.")}, " +
            $"ex2 {Count(@"ex2\.approx")}, rcp {Count(@"rcp\.approx")}, bar.sync {Count(@"bar\.sync")}, lines {ptx.Split('\n').Length}");
        Assert.Multiple(() =>
        {
            Assert.That(mma, Is.EqualTo(4 * 16 + (split ? 128 : 64)), "mma.sync of the storage type: phase A's four head-dimension slices, phase B");
            Assert.That(ptx, Does.Not.Contain("." + otherType + "."), "no mma of the other type");
            Assert.That(localDeclarations, Is.EqualTo(slots), "every local declaration is a 4-byte operand slot");
            Assert.That(promotes, Is.True, "the loader's rewrite applies (PtxOperandSlots)");
            Assert.That(Regex.Matches(promoted, @"\.local\b|__local_depot"), Is.Empty, "no local memory once the slots are registers");
            Assert.That(Regex.Matches(promoted, @"mma\.sync").Count, Is.EqualTo(mma), "the rewrite keeps every mma");
        });
    }

    private static KernelLaunch<BackwardArgs<ushort>> KernelFor(bool bf16, bool split) =>
        (bf16, split) switch
        {
            (true, false) => TensorCoreBackwardKeyKernel.LaunchFor<Bf16Storage, RoundedWeights>(),
            (true, true) => TensorCoreBackwardKeyKernel.LaunchFor<Bf16Storage, SplitWeights>(),
            (false, false) => TensorCoreBackwardKeyKernel.LaunchFor<Fp16Storage, RoundedWeights>(),
            (false, true) => TensorCoreBackwardKeyKernel.LaunchFor<Fp16Storage, SplitWeights>(),
        };

    private static KernelLaunch<TensorCoreForwardArgs> ForwardFor(bool bf16) =>
        bf16 ? TensorCoreForwardKernel.LaunchFor<Bf16Storage, SplitWeights>() : TensorCoreForwardKernel.LaunchFor<Fp16Storage, SplitWeights>();

    private sealed record Result(ushort[] DK, ushort[] DV);

    /// <summary>
    /// The tensor-core forward (snapshots written), the portable 16-bit pass 1 (P snapshots) and this pass, through the
    /// library's launch layer; the unwritten snapshot slots hold NaN (the pass must not read them).
    /// </summary>
    private Result Run(bool bf16, bool split, AttentionShape shape, ushort[] q, ushort[] k, ushort[] v, ushort[] dO,
        float[] dRem, float scale, bool attendCurrent)
    {
        bool storage = bf16;
        var acc = Accelerator;
        long n = shape.TensorLength;
        int tiles = Snapshots.TileCount(shape.Length);
        using var qb = acc.Allocate1D(q);
        using var kb = acc.Allocate1D(k);
        using var vb = acc.Allocate1D(v);
        using var dOb = acc.Allocate1D(dO);
        using var dRemb = acc.Allocate1D(dRem);
        using var o = acc.Allocate1D<ushort>(n);
        using var dq = acc.Allocate1D<ushort>(n);
        using var dk = acc.Allocate1D<ushort>(n);
        using var dv = acc.Allocate1D<ushort>(n);
        using var rem = acc.Allocate1D<float>(shape.RowCount);
        using var logRem = acc.Allocate1D<float>(shape.RowCount);
        using var accSnapshots = acc.Allocate1D<float>(shape.RowCount * tiles);
        using var prefixSnapshots = acc.Allocate1D<float>(shape.RowCount * tiles);
        dk.MemSetToZero();
        dv.MemSetToZero();
        // Unwritten snapshot slots hold NaN: the pass must not read them.
        accSnapshots.CopyFromCPU(Enumerable.Repeat(float.NaN, (int)(shape.RowCount * tiles)).ToArray());
        prefixSnapshots.CopyFromCPU(Enumerable.Repeat(float.NaN, (int)(shape.RowCount * tiles)).ToArray());
        var stream = acc.DefaultStream;
        var forwardArgs = new TensorCoreForwardArgs
        {
            Q = qb.View, K = kb.View, V = vb.View, O = o.View, Rem = rem.View, LogRem = logRem.View,
            AccSnapshots = accSnapshots.View, WriteSnapshots = 1, SnapshotTiles = tiles,
            Rows = AttentionRows.Contiguous(shape.Heads, shape.KeyValueHeads, shape.Length, shape.HeadDim), Length = shape.Length, HeadDim = shape.HeadDim, AttendCurrent = attendCurrent ? 1 : 0, Scale = scale,
        };
        Launcher.Launch(ForwardFor(storage), stream, shape, forwardArgs);
        var args = new BackwardArgs<ushort>
        {
            Q = qb.View, K = kb.View, V = vb.View, DO = dOb.View, DRem = dRemb.View, LogRem = logRem.View,
            AccSnapshots = accSnapshots.View, PrefixSnapshots = prefixSnapshots.View,
            DQ = dq.View, DK = dk.View, DV = dv.View, AccumulatorScratch = ArrayView<float>.Empty,
            Rows = AttentionRows.Contiguous(shape.Heads, shape.KeyValueHeads, shape.Length, shape.HeadDim), Length = shape.Length, HeadDim = shape.HeadDim, AttendCurrent = attendCurrent ? 1 : 0, SnapshotTiles = tiles,
            Scale = scale,
        };
        Launcher.Launch(storage ? BackwardQueryKernel.LaunchBf16 : BackwardQueryKernel.LaunchFp16, stream, shape, args);
        Launcher.Launch(KernelFor(storage, split), stream, shape, args);
        stream.Synchronize();
        return new Result(dk.GetAsArray1D(), dv.GetAsArray1D());
    }

    private static string Ratio(double error, double floor) => floor > 0 ? (error / floor).ToString("F2") : "-";

    /// <summary>Relative RMS error of 16-bit gradients against the exact ones, and the floor: that of round(exact).</summary>
    private static (double Error, double Floor) GradientError(ushort[] actual, double[] exact, bool bf16) =>
        (RelativeRms(actual.Select(b => ToDouble(b, bf16)).ToArray(), exact),
         RelativeRms(exact.Select(e => ToDouble(FromDouble(e, bf16), bf16)).ToArray(), exact));
}
