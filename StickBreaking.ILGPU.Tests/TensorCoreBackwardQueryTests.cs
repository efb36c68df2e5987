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
/// The tensor-core backward pass 1 (<see cref="TensorCoreBackwardQueryKernel"/>: dq and the P snapshots) for fp16
/// and bf16 storage. The acc snapshots come from the tensor-core forward on the same rounded inputs (as in training);
/// dq is held to the float64 reference computed from those rounded inputs, and the P snapshots to those of the
/// portable 16-bit pass 1 (<see cref="BackwardQueryKernel"/>) reading the same acc snapshots. On the CPU accelerator
/// the mma runs as an emulation of its fragment layout, on CUDA as the instruction.
/// <para>
/// Tolerance of dq (docs/math.md, "16-bit storage"): relative RMS within twice the floor, the relative RMS of
/// round(dq_exact) - dq_exact, the error no 16-bit output can beat (the ratio is printed; the aim is 1.5).
/// P snapshots are fp32 sums of fp32 terms, computed in another order and with A from the product of 1 - beta
/// rather than the exp of a sum of logs: 1e-5 of the row's largest |P| plus 1e-6.
/// </para>
/// </summary>
public sealed class TensorCoreBackwardQueryTests(string backend) : TensorCoreFixture(backend, "the tensor-core backward")
{
    /// <summary>
    /// (a) dq against float64 on the rounded inputs, rounded and split dz, and (b) the P snapshots against the
    /// portable pass 1, for every (row, 32-key tile) in which the row sees a key.
    /// </summary>
    [TestCase(true, InputKind.Standard, 1, 64, false, true)]
    [TestCase(false, InputKind.Standard, 1, 128, true, false)]
    [TestCase(true, InputKind.Standard, 15, 128, true, true)]
    [TestCase(false, InputKind.Standard, 15, 64, false, true)]
    [TestCase(true, InputKind.Standard, 64, 64, false, false)]
    [TestCase(false, InputKind.Standard, 64, 128, true, true)]
    [TestCase(true, InputKind.Standard, 65, 128, false, true)]
    [TestCase(false, InputKind.Standard, 65, 64, true, false)]
    [TestCase(true, InputKind.Standard, 130, 64, true, true)]
    [TestCase(false, InputKind.Standard, 130, 128, false, true)]
    [TestCase(true, InputKind.Standard, 200, 128, true, false)]
    [TestCase(false, InputKind.Standard, 200, 64, false, true)]
    [TestCase(true, InputKind.Saturated, 130, 128, false, true)]
    [TestCase(false, InputKind.Saturated, 200, 64, true, true)]
    [TestCase(true, InputKind.Saturated, 65, 64, true, false)]
    [TestCase(false, InputKind.Saturated, 130, 128, false, false)]
    [TestCase(true, InputKind.UsedUp, 200, 64, false, true)]
    [TestCase(false, InputKind.UsedUp, 130, 128, true, true)]
    [TestCase(true, InputKind.UsedUp, 130, 128, true, false)]
    [TestCase(false, InputKind.UsedUp, 65, 64, false, false)]
    public void MatchesReferenceAndPortableSnapshots(bool bf16, InputKind kind, int length, int headDim,
        bool attendCurrent, bool withDRem)
    {
        if (!Backends.RunsEmulatedMmaCase(Backend, length, headDim))
            Assert.Ignore(Backends.EmulatedMmaSkip);
        var shape = new AttentionShape(1, 1, length, headDim);
        var x = TestInputs.Create(kind, 1, 1, length, headDim, seed: 11 * length + headDim + (bf16 ? 1 : 0));
        if (!withDRem)
            x = x.WithZeroDRem();
        var inputs = Inputs.Rounded(x, bf16);
        double scale = 1.0 / Math.Sqrt(headDim);
        var gradients = Float64Reference.Backward(inputs.Q.Values, inputs.K.Values, inputs.V.Values, inputs.DO.Values,
            TestInputs.ToDouble(x.DRem), 1, 1, length, headDim, scale, attendCurrent);
        var portable = Run(bf16, split: false, shape, inputs, x.DRem, (float)scale, attendCurrent, portable: true);
        double pWorst = double.NegativeInfinity;
        foreach (bool split in new[] { false, true })
        {
            var run = Run(bf16, split, shape, inputs, x.DRem, (float)scale, attendCurrent);
            var (error, floor) = GradientError(run.DQ, gradients.DQ, bf16);
            double ratio = error / Math.Max(floor, 1e-300);
            pWorst = Math.Max(pWorst, PrefixExcess(run.Prefix, portable.Prefix!, length, attendCurrent));
            TestContext.Out.WriteLine($"{(bf16 ? "bf16" : "fp16")} {(split ? "split" : "rounded")} {kind} T={length} D={headDim} " +
                $"{(attendCurrent ? "AttendCurrent" : "strict")} dRem {(withDRem ? "N" : "0")}: dq rel RMS {error:E2} " +
                $"(floor {floor:E2}, ratio {ratio:F2}); portable dq ratio " +
                $"{GradientError(portable.DQ, gradients.DQ, bf16).Error / Math.Max(floor, 1e-300):F2}; P excess {pWorst:E2}");
            Assert.That(error, Is.LessThanOrEqualTo(2 * floor), split ? "dq (split dz)" : "dq (rounded dz)");
        }
        Assert.That(pWorst, Is.LessThanOrEqualTo(0), "P snapshots within 1e-5 max|P| + 1e-6 of the portable pass");
    }

