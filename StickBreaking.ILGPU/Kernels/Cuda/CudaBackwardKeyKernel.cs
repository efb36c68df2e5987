using System;
using ILGPU;

namespace StickBreaking.ILGPU.Kernels.Cuda;

/// <summary>
/// Backward pass 2 on CUDA for head dimensions up to <see cref="MaxHeadDim"/> (SPEC section 2): one group of
/// <see cref="GroupSize"/> threads per (head, block of <see cref="KeyTile"/> keys), walking the blocks of
/// <see cref="BlockRows"/> query rows from the diagonal to the end. Per 64 x 64 tile it rebuilds S = q.k,
/// G = dO.v (4 x 4 per thread, rows ty*4+i, keys tx*4+j), A from the acc snapshots, P from pass 1's P
/// snapshots plus segment sums, and dz, with the same code as pass 1 (<see cref="CudaBackwardTile"/>); then
/// accumulates dk = s dz^T Q and dv = A^T dO as 4 x 8 register tiles per thread (keys ty*4+i, columns
/// tx+16c). Each group owns its keys: no atomics, bitwise deterministic.
/// </summary>
/// <remarks>
/// Dynamic shared memory (<see cref="SharedFloats"/> floats, 106 KB: two groups per SM on an H200): the
/// Q and dO blocks [d][row] (stride 65), one [d][key] tile that holds K (for S), then V (for G), then dz
/// and A [row][key] (for dk and dv), and the two segment-sum arrays. K and V are reloaded per step (from
/// L2) so that the Q and dO blocks and dz and A fit next to each other.
/// </remarks>
internal static class CudaBackwardKeyKernel
{
    public const int GroupSize = CudaBackwardTile.GroupSize;
    public const int BlockRows = CudaBackwardTile.BlockRows;
    public const int KeyTile = CudaBackwardTile.KeyTile;
    public const int MaxHeadDim = CudaBackwardTile.MaxHeadDim;
    private const int Segments = CudaBackwardTile.Segments;
    private const int SegStride = CudaBackwardTile.SegStride;
    private const int TileStride = CudaBackwardTile.TileStride;
    /// <summary>Row stride of the [d][row] Q and dO blocks, padded: column reads d = tx + 16c hit distinct banks.</summary>
    private const int RowStride = BlockRows + 1;

    private const int QOffset = 0;
    private const int DoOffset = QOffset + MaxHeadDim * RowStride;
    private const int XOffset = DoOffset + MaxHeadDim * RowStride;                // K, then V [d][key]; then dz, A
    private const int DzOffset = XOffset;                                         // dz [row][key]
    private const int AOffset = XOffset + CudaBackwardTile.RowTileFloats;         // A [row][key]
    private const int SegLbOffset = XOffset + CudaBackwardTile.KeyTileFloats;
    private const int SegAOffset = SegLbOffset + CudaBackwardTile.SegFloats;
    /// <summary>Dynamic shared memory, in floats.</summary>
    public const int SharedFloats = SegAOffset + CudaBackwardTile.SegFloats;

