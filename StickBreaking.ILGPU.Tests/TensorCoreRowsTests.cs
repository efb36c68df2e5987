using System;
using System.Linq;
using ILGPU;
using ILGPU.Runtime;
using NUnit.Framework;
using StickBreaking.ILGPU.Kernels.Common;
using StickBreaking.ILGPU.Kernels.TensorCore;
using StickBreaking.ILGPU.Launch;
using StickBreaking.ILGPU.Tests.Infrastructure;

namespace StickBreaking.ILGPU.Tests;

/// <summary>
/// The tensor-core forward and dq pass (<see cref="TensorCoreForwardKernel"/>, <see cref="TensorCoreBackwardQueryKernel"/>)
/// read every row through <see cref="AttentionRows"/> (docs/math.md, "Layouts and grouped heads"), at the kernel level:
/// q, k and v as slices of one fused [B, T, H + 2 Hkv, D] buffer, dO token-major with padded rows, o and dq with padding
/// between rows, heads and sequences (strides of 2 elements, starts 4 bytes in), and Hkv &lt; H key/value heads. Addressing
/// changes no arithmetic, so o, rem, LogRem, the acc snapshots, dq and the P snapshots must be BITWISE those of the
/// same kernels on contiguous tensors where every query head has its own copy of its key/value head; and no element
/// between the rows of o or dq is written.
/// </summary>
public sealed class TensorCoreRowsTests(string backend) : TensorCoreFixture(backend, "the tensor-core forward and dq pass")
{
    private const ushort Untouched = 0x7E57;