    /// <summary>(c) Repeated runs are bitwise identical (dq and the P snapshots).</summary>
    [TestCase(true, 130, 128, false)]
    [TestCase(false, 97, 64, true)]
    public void RunsRepeatBitwise(bool bf16, int length, int headDim, bool attendCurrent)
    {
        if (!Backends.RunsEmulatedMmaCase(Backend, length, headDim))
            Assert.Ignore(Backends.EmulatedMmaSkip);
        var shape = new AttentionShape(1, 2, length, headDim);
        var x = TestInputs.Create(InputKind.LongRange, 1, 2, length, headDim, seed: 5 + length);
        var inputs = Inputs.Rounded(x, bf16);
        foreach (bool split in new[] { false, true })
        {
            var first = Run(bf16, split, shape, inputs, x.DRem, 0.1f, attendCurrent);
            var second = Run(bf16, split, shape, inputs, x.DRem, 0.1f, attendCurrent);
            Assert.Multiple(() =>
            {
                Assert.That(second.DQ, Is.EqualTo(first.DQ), "dq repeats");
                Assert.That(second.Prefix, Is.EqualTo(first.Prefix), "P snapshots repeat");
            });
        }
    }

    /// <summary>
    /// (d) Poisoned inputs: a NaN or infinity in k, v, q or dO leaves bitwise unchanged the dq of every row that the
    /// dependency rule (<see cref="MaskDependencies"/>) calls independent of it. Keys 70 (in row block 1's diagonal
    /// tile, where rows 64 .. 70 do not see it) and 5 (block 0's), a query row (q and dO), and the next head's rows,
    /// which lie in memory right past T (a non-multiple of 64) of the first head.
    /// </summary>
    [TestCase(true, false, "key", 70)]
    [TestCase(false, true, "key", 70)]
    [TestCase(true, true, "key", 5)]
    [TestCase(false, false, "key", 5)]
    [TestCase(true, false, "row", 40)]
    [TestCase(false, true, "row", 90)]
    [TestCase(true, true, "past", 0)]
    [TestCase(false, false, "past", 0)]
    public void PoisonedInputsReachOnlyDependentRows(bool bf16, bool attendCurrent, string where, int token)
    {
        if (Backend == Backends.Cpu && (!bf16 || where != "key" || token != 70))
            Assert.Ignore("CUDA only but for one case (the CPU accelerator emulates the mma thread by thread)");
        int length = 100, headDim = 64, heads = 2;
        var shape = new AttentionShape(1, heads, length, headDim);
        var x = TestInputs.Create(InputKind.Standard, 1, heads, length, headDim, seed: 31);
        var clean = Inputs.Rounded(x, bf16);
        var poisoned = Inputs.Rounded(x, bf16);
        var poisons = new List<Poison>();
        void Set((ushort[] Bits, double[] Values) tensor, MaskInput input, int head, int row, int d, double value)
        {
            tensor.Bits[((long)head * length + row) * headDim + d] = FromDouble(value, bf16);
            poisons.Add(new Poison(input, head, row, d, (float)value));
        }
        for (int d = 0; d < headDim; d += 5)
        {
            double bad = d % 2 == 0 ? double.NaN : double.PositiveInfinity;
            switch (where)
            {
                case "key":
                    Set(poisoned.K, MaskInput.K, 0, token, d, bad);
                    Set(poisoned.V, MaskInput.V, 0, token, d, -bad);
                    break;
                case "row":
                    Set(poisoned.Q, MaskInput.Q, 0, token, d, bad);
                    Set(poisoned.DO, MaskInput.DO, 0, token, d, bad);
                    break;
                default:
                    foreach (int row in new[] { 0, 1, 37 })
                    {
                        Set(poisoned.Q, MaskInput.Q, 1, row, d, bad);
                        Set(poisoned.K, MaskInput.K, 1, row, d, bad);
                        Set(poisoned.V, MaskInput.V, 1, row, d, bad);
                        Set(poisoned.DO, MaskInput.DO, 1, row, d, bad);
                    }
                    break;
            }
        }
        foreach (bool split in new[] { false, true })
        {
            var expected = Run(bf16, split, shape, clean, x.DRem, 0.125f, attendCurrent);
            var run = Run(bf16, split, shape, poisoned, x.DRem, 0.125f, attendCurrent);
            int checkedRows = 0, nonFinite = 0;
            for (int head = 0; head < heads; head++)
            {
                for (int row = 0; row < length; row++)
                {
                    bool independent = !MaskDependencies.MayDepend(MaskOutput.DQ, head, row, 0, poisons, length, attendCurrent);
                    for (int d = 0; d < headDim; d++)
                    {
                        long i = ((long)head * length + row) * headDim + d;
                        if (independent)
                            Assert.That(run.DQ[i], Is.EqualTo(expected.DQ[i]), $"{where}: dq[{head},{row},{d}] must not change");
                        else if (!double.IsFinite(ToDouble(run.DQ[i], bf16)))
                            nonFinite++;
                    }
                    checkedRows += independent ? 1 : 0;
                }
            }
            TestContext.Out.WriteLine($"{where} {token} {(split ? "split" : "rounded")}: {checkedRows} rows unchanged, " +
                $"{nonFinite} non-finite values in the dependent rows");
            if (where == "key")
                Assert.That(nonFinite, Is.GreaterThan(0), "the rows that see the key are poisoned");
        }
    }