    public static void Kernel(BackwardArgs a)
    {
        int tid = Group.IdxX;
        int ty = tid / Segments, tx = tid - ty * Segments;
        int head = Grid.IdxX;
        int keyBlock = Grid.IdxY;   // block 0 has the longest walk: launched first
        int T = a.Length, D = a.HeadDim;
        int key0 = keyBlock * KeyTile;
        long headBase = (long)head * T * D;
        var shared = SharedMemory.GetDynamic<float>();

        F8 dk0 = new(), dk1 = new(), dk2 = new(), dk3 = new();
        F8 dv0 = new(), dv1 = new(), dv2 = new(), dv3 = new();
        int segRow = ty * 4 * SegStride;
        int key = key0 + tx * 4;
        for (int rowBlock = keyBlock; rowBlock < a.RowBlocks; rowBlock++)
        {
            int row0 = rowBlock * BlockRows;
            int firstRow = row0 + ty * 4;

            // S = q.k, 4 x 4 per thread.
            Group.Barrier();
            LoadRows(shared, QOffset, a.Q, headBase, row0, T, D, tid);
            LoadRows(shared, DoOffset, a.DO, headBase, row0, T, D, tid);
            CudaBackwardTile.LoadKeyTile(shared, XOffset, a.K, headBase, key0, T, D, tid);
            Group.Barrier();
            F4 s0 = new(), s1 = new(), s2 = new(), s3 = new();
            for (int d = 0; d < D; d++)
            {
                int rAt = QOffset + d * RowStride + ty * 4;
                int kAt = XOffset + d * TileStride + tx;
                var k = new F4(shared[kAt], shared[kAt + Segments], shared[kAt + 2 * Segments], shared[kAt + 3 * Segments]);
                s0 = s0.Fma(shared[rAt], k);
                s1 = s1.Fma(shared[rAt + 1], k);
                s2 = s2.Fma(shared[rAt + 2], k);
                s3 = s3.Fma(shared[rAt + 3], k);
            }

            // G = dO.v, 4 x 4 per thread.
            Group.Barrier();
            CudaBackwardTile.LoadKeyTile(shared, XOffset, a.V, headBase, key0, T, D, tid);
            Group.Barrier();
            F4 g0 = new(), g1 = new(), g2 = new(), g3 = new();
            for (int d = 0; d < D; d++)
            {
                int rAt = DoOffset + d * RowStride + ty * 4;
                int vAt = XOffset + d * TileStride + tx;
                var v = new F4(shared[vAt], shared[vAt + Segments], shared[vAt + 2 * Segments], shared[vAt + 3 * Segments]);
                g0 = g0.Fma(shared[rAt], v);
                g1 = g1.Fma(shared[rAt + 1], v);
                g2 = g2.Fma(shared[rAt + 2], v);
                g3 = g3.Fma(shared[rAt + 3], v);
            }

            // The acc snapshots of this thread's 32-key half (loads in flight during the logs).
            float acc0 = CudaBackwardTile.ReadSnapshot(a.AccSnapshots, head, firstRow, keyBlock, tx, T, a.SnapshotTiles);
            float acc1 = CudaBackwardTile.ReadSnapshot(a.AccSnapshots, head, firstRow + 1, keyBlock, tx, T, a.SnapshotTiles);
            float acc2 = CudaBackwardTile.ReadSnapshot(a.AccSnapshots, head, firstRow + 2, keyBlock, tx, T, a.SnapshotTiles);
            float acc3 = CudaBackwardTile.ReadSnapshot(a.AccSnapshots, head, firstRow + 3, keyBlock, tx, T, a.SnapshotTiles);

            // P before this thread's 32-key half (pass 1's snapshot) and dRem rem, likewise in flight early.
            float p0 = CudaBackwardTile.ReadSnapshot(a.PrefixSnapshots, head, firstRow, keyBlock, tx, T, a.SnapshotTiles);
            float p1 = CudaBackwardTile.ReadSnapshot(a.PrefixSnapshots, head, firstRow + 1, keyBlock, tx, T, a.SnapshotTiles);
            float p2 = CudaBackwardTile.ReadSnapshot(a.PrefixSnapshots, head, firstRow + 2, keyBlock, tx, T, a.SnapshotTiles);
            float p3 = CudaBackwardTile.ReadSnapshot(a.PrefixSnapshots, head, firstRow + 3, keyBlock, tx, T, a.SnapshotTiles);
            var dRemRem = new F4(
                CudaBackwardTile.DRemRem(a.DRem, a.LogRem, head, firstRow, T),
                CudaBackwardTile.DRemRem(a.DRem, a.LogRem, head, firstRow + 1, T),
                CudaBackwardTile.DRemRem(a.DRem, a.LogRem, head, firstRow + 2, T),
                CudaBackwardTile.DRemRem(a.DRem, a.LogRem, head, firstRow + 3, T));

            // log(1 - beta), log(beta); lb segment sums.
            var lb0 = CudaBackwardTile.Logs(s0, a.Scale, firstRow, key, T, a.AttendCurrent, out var logBeta0);
            var lb1 = CudaBackwardTile.Logs(s1, a.Scale, firstRow + 1, key, T, a.AttendCurrent, out var logBeta1);
            var lb2 = CudaBackwardTile.Logs(s2, a.Scale, firstRow + 2, key, T, a.AttendCurrent, out var logBeta2);
            var lb3 = CudaBackwardTile.Logs(s3, a.Scale, firstRow + 3, key, T, a.AttendCurrent, out var logBeta3);
            int lbAt = SegLbOffset + segRow + tx;
            shared[lbAt] = CudaBackwardTile.SumNearestFirst(lb0);
            shared[lbAt + SegStride] = CudaBackwardTile.SumNearestFirst(lb1);
            shared[lbAt + 2 * SegStride] = CudaBackwardTile.SumNearestFirst(lb2);
            shared[lbAt + 3 * SegStride] = CudaBackwardTile.SumNearestFirst(lb3);
            Group.Barrier();   // also: V is read, the tile may now hold dz and A

            // A (into shared) and a = A G; a segment sums.
            int lbRow = SegLbOffset + segRow;
            int wAt = AOffset + ty * 4 * TileStride + tx * 4;
            var a0 = CudaBackwardTile.Weights(shared, lbRow, tx, acc0, lb0, logBeta0, g0, out var w0);
            CudaBackwardTile.StoreRow(shared, wAt, w0);
            var a1 = CudaBackwardTile.Weights(shared, lbRow + SegStride, tx, acc1, lb1, logBeta1, g1, out var w1);
            CudaBackwardTile.StoreRow(shared, wAt + TileStride, w1);
            var a2 = CudaBackwardTile.Weights(shared, lbRow + 2 * SegStride, tx, acc2, lb2, logBeta2, g2, out var w2);
            CudaBackwardTile.StoreRow(shared, wAt + 2 * TileStride, w2);
            var a3 = CudaBackwardTile.Weights(shared, lbRow + 3 * SegStride, tx, acc3, lb3, logBeta3, g3, out var w3);
            CudaBackwardTile.StoreRow(shared, wAt + 3 * TileStride, w3);
            int aAt = SegAOffset + segRow + tx;
            shared[aAt] = CudaBackwardTile.SumFarthestFirst(a0);
            shared[aAt + SegStride] = CudaBackwardTile.SumFarthestFirst(a1);
            shared[aAt + 2 * SegStride] = CudaBackwardTile.SumFarthestFirst(a2);
            shared[aAt + 3 * SegStride] = CudaBackwardTile.SumFarthestFirst(a3);
            Group.Barrier();

            // P from pass 1's snapshot of this half plus the farther segments; dz into shared.
            int aRow = SegAOffset + segRow;
            int zAt = DzOffset + ty * 4 * TileStride + tx * 4;
            CudaBackwardTile.StoreRow(shared, zAt, RowDz(shared, aRow, tx, p0, dRemRem.X0, a0, lb0, logBeta0));
            CudaBackwardTile.StoreRow(shared, zAt + TileStride, RowDz(shared, aRow + SegStride, tx, p1, dRemRem.X1, a1, lb1, logBeta1));
            CudaBackwardTile.StoreRow(shared, zAt + 2 * TileStride, RowDz(shared, aRow + 2 * SegStride, tx, p2, dRemRem.X2, a2, lb2, logBeta2));
            CudaBackwardTile.StoreRow(shared, zAt + 3 * TileStride, RowDz(shared, aRow + 3 * SegStride, tx, p3, dRemRem.X3, a3, lb3, logBeta3));
            Group.Barrier();

            // dk += dz^T q, dv += A^T dO, 4 x 8 per thread (keys ty*4+i, columns tx+16c).
            int rows = Math.Min(BlockRows, T - row0);
            for (int r = 0; r < rows; r++)
            {
                int qAt = QOffset + tx * RowStride + r;
                var q = new F8(
                    new F4(shared[qAt], shared[qAt + 16 * RowStride], shared[qAt + 32 * RowStride], shared[qAt + 48 * RowStride]),
                    new F4(shared[qAt + 64 * RowStride], shared[qAt + 80 * RowStride], shared[qAt + 96 * RowStride], shared[qAt + 112 * RowStride]));
                int z = DzOffset + r * TileStride + ty * 4;
                dk0 = dk0.Fma(shared[z], q);
                dk1 = dk1.Fma(shared[z + 1], q);
                dk2 = dk2.Fma(shared[z + 2], q);
                dk3 = dk3.Fma(shared[z + 3], q);
                int oAt = DoOffset + tx * RowStride + r;
                var o = new F8(
                    new F4(shared[oAt], shared[oAt + 16 * RowStride], shared[oAt + 32 * RowStride], shared[oAt + 48 * RowStride]),
                    new F4(shared[oAt + 64 * RowStride], shared[oAt + 80 * RowStride], shared[oAt + 96 * RowStride], shared[oAt + 112 * RowStride]));
                int w = AOffset + r * TileStride + ty * 4;
                dv0 = dv0.Fma(shared[w], o);
                dv1 = dv1.Fma(shared[w + 1], o);
                dv2 = dv2.Fma(shared[w + 2], o);
                dv3 = dv3.Fma(shared[w + 3], o);
            }
        }

        int firstKey = key0 + ty * 4;
        Store(a, headBase, firstKey, tx, dk0, dv0);
        Store(a, headBase, firstKey + 1, tx, dk1, dv1);
        Store(a, headBase, firstKey + 2, tx, dk2, dv2);
        Store(a, headBase, firstKey + 3, tx, dk3, dv3);
    }

