using System;
using ILGPU;

namespace StickBreaking.ILGPU.Kernels.Cuda;

/// <summary>
/// Backward pass 1 on CUDA for head dimensions up to <see cref="MaxHeadDim"/> (SPEC section 2): one group of
/// <see cref="GroupSize"/> threads per (head, block of <see cref="BlockRows"/> query rows), key tiles of
/// <see cref="KeyTile"/> from key 0 toward the diagonal, so that the prefix P grows naturally. Register
/// tiles: each thread owns 4 x 4 of S = q.k and G = dO.v (rows ty*4+i, keys tx*4+j) and 4 x 8 of dq (rows
/// ty*4+i, columns tx+16c). A is rebuilt from the forward's acc snapshots (one per 32-key half), P from
/// segment sums of a in shared memory; P is written per 32-key tile for pass 2. Each group owns its dq
/// rows: no atomics, bitwise deterministic.
/// </summary>
/// <remarks>
/// Dynamic shared memory (<see cref="SharedFloats"/> floats, 113 KB: two groups per SM on an H200):
/// Q and dO blocks [d][row] (stride 64, rows XOR-swizzled by 4 * (d % 8) so that the transposing store and
/// the reads are free of bank conflicts); one [d][key] tile that holds V (for G) and then K (for S and
/// dq); one [row][key] tile for dz that also holds the two segment-sum arrays before dz is written.
/// </remarks>
internal static class CudaBackwardQueryKernel
{
    public const int GroupSize = CudaBackwardTile.GroupSize;
    public const int BlockRows = CudaBackwardTile.BlockRows;
    public const int KeyTile = CudaBackwardTile.KeyTile;
    public const int MaxHeadDim = CudaBackwardTile.MaxHeadDim;
    private const int Segments = CudaBackwardTile.Segments;
    private const int SegStride = CudaBackwardTile.SegStride;
    private const int TileStride = CudaBackwardTile.TileStride;

    private const int QOffset = 0;
    private const int DoOffset = QOffset + MaxHeadDim * BlockRows;
    private const int XOffset = DoOffset + MaxHeadDim * BlockRows;          // V, then K: [d][key]
    private const int ZOffset = XOffset + CudaBackwardTile.KeyTileFloats;   // dz [row][key]
    private const int SegLbOffset = ZOffset;                                // lb segment sums, before dz
    private const int SegAOffset = ZOffset + CudaBackwardTile.SegFloats;    // a segment sums, before dz
    /// <summary>Dynamic shared memory, in floats.</summary>
    public const int SharedFloats = ZOffset + CudaBackwardTile.RowTileFloats;