    /// <summary>CUDA only: T = 1024 against float64 (dq) and the portable pass (P), both dz modes.</summary>
    [TestCase(true, 1024, 128, false)]
    [TestCase(false, 1024, 64, true)]
    public void LongSequenceOnCuda(bool bf16, int length, int headDim, bool attendCurrent)
    {
        if (Backend != Backends.Cuda)
            Assert.Ignore("CUDA only: the CPU accelerator would take minutes");
        var shape = new AttentionShape(1, 2, length, headDim);
        var x = TestInputs.Create(InputKind.Standard, 1, 2, length, headDim, seed: 29);
        var inputs = Inputs.Rounded(x, bf16);
        double scale = 1.0 / Math.Sqrt(headDim);
        var gradients = Float64Reference.Backward(inputs.Q.Values, inputs.K.Values, inputs.V.Values, inputs.DO.Values,
            TestInputs.ToDouble(x.DRem), 1, 2, length, headDim, scale, attendCurrent);
        var portable = Run(bf16, false, shape, inputs, x.DRem, (float)scale, attendCurrent, portable: true);
        foreach (bool split in new[] { false, true })
        {
            var run = Run(bf16, split, shape, inputs, x.DRem, (float)scale, attendCurrent);
            var (error, floor) = GradientError(run.DQ, gradients.DQ, bf16);
            double pExcess = PrefixExcess(run.Prefix, portable.Prefix!, length, attendCurrent, heads: 2);
            TestContext.Out.WriteLine($"{(bf16 ? "bf16" : "fp16")} {(split ? "split" : "rounded")} T={length} D={headDim}: " +
                $"dq rel RMS {error:E2} ({error / floor:F2} x floor {floor:E2}), P excess {pExcess:E2}");
            Assert.Multiple(() =>
            {
                Assert.That(error, Is.LessThanOrEqualTo(2 * floor), "dq");
                Assert.That(pExcess, Is.LessThanOrEqualTo(0), "P snapshots");
            });
        }
    }

