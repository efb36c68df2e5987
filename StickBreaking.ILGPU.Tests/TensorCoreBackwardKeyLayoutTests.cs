using System;
using System.Linq;
using ILGPU;
using ILGPU.Runtime;
using NUnit.Framework;
using StickBreaking.ILGPU.Kernels.Common;
using StickBreaking.ILGPU.Kernels.Portable;
using StickBreaking.ILGPU.Kernels.TensorCore;
using StickBreaking.ILGPU.Tests.Infrastructure;
using StickBreaking.ILGPU.Tests.Reference;
using static StickBreaking.ILGPU.Tests.Rounding;
using static StickBreaking.ILGPU.Tests.Infrastructure.Errors;

namespace StickBreaking.ILGPU.Tests;

/// <summary>
/// The tensor-core dk/dv pass (<see cref="TensorCoreBackwardKeyKernel"/>) on strided rows and grouped heads, at the
/// kernel level (the API-level cases are <see cref="LayoutTests"/>): q token-major with padded rows, dO head-major with
/// padded rows and heads, k and v slices of one [B, T, 2 Hkv, D] buffer, dk and dv slices of another, every gap
/// holding NaN (inputs) or a sentinel (outputs). The statistics and snapshots (acc, LogRem from the tensor-core
/// forward, P from the portable pass 1) come from contiguous copies with k and v repeated over each group: they are
/// indexed by query head whatever the layout.
/// <para>
/// (a) Grouped heads against float64 (dk and dv summed over each group's query heads), within twice the rounding
/// floor as in <see cref="TensorCoreBackwardKeyTests"/>; the output gaps untouched. (b) With one query head per
/// key/value head, the strided call gives the bits of the contiguous one (a layout changes addresses, not
/// arithmetic).
/// </para>
/// </summary>
public sealed class TensorCoreBackwardKeyLayoutTests(string backend) : TensorCoreFixture(backend, "the tensor-core backward")
{
    private const ushort Sentinel = 0x7E01;

    /// <summary>(a) Grouped heads and strided rows against float64 (T = 65: two key blocks, the second partial).</summary>
    [TestCase(true, false, 2, 2, 1, 65, 64)]
    [TestCase(false, true, 1, 3, 1, 15, 128)]
    [TestCase(true, true, 1, 4, 2, 65, 64)]
    public void GroupedStridedMatchesFloat64(bool bf16, bool attendCurrent, int batch, int heads, int keyValueHeads,
        int length, int headDim)
    {
        if (Backend == Backends.Cpu && (batch, heads, keyValueHeads) != (2, 2, 1) && (length, headDim) != (15, 128))
            Assert.Ignore("CUDA only but for two cases (the CPU accelerator emulates the mma thread by thread)");
        var shape = new AttentionShape(batch, heads, length, headDim) { KeyValueHeads = keyValueHeads };
        var x = TestInputs.Create(InputKind.Standard, batch, heads, length, headDim, seed: 7 * length + heads);
        int group = heads / keyValueHeads;
        var q = RoundBits(x.Q, bf16); var dO = RoundBits(x.DO, bf16);
        // k and v of key/value head g: those of query head g * group of the inputs.
        var k = RoundBits(KeyHeads(x.K, shape), bf16); var v = RoundBits(KeyHeads(x.V, shape), bf16);
        double scale = 1.0 / Math.Sqrt(headDim);
        var exact = Float64Reference.Backward(q.Values, Repeat(k.Values, shape), Repeat(v.Values, shape), dO.Values,
            TestInputs.ToDouble(x.DRem), batch, heads, length, headDim, scale, attendCurrent);
        foreach (bool split in new[] { false, true })
        {
            var run = Run(bf16, split, shape, q.Bits, k.Bits, v.Bits, dO.Bits, x.DRem, (float)scale, attendCurrent, strided: true);
            var (dkError, dkFloor) = GradientError(run.DK, SumOverGroups(exact.DK, shape), bf16);
            var (dvError, dvFloor) = GradientError(run.DV, SumOverGroups(exact.DV, shape), bf16);
            TestContext.Out.WriteLine($"{Backend} {(bf16 ? "bf16" : "fp16")} {(split ? "split" : "rounded")} B={batch} H={heads} " +
                $"Hkv={keyValueHeads} T={length} D={headDim}: rel RMS dk {dkError:E2} ({dkError / dkFloor:F2} x floor), " +
                $"dv {dvError:E2} ({dvError / dvFloor:F2} x floor), output gaps changed {run.GapsChanged}");
            Assert.Multiple(() =>
            {
                Assert.That(dkError, Is.LessThanOrEqualTo(2 * dkFloor), $"DK ({(split ? "split" : "rounded")})");
                Assert.That(dvError, Is.LessThanOrEqualTo(2 * dvFloor), $"DV ({(split ? "split" : "rounded")})");
                Assert.That(run.GapsChanged, Is.Zero, "dk / dv buffer elements outside the rows written");
            });
        }
    }