    public static void Kernel(BackwardArgs a)
    {
        int tid = Group.IdxX;
        int ty = tid / Segments, tx = tid - ty * Segments;
        int head = Grid.IdxX;
        int rowBlock = a.RowBlocks - 1 - Grid.IdxY;   // the longest walks first
        int T = a.Length, D = a.HeadDim;
        int row0 = rowBlock * BlockRows;
        long headBase = (long)head * T * D;
        var shared = SharedMemory.GetDynamic<float>();

        LoadRows(shared, QOffset, a.Q, headBase, row0, T, D, tid);
        LoadRows(shared, DoOffset, a.DO, headBase, row0, T, D, tid);

        int firstRow = row0 + ty * 4;
        var dRemRem = new F4(
            CudaBackwardTile.DRemRem(a.DRem, a.LogRem, head, firstRow, T),
            CudaBackwardTile.DRemRem(a.DRem, a.LogRem, head, firstRow + 1, T),
            CudaBackwardTile.DRemRem(a.DRem, a.LogRem, head, firstRow + 2, T),
            CudaBackwardTile.DRemRem(a.DRem, a.LogRem, head, firstRow + 3, T));
        var prefix = new F4();   // P before the current tile, rows ty*4+i
        F8 dq0 = new(), dq1 = new(), dq2 = new(), dq3 = new();
        int lastKey = Math.Min(T - 1, row0 + BlockRows - 1);
        int lastTile = lastKey / KeyTile;
        int segRow = ty * 4 * SegStride;
        for (int tile = 0; tile <= lastTile; tile++)
        {
            int key0 = tile * KeyTile;

            // G = dO.v, 4 x 4 per thread.
            Group.Barrier();
            CudaBackwardTile.LoadKeyTile(shared, XOffset, a.V, headBase, key0, T, D, tid);
            Group.Barrier();
            F4 g0 = new(), g1 = new(), g2 = new(), g3 = new();
            for (int d = 0; d < D; d++)
            {
                int rAt = DoOffset + d * BlockRows + ((ty ^ (d & 7)) << 2);
                int vAt = XOffset + d * TileStride + tx;
                var v = new F4(shared[vAt], shared[vAt + Segments], shared[vAt + 2 * Segments], shared[vAt + 3 * Segments]);
                g0 = g0.Fma(shared[rAt], v);
                g1 = g1.Fma(shared[rAt + 1], v);
                g2 = g2.Fma(shared[rAt + 2], v);
                g3 = g3.Fma(shared[rAt + 3], v);
            }

            // S = q.k, 4 x 4 per thread; K stays for dq.
            Group.Barrier();
            CudaBackwardTile.LoadKeyTile(shared, XOffset, a.K, headBase, key0, T, D, tid);
            Group.Barrier();
            F4 s0 = new(), s1 = new(), s2 = new(), s3 = new();
            for (int d = 0; d < D; d++)
            {
                int rAt = QOffset + d * BlockRows + ((ty ^ (d & 7)) << 2);
                int kAt = XOffset + d * TileStride + tx;
                var k = new F4(shared[kAt], shared[kAt + Segments], shared[kAt + 2 * Segments], shared[kAt + 3 * Segments]);
                s0 = s0.Fma(shared[rAt], k);
                s1 = s1.Fma(shared[rAt + 1], k);
                s2 = s2.Fma(shared[rAt + 2], k);
                s3 = s3.Fma(shared[rAt + 3], k);
            }

            // The acc snapshots of this thread's 32-key half (loads in flight during the logs).
            float acc0 = CudaBackwardTile.ReadSnapshot(a.AccSnapshots, head, firstRow, tile, tx, T, a.SnapshotTiles);
            float acc1 = CudaBackwardTile.ReadSnapshot(a.AccSnapshots, head, firstRow + 1, tile, tx, T, a.SnapshotTiles);
            float acc2 = CudaBackwardTile.ReadSnapshot(a.AccSnapshots, head, firstRow + 2, tile, tx, T, a.SnapshotTiles);
            float acc3 = CudaBackwardTile.ReadSnapshot(a.AccSnapshots, head, firstRow + 3, tile, tx, T, a.SnapshotTiles);

            // log(1 - beta), log(beta); lb segment sums.
            int key = key0 + tx * 4;
            var lb0 = CudaBackwardTile.Logs(s0, a.Scale, firstRow, key, T, a.AttendCurrent, out var logBeta0);
            var lb1 = CudaBackwardTile.Logs(s1, a.Scale, firstRow + 1, key, T, a.AttendCurrent, out var logBeta1);
            var lb2 = CudaBackwardTile.Logs(s2, a.Scale, firstRow + 2, key, T, a.AttendCurrent, out var logBeta2);
            var lb3 = CudaBackwardTile.Logs(s3, a.Scale, firstRow + 3, key, T, a.AttendCurrent, out var logBeta3);
            int lbAt = SegLbOffset + segRow + tx;
            shared[lbAt] = CudaBackwardTile.SumNearestFirst(lb0);
            shared[lbAt + SegStride] = CudaBackwardTile.SumNearestFirst(lb1);
            shared[lbAt + 2 * SegStride] = CudaBackwardTile.SumNearestFirst(lb2);
            shared[lbAt + 3 * SegStride] = CudaBackwardTile.SumNearestFirst(lb3);
            Group.Barrier();

            // A from the acc snapshots, a = A G; a segment sums.
            int lbRow = SegLbOffset + segRow;
            var a0 = CudaBackwardTile.Weights(shared, lbRow, tx, acc0, lb0, logBeta0, g0, out _);
            var a1 = CudaBackwardTile.Weights(shared, lbRow + SegStride, tx, acc1, lb1, logBeta1, g1, out _);
            var a2 = CudaBackwardTile.Weights(shared, lbRow + 2 * SegStride, tx, acc2, lb2, logBeta2, g2, out _);
            var a3 = CudaBackwardTile.Weights(shared, lbRow + 3 * SegStride, tx, acc3, lb3, logBeta3, g3, out _);
            int aAt = SegAOffset + segRow + tx;
            shared[aAt] = CudaBackwardTile.SumFarthestFirst(a0);
            shared[aAt + SegStride] = CudaBackwardTile.SumFarthestFirst(a1);
            shared[aAt + 2 * SegStride] = CudaBackwardTile.SumFarthestFirst(a2);
            shared[aAt + 3 * SegStride] = CudaBackwardTile.SumFarthestFirst(a3);
            Group.Barrier();

            // P (strict prefix of a), its snapshots, dz.
            int aRow = SegAOffset + segRow;
            var dz0 = RowDz(a, shared, aRow, tx, tile, head, firstRow, prefix.X0, dRemRem.X0, a0, lb0, logBeta0, out prefix.X0);
            var dz1 = RowDz(a, shared, aRow + SegStride, tx, tile, head, firstRow + 1, prefix.X1, dRemRem.X1, a1, lb1, logBeta1, out prefix.X1);
            var dz2 = RowDz(a, shared, aRow + 2 * SegStride, tx, tile, head, firstRow + 2, prefix.X2, dRemRem.X2, a2, lb2, logBeta2, out prefix.X2);
            var dz3 = RowDz(a, shared, aRow + 3 * SegStride, tx, tile, head, firstRow + 3, prefix.X3, dRemRem.X3, a3, lb3, logBeta3, out prefix.X3);
            Group.Barrier();   // the segment sums are read: dz may overwrite them
            int zAt = ZOffset + ty * 4 * TileStride + tx * 4;
            CudaBackwardTile.StoreRow(shared, zAt, dz0);
            CudaBackwardTile.StoreRow(shared, zAt + TileStride, dz1);
            CudaBackwardTile.StoreRow(shared, zAt + 2 * TileStride, dz2);
            CudaBackwardTile.StoreRow(shared, zAt + 3 * TileStride, dz3);
            Group.Barrier();

            // dq += dz k, 4 x 8 per thread.
            int keys = Math.Min(KeyTile, lastKey - key0 + 1);
            for (int kk = 0; kk < keys; kk++)
            {
                int kAt = XOffset + tx * TileStride + (kk & 3) * Segments + (kk >> 2);
                var k = new F8(
                    new F4(shared[kAt], shared[kAt + 16 * TileStride], shared[kAt + 32 * TileStride], shared[kAt + 48 * TileStride]),
                    new F4(shared[kAt + 64 * TileStride], shared[kAt + 80 * TileStride], shared[kAt + 96 * TileStride], shared[kAt + 112 * TileStride]));
                int z = ZOffset + ty * 4 * TileStride + kk;
                dq0 = dq0.Fma(shared[z], k);
                dq1 = dq1.Fma(shared[z + TileStride], k);
                dq2 = dq2.Fma(shared[z + 2 * TileStride], k);
                dq3 = dq3.Fma(shared[z + 3 * TileStride], k);
            }
        }

        Store(a, headBase, firstRow, tx, dq0);
        Store(a, headBase, firstRow + 1, tx, dq1);
        Store(a, headBase, firstRow + 2, tx, dq2);
        Store(a, headBase, firstRow + 3, tx, dq3);
    }