    /// <summary>
    /// CUDA only: times the four specializations at B=4 H=12 T=4096 D=128 and B=4 H=16 T=4096 D=64 and prints
    /// milliseconds and TFLOP/s, counting the three GEMMs this pass runs (S = Q K^T, dO V^T, dq += dz K: 6 T^2 D / 2
    /// per head, causal; the brief's count of 8 T^2 D / 2 is printed beside it), and the kernel's registers.
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
        int tiles = Snapshots.TileCount(length);
        var acc = Accelerator;
        foreach (bool bf16 in new[] { true, false })
        {
            ushort[] Make(double amplitude) => Enumerable.Range(0, (int)shape.TensorLength)
                .Select(_ => FromDouble(amplitude * (random.NextDouble() * 2 - 1), bf16)).ToArray();
            using var qb = acc.Allocate1D(Make(0.25));
            using var kb = acc.Allocate1D(Make(0.25));
            using var vb = acc.Allocate1D(Make(0.25));
            using var dOb = acc.Allocate1D(Make(1.0));
            using var ob = acc.Allocate1D<ushort>(shape.TensorLength);
            using var dqb = acc.Allocate1D<ushort>(shape.TensorLength);
            using var dRem = acc.Allocate1D(Enumerable.Range(0, (int)shape.RowCount).Select(i => (float)Math.Sin(i)).ToArray());
            using var rem = acc.Allocate1D<float>(shape.RowCount);
            using var logRem = acc.Allocate1D<float>(shape.RowCount);
            using var accSnapshots = acc.Allocate1D<float>(shape.RowCount * tiles);
            using var prefixSnapshots = acc.Allocate1D<float>(shape.RowCount * tiles);
            var forwardArgs = new TensorCoreForwardArgs
            {
                Q = qb.View, K = kb.View, V = vb.View, O = ob.View, Rem = rem.View, LogRem = logRem.View,
                AccSnapshots = accSnapshots.View, WriteSnapshots = 1, SnapshotTiles = tiles,
                Rows = AttentionRows.Contiguous(shape.Heads, shape.KeyValueHeads, shape.Length, shape.HeadDim), Length = length, HeadDim = headDim, Scale = (float)(1.0 / Math.Sqrt(headDim)),
            };
            Launcher.Launch(ForwardFor(bf16), acc.DefaultStream, shape, forwardArgs);
            var args = Args(acc, qb.View, kb.View, vb.View, dOb.View, dRem.View, logRem.View, accSnapshots.View,
                prefixSnapshots.View, dqb.View, shape, tiles, (float)(1.0 / Math.Sqrt(headDim)), false);
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
                double flops = 6.0 * length * length * headDim / 2 * batch * heads;
                TestContext.Out.WriteLine($"{(bf16 ? "bf16" : "fp16")} {(split ? "split" : "rounded")} B={batch} H={heads} T={length} " +
                    $"D={headDim}: {ms:F3} ms, {flops / ms / 1e9:F1} TFLOP/s (3 GEMMs; {flops * 8 / 6 / ms / 1e9:F1} counting 8 T^2 D / 2)");
                if (CudaDriver.Loaded.TryGetValue("TensorCoreBackwardQueryKernel.Kernel", out var resources))
                    TestContext.Out.WriteLine($"  {resources}");
                Assert.That(dqb.GetAsArray1D().Take(1 << 16).All(b => double.IsFinite(ToDouble(b, bf16))), "finite dq");
            }
        }
    }

    /// <summary>
    /// The PTX for SM_90 (no GPU needed): mma.sync of the storage type only, as many as designed (16 per 32 head
    /// dimensions for each of S and dO V^T in the loop body, 64 for dq += dz K, 128 with split dz), every local
    /// declaration a 4-byte operand slot of inline PTX (10 per mma, 1 per conversion, ex2 and rcp), none left after
    /// <see cref="PtxOperandSlots.TryPromote"/> (the loader's rewrite).
    /// </summary>
    [TestCase(typeof(Bf16Storage), "bf16.bf16", "f16.f16", false)]
    [TestCase(typeof(Fp16Storage), "f16.f16", "bf16.bf16", false)]
    [TestCase(typeof(Bf16Storage), "bf16.bf16", "f16.f16", true)]
    [TestCase(typeof(Fp16Storage), "f16.f16", "bf16.bf16", true)]
    public void PtxUsesMmaAndOnlyOperandSlots(Type storage, string type, string otherType, bool split)
    {
        if (Backend != Backends.Cpu)
            Assert.Ignore("compiles PTX without a device: once, in the CPU fixture");
        var kernel = typeof(TensorCoreBackwardQueryKernel)
            .GetMethod(nameof(TensorCoreBackwardQueryKernel.Kernel), BindingFlags.Public | BindingFlags.Static)!
            .MakeGenericMethod(storage, split ? typeof(SplitWeights) : typeof(RoundedWeights));
        string ptx = Ptx.Compile(kernel,
            new KernelSpecialization(TensorCoreBackwardQueryKernel.GroupSize, TensorCoreBackwardQueryKernel.MinGroupsPerMultiprocessor));
        bool promotes = PtxOperandSlots.TryPromote(ptx, out string promoted);
        if (Environment.GetEnvironmentVariable("STICKBREAKING_PTX_DIR") is { Length: > 0 } dir)
            System.IO.File.WriteAllText(System.IO.Path.Combine(dir, $"TensorCoreBackwardQuery.{storage.Name}.{(split ? "Split" : "Rounded")}.ptx"), promoted);
        int Count(string pattern) => Regex.Matches(ptx, pattern).Count;
        int mma = Count(@"mma\.sync\.aligned\.m16n8k16\.row\.col\.f32\." + Regex.Escape(type) + @"\.f32");
        int slots = Count(@"\.local \.align 4 \.b8 __local_depot\d+\[4\];");
        int localDeclarations = Count(@"\.local \.align");
        int packs = Count(@"cvt\.rn\." + (type == "bf16.bf16" ? "bf16x2" : "f16x2") + @"\.f32");
        int approx = Count(@"(?:ex2|rcp)\.approx\.ftz\.f32");
        TestContext.Out.WriteLine($"{storage.Name} {(split ? "split" : "rounded")}: mma.sync {mma}, pair conversions {packs}, " +
            $"ex2/rcp {approx}, 4-byte local slots {slots} of {localDeclarations} local declarations, " +
            $"ld.shared.v4 {Count(@"ld\.shared\.v4\.b32")}, shfl {Count(@"shfl\.")}, lines {ptx.Split('\n').Length}");
        Assert.Multiple(() =>
        {
            Assert.That(mma, Is.EqualTo(4 * 2 * 16 + (split ? 128 : 64)), "mma.sync of the storage type: S and dO V^T over four head-dimension slices, dq");
            Assert.That(ptx, Does.Not.Contain("." + otherType + "."), "no mma of the other type");
            Assert.That(packs, Is.EqualTo(2 * (split ? 32 : 16) + 2 * 16), "pair conversions: 16 A fragments of dz (and 16 of its residuals) in the masked and the unmasked code, 2 rows x 16 n-tiles of dq");
            Assert.That(approx, Is.EqualTo(2 * 2 * 32 + 2), "per score ex2 and rcp once, 32 scores per thread, in the masked and the unmasked code; 2^acc per row");
            Assert.That(localDeclarations, Is.EqualTo(slots), "every local declaration is a 4-byte operand slot");
            Assert.That(slots, Is.EqualTo(10 * mma + packs + approx), "10 operand slots per mma, 1 per conversion, ex2 and rcp, nothing else");
            Assert.That(promotes, Is.True, "the loader's rewrite applies (PtxOperandSlots)");
            Assert.That(Regex.Matches(promoted, @"\.local\b|__local_depot"), Is.Empty, "no local memory once the slots are registers");
            Assert.That(Regex.Matches(promoted, @"mma\.sync").Count, Is.EqualTo(mma), "the rewrite keeps every mma");
        });
    }

    // ---------------------------------------------------------------------------------------------------------

    private sealed record Inputs((ushort[] Bits, double[] Values) Q, (ushort[] Bits, double[] Values) K,
        (ushort[] Bits, double[] Values) V, (ushort[] Bits, double[] Values) DO)
    {
        public static Inputs Rounded(AttentionInputs x, bool bf16) =>
            new(RoundBits(x.Q, bf16), RoundBits(x.K, bf16), RoundBits(x.V, bf16), RoundBits(x.DO, bf16));
    }

    private sealed record Result(ushort[] DQ, float[] Prefix);

    /// <summary>
    /// The tensor-core forward with snapshots (acc per row and 32-key tile), then pass 1: the tensor-core kernel, or
    /// with <paramref name="portable"/> the portable 16-bit pass (its own launch description) on the same snapshots.
    /// </summary>
    private Result Run(bool bf16, bool split, AttentionShape shape, Inputs x, float[] dRemValues, float scale,
        bool attendCurrent, bool portable = false)
    {
        var acc = Accelerator;
        int tiles = Snapshots.TileCount(shape.Length);
        using var qb = acc.Allocate1D(x.Q.Bits);
        using var kb = acc.Allocate1D(x.K.Bits);
        using var vb = acc.Allocate1D(x.V.Bits);
        using var dOb = acc.Allocate1D(x.DO.Bits);
        using var dRem = acc.Allocate1D(dRemValues);
        using var ob = acc.Allocate1D<ushort>(shape.TensorLength);
        using var dqb = acc.Allocate1D<ushort>(shape.TensorLength);
        using var rem = acc.Allocate1D<float>(shape.RowCount);
        using var logRem = acc.Allocate1D<float>(shape.RowCount);
        using var accSnapshots = acc.Allocate1D<float>(shape.RowCount * tiles);
        using var prefixSnapshots = acc.Allocate1D<float>(shape.RowCount * tiles);
        // Unwritten snapshots hold NaN: a kernel that read one where the row sees no key would show it.
        accSnapshots.CopyFromCPU(Enumerable.Repeat(float.NaN, (int)(shape.RowCount * tiles)).ToArray());
        prefixSnapshots.MemSetToZero();
        dqb.MemSetToZero();
        var forwardArgs = new TensorCoreForwardArgs
        {
            Q = qb.View, K = kb.View, V = vb.View, O = ob.View, Rem = rem.View, LogRem = logRem.View,
            AccSnapshots = accSnapshots.View, WriteSnapshots = 1, SnapshotTiles = tiles,
            Rows = AttentionRows.Contiguous(shape.Heads, shape.KeyValueHeads, shape.Length, shape.HeadDim), Length = shape.Length, HeadDim = shape.HeadDim, AttendCurrent = attendCurrent ? 1 : 0, Scale = scale,
        };
        Launcher.Launch(ForwardFor(bf16), acc.DefaultStream, shape, forwardArgs);
        var args = Args(acc, qb.View, kb.View, vb.View, dOb.View, dRem.View, logRem.View, accSnapshots.View, prefixSnapshots.View,
            dqb.View, shape, tiles, scale, attendCurrent);
        var pass = portable ? (bf16 ? BackwardQueryKernel.LaunchBf16 : BackwardQueryKernel.LaunchFp16) : KernelFor(bf16, split);
        Launcher.Launch(pass, acc.DefaultStream, shape, args);
        acc.Synchronize();
        return new Result(dqb.GetAsArray1D(), prefixSnapshots.GetAsArray1D());
    }

    private static BackwardArgs<ushort> Args(Accelerator accelerator, ArrayView<ushort> q, ArrayView<ushort> k, ArrayView<ushort> v,
        ArrayView<ushort> dO, ArrayView<float> dRem, ArrayView<float> logRem, ArrayView<float> accSnapshots,
        ArrayView<float> prefixSnapshots, ArrayView<ushort> dq, AttentionShape shape, int tiles, float scale,
        bool attendCurrent) => new BackwardArgs<ushort>
    {
        Q = q, K = k, V = v, DO = dO, DRem = dRem, LogRem = logRem,
        AccSnapshots = accSnapshots, PrefixSnapshots = prefixSnapshots,
        DQ = dq, DK = ArrayView<ushort>.Empty, DV = ArrayView<ushort>.Empty, AccumulatorScratch = ArrayView<float>.Empty,
        Rows = AttentionRows.Contiguous(shape.Heads, shape.KeyValueHeads, shape.Length, shape.HeadDim), Length = shape.Length, HeadDim = shape.HeadDim, AttendCurrent = attendCurrent ? 1 : 0, SnapshotTiles = tiles,
        Scale = scale,
    };

    /// <summary>The launch description of one specialization: the tests launch it through the library's own launch layer.</summary>
    private static KernelLaunch<BackwardArgs<ushort>> KernelFor(bool bf16, bool split) =>
        (bf16, split) switch
        {
            (true, false) => TensorCoreBackwardQueryKernel.LaunchFor<Bf16Storage, RoundedWeights>(),
            (true, true) => TensorCoreBackwardQueryKernel.LaunchFor<Bf16Storage, SplitWeights>(),
            (false, false) => TensorCoreBackwardQueryKernel.LaunchFor<Fp16Storage, RoundedWeights>(),
            (false, true) => TensorCoreBackwardQueryKernel.LaunchFor<Fp16Storage, SplitWeights>(),
        };

    private static KernelLaunch<TensorCoreForwardArgs> ForwardFor(bool bf16) => bf16
        ? TensorCoreForwardKernel.LaunchFor<Bf16Storage, SplitWeights>()
        : TensorCoreForwardKernel.LaunchFor<Fp16Storage, SplitWeights>();

    /// <summary>
    /// The largest excess of |P - P_portable| over 1e-5 max|P of the row| + 1e-6, over every (row, 32-key tile) in
    /// which the row sees a key (those pass 2 reads); at most 0 when all are within.
    /// </summary>
    private static double PrefixExcess(float[] actual, float[] expected, int length, bool attendCurrent, int heads = 1)
    {
        int tiles = Snapshots.TileCount(length);
        double worst = double.NegativeInfinity;
        for (int head = 0; head < heads; head++)
        {
            for (int row = 0; row < length; row++)
            {
                int limit = row + (attendCurrent ? 1 : 0);
                int seen = Math.Min(tiles, (limit + Snapshots.KeyTile - 1) / Snapshots.KeyTile);
                double max = 0;
                for (int tile = 0; tile < seen; tile++)
                    max = Math.Max(max, Math.Abs(expected[Snapshots.Index(head, row, tile, length, tiles)]));
                for (int tile = 0; tile < seen; tile++)
                {
                    long at = Snapshots.Index(head, row, tile, length, tiles);
                    double excess = Math.Abs(actual[at] - expected[at]) - (1e-5 * max + 1e-6);
                    worst = Math.Max(worst, double.IsNaN(excess) ? double.PositiveInfinity : excess);
                }
            }
        }
        return double.IsNegativeInfinity(worst) ? 0 : worst;
    }

    /// <summary>Relative RMS error of 16-bit gradients against the exact ones, and the floor: that of round(exact).</summary>
    private static (double Error, double Floor) GradientError(ushort[] actual, double[] exact, bool bf16) =>
        (RelativeRms(actual.Select(b => ToDouble(b, bf16)).ToArray(), exact),
         RelativeRms(exact.Select(e => ToDouble(FromDouble(e, bf16), bf16)).ToArray(), exact));
}