    [TestCase(true, 2, 4, 2, 70, 64, false)]
    [TestCase(false, 1, 3, 1, 20, 128, true)]
    [TestCase(false, 2, 3, 3, 70, 128, false)]
    public void StridedGroupedRowsMatchContiguousBitwise(bool bf16, int batch, int heads, int keyValueHeads, int length,
        int headDim, bool attendCurrent)
    {
        int B = batch, H = heads, G = keyValueHeads, T = length, D = headDim, group = H / G;
        var random = new Random(7 * length + headDim);
        ushort[] Make(long count) => Enumerable.Range(0, (int)count).Select(_ => Bits(4 * random.NextDouble() - 2, bf16)).ToArray();
        var q = Make((long)B * H * T * D);
        var k = Make((long)B * G * T * D);
        var v = Make((long)B * G * T * D);
        var dO = Make((long)B * H * T * D);
        var dRem = Enumerable.Range(0, B * H * T).Select(_ => (float)(random.NextDouble() - 0.5)).ToArray();

        // Reference: contiguous [B, H, T, D], each query head with a copy of the key/value head it reads.
        ushort[] Expand(ushort[] x)
        {
            var y = new ushort[(long)B * H * T * D];
            for (int b = 0; b < B; b++)
                for (int h = 0; h < H; h++)
                    Array.Copy(x, ((long)b * G + h / group) * T * D, y, ((long)b * H + h) * T * D, (long)T * D);
            return y;
        }
        var full = new AttentionShape(B, H, T, D);
        var contiguous = AttentionRows.Contiguous(H, H, T, D);
        var expected = Run(bf16, full, contiguous, attendCurrent, dRem,
            (q, 0), (Expand(k), 0), (Expand(v), 0), (dO, 0), (full.TensorLength, 0), (full.TensorLength, 0));

        // The layouts. q, k, v: one fused [B, T, H + 2G, D] buffer 8 elements in (16 bytes).
        long width = (long)(H + 2 * G) * D;
        var fused = Enumerable.Repeat(Untouched, (int)(8 + B * T * width)).ToArray();
        var qRows = new RowStrides { Batch = T * width, Head = D, Token = width };
        var kRows = new RowStrides { Batch = T * width, Head = D, Token = width };
        for (int b = 0; b < B; b++)
            for (int t = 0; t < T; t++)
            {
                for (int h = 0; h < H; h++)
                    Array.Copy(q, (((long)b * H + h) * T + t) * D, fused, 8 + qRows.Row(b, h, t), D);
                for (int g = 0; g < G; g++)
                {
                    Array.Copy(k, (((long)b * G + g) * T + t) * D, fused, 8 + (long)H * D + kRows.Row(b, g, t), D);
                    Array.Copy(v, (((long)b * G + g) * T + t) * D, fused, 8 + (long)(H + G) * D + kRows.Row(b, g, t), D);
                }
            }
        // dO: [B, T, H, D] with 8 elements after each token's heads, 16 elements in.
        var dORows = new RowStrides { Batch = T * ((long)H * D + 8), Head = D, Token = (long)H * D + 8 };
        var dOLaid = Enumerable.Repeat(Untouched, (int)(16 + B * dORows.Batch)).ToArray();
        for (int b = 0; b < B; b++)
            for (int h = 0; h < H; h++)
                for (int t = 0; t < T; t++)
                    Array.Copy(dO, (((long)b * H + h) * T + t) * D, dOLaid, 16 + dORows.Row(b, h, t), D);
        // o: [B, H, T, D] with 2 elements after each row, 6 after each head, 4 after each sequence, 2 elements in;
        // dq: [T, B, H, D] with 2 elements after each row, 2 elements in.
        long headStride = T * (long)(D + 2) + 6;
        var oRows = new RowStrides { Batch = H * headStride + 4, Head = headStride, Token = D + 2 };
        var dqRows = new RowStrides { Batch = (long)H * (D + 2), Head = D + 2, Token = (long)B * H * (D + 2) };
        var rows = new AttentionRows
        {
            Q = qRows, K = kRows, V = kRows, O = oRows, DO = dORows, DQ = dqRows,
            DK = RowStrides.Contiguous(G, T, D), DV = RowStrides.Contiguous(G, T, D),
            Heads = H, KeyValueHeads = G,
        };
        var shape = new AttentionShape(B, H, T, D) { KeyValueHeads = G };
        var actual = Run(bf16, shape, rows, attendCurrent, dRem,
            (fused, 8), (fused, 8 + (long)H * D), (fused, 8 + (long)(H + G) * D), (dOLaid, 16),
            (2 + B * oRows.Batch, 2), (2 + T * dqRows.Token, 2));

        // o and dq gathered back to [B, H, T, D]; every other element of their buffers untouched.
        ushort[] Gather(ushort[] laid, RowStrides x, long at, string name)
        {
            var y = new ushort[(long)B * H * T * D];
            var written = new bool[laid.Length];
            for (int b = 0; b < B; b++)
                for (int h = 0; h < H; h++)
                    for (int t = 0; t < T; t++)
                    {
                        long row = at + x.Row(b, h, t);
                        Array.Copy(laid, row, y, (((long)b * H + h) * T + t) * D, D);
                        for (int d = 0; d < D; d++)
                            written[row + d] = true;
                    }
            int stray = Enumerable.Range(0, laid.Length).Count(i => !written[i] && laid[i] != Untouched);
            Assert.That(stray, Is.Zero, $"{name}: elements written between its rows");
            return y;
        }
        Assert.Multiple(() =>
        {
            Assert.That(Gather(actual.O, oRows, 2, "o"), Is.EqualTo(expected.O), "o");
            Assert.That(actual.Rem, Is.EqualTo(expected.Rem), "rem");
            Assert.That(actual.LogRem, Is.EqualTo(expected.LogRem), "LogRem");
            Assert.That(actual.AccSnapshots, Is.EqualTo(expected.AccSnapshots), "acc snapshots");
            Assert.That(Gather(actual.DQ, dqRows, 2, "dq"), Is.EqualTo(expected.DQ), "dq");
            Assert.That(actual.PrefixSnapshots, Is.EqualTo(expected.PrefixSnapshots), "P snapshots");
        });
    }

    private sealed record Result(ushort[] O, float[] Rem, float[] LogRem, float[] AccSnapshots, ushort[] DQ, float[] PrefixSnapshots);