    /// <summary>(b) One query head per key/value head: the strided call gives the contiguous bits.</summary>
    [TestCase(true, false)]
    public void StridedGivesTheContiguousBits(bool bf16, bool split)
    {
        const int batch = 1, heads = 2, length = 65, headDim = 64;
        var shape = new AttentionShape(batch, heads, length, headDim);
        var x = TestInputs.Create(InputKind.Standard, batch, heads, length, headDim, seed: 17);
        var q = RoundBits(x.Q, bf16); var k = RoundBits(x.K, bf16); var v = RoundBits(x.V, bf16); var dO = RoundBits(x.DO, bf16);
        float scale = (float)(1.0 / Math.Sqrt(headDim));
        var contiguous = Run(bf16, split, shape, q.Bits, k.Bits, v.Bits, dO.Bits, x.DRem, scale, true, strided: false);
        var strided = Run(bf16, split, shape, q.Bits, k.Bits, v.Bits, dO.Bits, x.DRem, scale, true, strided: true);
        Assert.Multiple(() =>
        {
            Assert.That(strided.DK, Is.EqualTo(contiguous.DK).AsCollection, "DK");
            Assert.That(strided.DV, Is.EqualTo(contiguous.DV).AsCollection, "DV");
            Assert.That(strided.GapsChanged, Is.Zero, "dk / dv buffer elements outside the rows written");
        });
    }

    private sealed record Result(ushort[] DK, ushort[] DV, int GapsChanged);

    /// <summary>Element strides of one tensor in its buffer and the view's start.</summary>
    private readonly record struct Placement(long Start, long Batch, long Head, long Token)
    {
        public long At(int b, int h, int t, int d) => Start + b * Batch + h * Head + t * Token + d;

        public RowStrides Strides => new() { Batch = Batch, Head = Head, Token = Token };
    }