    /// <summary>
    /// Loads rows [row0, row0 + 64) of <paramref name="source"/> (Q or dO) as [d][row] with stride 65: row r of
    /// dimension d at <c>offset + d * 65 + r</c>; zeros outside the sequence and head.
    /// </summary>
    private static void LoadRows(ArrayView<float> shared, int offset, ArrayView<float> source, long headBase,
        int row0, int length, int headDim, int tid)
    {
        for (int e = tid; e < BlockRows * MaxHeadDim; e += GroupSize)
        {
            int r = e / MaxHeadDim, d = e - r * MaxHeadDim;
            int row = row0 + r;
            shared[offset + d * RowStride + r] = row < length && d < headDim ? source[headBase + (long)row * headDim + d] : 0f;
        }
    }

    /// <summary>One row's dz for this thread's 4 keys, from pass 1's P before the thread's 32-key half.</summary>
    private static F4 RowDz(ArrayView<float> shared, int aRow, int tx, float halfPrefix, float dRemRem, F4 weighted, F4 lb, F4 logBeta) =>
        CudaBackwardTile.Dz(weighted, lb, logBeta, CudaBackwardTile.PrefixInHalf(shared, aRow, tx, halfPrefix), dRemRem);

    private static void Store(BackwardArgs a, long headBase, int key, int tx, F8 dk, F8 dv)
    {
        if (key >= a.Length)
            return;
        long rowAt = headBase + (long)key * a.HeadDim;
        CudaBackwardTile.StoreColumns(a.DK, rowAt, tx, a.HeadDim, dk, a.Scale);
        CudaBackwardTile.StoreColumns(a.DV, rowAt, tx, a.HeadDim, dv, 1f);
    }
}