    /// <summary>
    /// The forward (with snapshots) and then pass 1 on tensors given as (host buffer, start of the view in it); o and
    /// dq as (buffer length, start), their buffers filled with <see cref="Untouched"/> first.
    /// </summary>
    private Result Run(bool bf16, AttentionShape shape, AttentionRows rows, bool attendCurrent, float[] dRemValues,
        (ushort[] Data, long At) q, (ushort[] Data, long At) k, (ushort[] Data, long At) v, (ushort[] Data, long At) dO,
        (long Length, long At) o, (long Length, long At) dq)
    {
        var acc = Accelerator;
        int tiles = Snapshots.TileCount(shape.Length);
        float scale = (float)(1.0 / Math.Sqrt(shape.HeadDim));
        using var qb = acc.Allocate1D(q.Data);
        using var kb = acc.Allocate1D(k.Data);
        using var vb = acc.Allocate1D(v.Data);
        using var dOb = acc.Allocate1D(dO.Data);
        using var ob = acc.Allocate1D(Enumerable.Repeat(Untouched, (int)o.Length).ToArray());
        using var dqb = acc.Allocate1D(Enumerable.Repeat(Untouched, (int)dq.Length).ToArray());
        using var dRem = acc.Allocate1D(dRemValues);
        using var rem = acc.Allocate1D<float>(shape.RowCount);
        using var logRem = acc.Allocate1D<float>(shape.RowCount);
        using var accSnapshots = acc.Allocate1D<float>(shape.RowCount * tiles);
        using var prefixSnapshots = acc.Allocate1D<float>(shape.RowCount * tiles);
        accSnapshots.MemSetToZero();
        prefixSnapshots.MemSetToZero();
        var forward = new TensorCoreForwardArgs
        {
            Q = At(qb, q.At), K = At(kb, k.At), V = At(vb, v.At), O = At(ob, o.At),
            Rem = rem.View, LogRem = logRem.View, AccSnapshots = accSnapshots.View, WriteSnapshots = 1, SnapshotTiles = tiles,
            Rows = rows, Length = shape.Length, HeadDim = shape.HeadDim, AttendCurrent = attendCurrent ? 1 : 0, Scale = scale,
        };
        Launcher.Launch(bf16 ? TensorCoreForwardKernel.LaunchFor<Bf16Storage, RoundedWeights>()
            : TensorCoreForwardKernel.LaunchFor<Fp16Storage, RoundedWeights>(), acc.DefaultStream, shape, forward);
        var backward = new BackwardArgs<ushort>
        {
            Q = forward.Q, K = forward.K, V = forward.V, DO = At(dOb, dO.At), DRem = dRem.View, LogRem = logRem.View,
            AccSnapshots = accSnapshots.View, PrefixSnapshots = prefixSnapshots.View,
            DQ = At(dqb, dq.At), DK = ArrayView<ushort>.Empty, DV = ArrayView<ushort>.Empty,
            AccumulatorScratch = ArrayView<float>.Empty,
            Rows = rows, Length = shape.Length, HeadDim = shape.HeadDim, AttendCurrent = attendCurrent ? 1 : 0,
            SnapshotTiles = tiles, Scale = scale,
        };
        Launcher.Launch(bf16 ? TensorCoreBackwardQueryKernel.LaunchFor<Bf16Storage, RoundedWeights>()
            : TensorCoreBackwardQueryKernel.LaunchFor<Fp16Storage, RoundedWeights>(), acc.DefaultStream, shape, backward);
        acc.Synchronize();
        return new Result(ob.GetAsArray1D(), rem.GetAsArray1D(), logRem.GetAsArray1D(), accSnapshots.GetAsArray1D(),
            dqb.GetAsArray1D(), prefixSnapshots.GetAsArray1D());
    }

    private static ArrayView<ushort> At(MemoryBuffer1D<ushort, Stride1D.Dense> buffer, long at)
    {
        ArrayView<ushort> view = buffer.View;
        return view.SubView(at);
    }

    private static ushort Bits(double x, bool bf16) =>
        bf16 ? ((BFloat16)(float)x).Bits : BitConverter.HalfToUInt16Bits((System.Half)x);
}