    /// <summary>
    /// The statistics from contiguous copies (k, v repeated per group), then the pass on the layouts of the class
    /// summary (<paramref name="strided"/>) or on contiguous tensors; dk and dv gathered to contiguous [B, Hkv, T, D].
    /// </summary>
    private Result Run(bool bf16, bool split, AttentionShape shape, ushort[] q, ushort[] k, ushort[] v, ushort[] dO,
        float[] dRem, float scale, bool attendCurrent, bool strided)
    {
        var acc = Accelerator;
        int B = shape.Batch, H = shape.Heads, Hkv = shape.KeyValueHeads, T = shape.Length, D = shape.HeadDim;
        var expanded = new AttentionShape(B, H, T, D);
        int tiles = Snapshots.TileCount(T);
        var stream = acc.DefaultStream;
        using var qc = acc.Allocate1D(q);
        using var kc = acc.Allocate1D(RepeatBits(k, shape));
        using var vc = acc.Allocate1D(RepeatBits(v, shape));
        using var dOc = acc.Allocate1D(dO);
        using var dRemb = acc.Allocate1D(dRem);
        using var o = acc.Allocate1D<ushort>(expanded.TensorLength);
        using var dq = acc.Allocate1D<ushort>(expanded.TensorLength);
        using var rem = acc.Allocate1D<float>(expanded.RowCount);
        using var logRem = acc.Allocate1D<float>(expanded.RowCount);
        using var accSnapshots = acc.Allocate1D<float>(expanded.RowCount * tiles);
        using var prefixSnapshots = acc.Allocate1D<float>(expanded.RowCount * tiles);
        accSnapshots.CopyFromCPU(Enumerable.Repeat(float.NaN, (int)(expanded.RowCount * tiles)).ToArray());
        prefixSnapshots.CopyFromCPU(Enumerable.Repeat(float.NaN, (int)(expanded.RowCount * tiles)).ToArray());
        var contiguousRows = AttentionRows.Contiguous(H, H, T, D);
        var forwardArgs = new TensorCoreForwardArgs
        {
            Q = qc.View, K = kc.View, V = vc.View, O = o.View, Rem = rem.View, LogRem = logRem.View,
            AccSnapshots = accSnapshots.View, WriteSnapshots = 1, SnapshotTiles = tiles, Rows = contiguousRows,
            Length = T, HeadDim = D, AttendCurrent = attendCurrent ? 1 : 0, Scale = scale,
        };
        Launcher.Launch(bf16 ? TensorCoreForwardKernel.LaunchFor<Bf16Storage, SplitWeights>()
            : TensorCoreForwardKernel.LaunchFor<Fp16Storage, SplitWeights>(), stream, expanded, forwardArgs);
        var args = new BackwardArgs<ushort>
        {
            Q = qc.View, K = kc.View, V = vc.View, DO = dOc.View, DRem = dRemb.View, LogRem = logRem.View,
            AccSnapshots = accSnapshots.View, PrefixSnapshots = prefixSnapshots.View,
            DQ = dq.View, DK = ArrayView<ushort>.Empty, DV = ArrayView<ushort>.Empty, AccumulatorScratch = ArrayView<float>.Empty,
            Rows = contiguousRows, Length = T, HeadDim = D, AttendCurrent = attendCurrent ? 1 : 0, SnapshotTiles = tiles,
            Scale = scale,
        };
        Launcher.Launch(bf16 ? BackwardQueryKernel.LaunchBf16 : BackwardQueryKernel.LaunchFp16, stream, expanded, args);

        // The pass's own tensors.
        Placement pq, pdO, pk, pv, pdk, pdv;
        long qLength, dOLength, kvLength, gradLength;
        if (strided)
        {
            long qToken = H * D + 8, dOToken = D + 8, kvToken = 2L * Hkv * D + 8, gradToken = 2L * Hkv * D + 2;
            pq = new Placement(8, T * qToken + 16, D, qToken);
            pdO = new Placement(0, H * (T * dOToken + 8) + 8, T * dOToken + 8, dOToken);
            pk = new Placement(0, T * kvToken, D, kvToken);
            pv = new Placement(Hkv * D, T * kvToken, D, kvToken);
            pdk = new Placement(2, T * gradToken + 2, D, gradToken);
            pdv = new Placement(2 + Hkv * D, T * gradToken + 2, D, gradToken);
            qLength = pq.Start + B * pq.Batch;
            dOLength = pdO.Start + B * pdO.Batch;
            kvLength = B * pk.Batch;
            gradLength = pdk.Start + B * pdk.Batch;
        }
        else
        {
            pq = pdO = new Placement(0, (long)H * T * D, (long)T * D, D);
            pk = pv = pdk = pdv = new Placement(0, (long)Hkv * T * D, (long)T * D, D);
            qLength = dOLength = B * pq.Batch;
            kvLength = gradLength = B * pk.Batch;
        }
        ushort nan = bf16 ? (ushort)0x7FC0 : (ushort)0x7E00;
        var qs = Filled(qLength, nan); var dOs = Filled(dOLength, nan);
        var ks = Filled(kvLength, nan); var vs = strided ? ks : Filled(kvLength, nan);
        Scatter(q, qs, pq, B, H, T, D);
        Scatter(dO, dOs, pdO, B, H, T, D);
        Scatter(k, ks, pk, B, Hkv, T, D);
        Scatter(v, vs, pv, B, Hkv, T, D);
        using var qb = acc.Allocate1D(qs);
        using var dOb = acc.Allocate1D(dOs);
        using var kb = acc.Allocate1D(ks);
        using var vb = strided ? null : acc.Allocate1D(vs);
        using var dkb = acc.Allocate1D(Filled(gradLength, Sentinel));
        using var dvb = strided ? null : acc.Allocate1D(Filled(gradLength, Sentinel));
        var rows = new AttentionRows
        {
            Q = pq.Strides, O = pq.Strides, DO = pdO.Strides, DQ = pq.Strides,
            K = pk.Strides, V = pv.Strides, DK = pdk.Strides, DV = pdv.Strides,
            Heads = H, KeyValueHeads = Hkv,
        };
        var passArgs = args with
        {
            Q = From(qb, pq.Start), DO = From(dOb, pdO.Start), K = From(kb, pk.Start), V = From(vb ?? kb, pv.Start),
            DK = From(dkb, pdk.Start), DV = From(dvb ?? dkb, pdv.Start),
            DQ = ArrayView<ushort>.Empty, Rows = rows,
        };
        var kernel = (bf16, split) switch
        {
            (true, false) => TensorCoreBackwardKeyKernel.LaunchFor<Bf16Storage, RoundedWeights>(),
            (true, true) => TensorCoreBackwardKeyKernel.LaunchFor<Bf16Storage, SplitWeights>(),
            (false, false) => TensorCoreBackwardKeyKernel.LaunchFor<Fp16Storage, RoundedWeights>(),
            (false, true) => TensorCoreBackwardKeyKernel.LaunchFor<Fp16Storage, SplitWeights>(),
        };
        Launcher.Launch(kernel, stream, shape, passArgs);
        stream.Synchronize();
        var dkAll = dkb.GetAsArray1D();
        var dvAll = dvb?.GetAsArray1D() ?? dkAll;
        var written = new bool[gradLength];
        var dk = Gather(dkAll, pdk, B, Hkv, T, D, written);
        var dv = Gather(dvAll, pdv, B, Hkv, T, D, written);
        int gaps = 0;
        for (long i = 0; i < gradLength; i++)
        {
            if (!written[i] && (dkAll[i] != Sentinel || (dvb is not null && dvAll[i] != Sentinel)))
                gaps++;
        }
        return new Result(dk, dv, gaps);
    }