    /// <summary>
    /// Loads rows [row0, row0 + 64) of <paramref name="source"/> (Q or dO) as [d][row], row r of dimension d at
    /// <c>offset + d * 64 + (r ^ 4 * (d % 8))</c>; zeros outside the sequence and head. A warp covers 4 rows x 8
    /// dimensions: 4 full 32-byte sectors in global memory, 32 distinct banks in shared memory.
    /// </summary>
    private static void LoadRows(ArrayView<float> shared, int offset, ArrayView<float> source, long headBase,
        int row0, int length, int headDim, int tid)
    {
        for (int e = tid; e < BlockRows * MaxHeadDim; e += GroupSize)
        {
            int dd = e & 7, rr = (e >> 3) & 3, hi = e >> 5;
            int d = (hi & 15) * 8 + dd, r = (hi >> 4) * 4 + rr;
            int row = row0 + r;
            shared[offset + d * BlockRows + (r ^ (dd << 2))] =
                row < length && d < headDim ? source[headBase + (long)row * headDim + d] : 0f;
        }
    }

    /// <summary>One row's dz for this thread's 4 keys; writes the row's P snapshots of this tile; returns P after the tile.</summary>
    private static F4 RowDz(BackwardArgs a, ArrayView<float> shared, int aRow, int tx, int tile, int head, int row,
        float tilePrefix, float dRemRem, F4 weighted, F4 lb, F4 logBeta, out float nextPrefix)
    {
        nextPrefix = CudaBackwardTile.Prefixes(shared, aRow, tx, tilePrefix, out float upperPrefix, out float mine);
        if ((tx == 0 || tx == CudaBackwardTile.HalfSegments)
            && CudaBackwardTile.HasSnapshot(tile, tx, row, a.Length, out int snapshotTile))
        {
            // Thread 0 starts the lower 32-key half, thread 8 the upper one: P before the half is theirs.
            a.PrefixSnapshots[Snapshots.Index(head, row, snapshotTile, a.Length, a.SnapshotTiles)] = tx == 0 ? tilePrefix : upperPrefix;
        }
        return CudaBackwardTile.Dz(weighted, lb, logBeta, mine, dRemRem);
    }

    private static void Store(BackwardArgs a, long headBase, int row, int tx, F8 dq)
    {
        if (row < a.Length)
            CudaBackwardTile.StoreColumns(a.DQ, headBase + (long)row * a.HeadDim, tx, a.HeadDim, dq, a.Scale);
    }
}