    private static ArrayView<ushort> From(MemoryBuffer1D<ushort, Stride1D.Dense> buffer, long start) =>
        buffer.View.AsContiguous().SubView(start);

    private static ushort[] Filled(long n, ushort value) => Enumerable.Repeat(value, (int)n).ToArray();

    private static void Scatter(ushort[] contiguous, ushort[] target, Placement p, int B, int heads, int T, int D)
    {
        for (int b = 0; b < B; b++)
            for (int h = 0; h < heads; h++)
                for (int t = 0; t < T; t++)
                    for (int d = 0; d < D; d++)
                        target[p.At(b, h, t, d)] = contiguous[(((long)b * heads + h) * T + t) * D + d];
    }

    private static ushort[] Gather(ushort[] source, Placement p, int B, int heads, int T, int D, bool[] written)
    {
        var result = new ushort[(long)B * heads * T * D];
        for (int b = 0; b < B; b++)
            for (int h = 0; h < heads; h++)
                for (int t = 0; t < T; t++)
                    for (int d = 0; d < D; d++)
                    {
                        long at = p.At(b, h, t, d);
                        result[(((long)b * heads + h) * T + t) * D + d] = source[at];
                        written[at] = true;
                    }
        return result;
    }

    /// <summary>Key/value head g of each sequence: query head g * group of a [B, H, T, D] array.</summary>
    private static float[] KeyHeads(float[] x, AttentionShape shape)
    {
        int H = shape.Heads, Hkv = shape.KeyValueHeads, rows = shape.Length * shape.HeadDim, group = H / Hkv;
        var result = new float[shape.Batch * Hkv * rows];
        for (int b = 0; b < shape.Batch; b++)
            for (int g = 0; g < Hkv; g++)
                Array.Copy(x, (b * H + g * group) * rows, result, (b * Hkv + g) * rows, rows);
        return result;
    }

    /// <summary>[B, Hkv, T, D] to [B, H, T, D], query head h taking key/value head h / group.</summary>
    private static T[] Repeat<T>(T[] x, AttentionShape shape)
    {
        int H = shape.Heads, Hkv = shape.KeyValueHeads, rows = shape.Length * shape.HeadDim, group = H / Hkv;
        var result = new T[shape.Batch * H * rows];
        for (int b = 0; b < shape.Batch; b++)
            for (int h = 0; h < H; h++)
                Array.Copy(x, (b * Hkv + h / group) * rows, result, (b * H + h) * rows, rows);
        return result;
    }

    private static ushort[] RepeatBits(ushort[] x, AttentionShape shape) => Repeat(x, shape);

    /// <summary>[B, H, T, D] gradients of the repeated k, v summed over each group: those of k, v [B, Hkv, T, D].</summary>
    private static double[] SumOverGroups(double[] x, AttentionShape shape)
    {
        int H = shape.Heads, Hkv = shape.KeyValueHeads, rows = shape.Length * shape.HeadDim, group = H / Hkv;
        var result = new double[shape.Batch * Hkv * rows];
        for (int b = 0; b < shape.Batch; b++)
            for (int h = 0; h < H; h++)
                for (int i = 0; i < rows; i++)
                    result[(b * Hkv + h / group) * rows + i] += x[(b * H + h) * rows + i];
        return result;
    }

    private static (double Error, double Floor) GradientError(ushort[] actual, double[] exact, bool bf16) =>
        (RelativeRms(actual.Select(b => ToDouble(b, bf16)).ToArray(), exact),
         RelativeRms(exact.Select(e => ToDouble(FromDouble(e, bf16), bf16)).ToArray(), exact));
}
