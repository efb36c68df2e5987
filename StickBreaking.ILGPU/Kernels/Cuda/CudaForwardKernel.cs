using System;
using ILGPU;

using StickBreaking.ILGPU.Kernels.Common;
using StickBreaking.ILGPU.Launch;
using static StickBreaking.ILGPU.Kernels.Cuda.CudaTiles;

namespace StickBreaking.ILGPU.Kernels.Cuda;

/// <summary>
/// The CUDA forward for head dimensions up to <see cref="MaxHeadDim"/> (docs/math.md, "Tiled forward"): one group of
/// <see cref="GroupSize"/> threads per (head, block of <see cref="BlockRows"/> query rows), key tiles of
/// <see cref="KeyTile"/> from the diagonal back to key 0. Register tiles: each thread owns a 4 x 4 block of
/// z = s q.k (rows ty*4+i, keys tx*4+j) and a 4 x 8 block of the output (rows ty*4+i, columns tx*4+c and
/// 64+tx*4+c). Every shared-memory read is a 16-byte vector load (ILGPU emits ld.shared.v4 for a view cast
/// to <see cref="F4"/>): shared-memory bandwidth, not the FMAs, bounded the scalar version.
/// The in-tile reverse cumulative sum is split: each thread sums its 4 keys, the 16 segment sums of a row
/// meet in shared memory. The Q block stays in shared memory; K and V tiles take turns in one buffer.
/// Shared memory is dynamic and above 48 KB (set through cuFuncSetAttribute by the loader).
/// Writes the backward's acc snapshots per 32-key tile when asked.
/// </summary>
internal static class CudaForwardKernel
{
    /// <summary>Launch bound (two groups per SM: its register tiles fit 128 registers without spills).</summary>
    public const int MinGroupsPerMultiprocessor = 2;
    /// <summary>Row stride of the transposed Q and K tiles [d][row or key]: a multiple of 4 for vector loads.</summary>
    private const int TransposedStride = 68;
    /// <summary>Row stride of the transposed weights [key][row].</summary>
    private const int PStride = 68;
    private const int SegStride = Segments + 1;

    private const int QOffset = 0;
    private const int KvOffset = QOffset + MaxHeadDim * TransposedStride;
    private const int POffset = KvOffset + MaxHeadDim * TransposedStride;   // >= KeyTile * MaxHeadDim (V)
    private const int SegOffset = POffset + KeyTile * PStride;
    /// <summary>Dynamic shared memory, in floats.</summary>
    public const int SharedFloats = SegOffset + BlockRows * SegStride;

    /// <summary>How the launch layer runs it: the CUDA tile (<see cref="CudaTiles"/>), its shared memory and launch bound.</summary>
    public static readonly KernelLaunch<ForwardArgs<float>> Launch = new()
    {
        Name = "CUDA forward", Body = Kernel, Family = KernelFamily.Cuda, RowsPerGroup = BlockRows, GroupSize = GroupSize,
        SharedBytes = sizeof(float) * SharedFloats, MinGroupsPerMultiprocessor = MinGroupsPerMultiprocessor,
        MaxHeadDim = MaxHeadDim, WarpSize = WarpSize,
    };

    public static void Kernel(ForwardArgs<float> a)
    {
        int tid = Group.IdxX;
        int ty = tid / Segments, tx = tid - ty * Segments;
        int head = Grid.IdxX;
        int rowBlock = a.RowBlocks - 1 - Grid.IdxY;
        int T = a.Length, D = a.HeadDim;
        int row0 = rowBlock * BlockRows;
        // Rows of this query head in q, and of the key/value head it reads in k and v (any layout).
        var q = HeadRows.Query(a.Rows, a.Rows.Q, head);
        var k = HeadRows.KeyOfQuery(a.Rows, a.Rows.K, head);
        var v = HeadRows.KeyOfQuery(a.Rows, a.Rows.V, head);
        var shared = SharedMemory.GetDynamic<float>();

        // Q block, transposed: Qs[d][row].
        for (int e = tid; e < BlockRows * MaxHeadDim; e += GroupSize)
        {
            int r = e / MaxHeadDim, d = e - r * MaxHeadDim;
            int row = row0 + r;
            shared[QOffset + d * TransposedStride + r] = row < T && d < D ? a.Q[q.Row(row) + d] : 0f;
        }

        var acc = new F4();          // acc of rows ty*4 + i
        F8 o0 = new(), o1 = new(), o2 = new(), o3 = new();
        int firstRow = row0 + ty * 4;
        int lastKey = Math.Min(T - 1, row0 + BlockRows - 1);
        for (int tile = lastKey / KeyTile; tile >= 0; tile--)
        {
            int key0 = tile * KeyTile;
            Group.Barrier();
            // K tile, transposed: Ks[d][key].
            LoadTile(a.K, shared, k, key0, T, D, tid, transpose: true);
            Group.Barrier();

            // z = q.k, 4 x 4 per thread; four dimensions per iteration (the staged tiles are zero past D).
            F4 s0 = new(), s1 = new(), s2 = new(), s3 = new();
            for (int d = 0; d < D; d += 4)
            {
                Dot(shared, d, ty, tx, ref s0, ref s1, ref s2, ref s3);
                Dot(shared, d + 1, ty, tx, ref s0, ref s1, ref s2, ref s3);
                Dot(shared, d + 2, ty, tx, ref s0, ref s1, ref s2, ref s3);
                Dot(shared, d + 3, ty, tx, ref s0, ref s1, ref s2, ref s3);
            }

            // log(1 - beta) and log(beta) per element; each thread's 4-key segment sums.
            int key = key0 + tx * 4;
            var lb0 = TileLogs.Logs(s0, a.Scale, firstRow, key, a.Length, a.AttendCurrent, out var logBeta0);
            var lb1 = TileLogs.Logs(s1, a.Scale, firstRow + 1, key, a.Length, a.AttendCurrent, out var logBeta1);
            var lb2 = TileLogs.Logs(s2, a.Scale, firstRow + 2, key, a.Length, a.AttendCurrent, out var logBeta2);
            var lb3 = TileLogs.Logs(s3, a.Scale, firstRow + 3, key, a.Length, a.AttendCurrent, out var logBeta3);
            int segAt = SegOffset + ty * 4 * SegStride + tx;
            shared[segAt] = TileLogs.SumNearestFirst(lb0);
            shared[segAt + SegStride] = TileLogs.SumNearestFirst(lb1);
            shared[segAt + 2 * SegStride] = TileLogs.SumNearestFirst(lb2);
            shared[segAt + 3 * SegStride] = TileLogs.SumNearestFirst(lb3);
            Group.Barrier();

            // V tile over the K tile: Vs[key][d].
            LoadTile(a.V, shared, v, key0, T, D, tid, transpose: false);

            // Weights: exp(log beta + acc + sum of lb over the nearer keys), into Ps[key][row].
            int pAt = POffset + tx * 4 * PStride + ty * 4;   // Ps[key tx*4][row ty*4]
            acc.X0 = Weights(shared, lb0, logBeta0, acc.X0, ty * 4, tx, pAt, a, firstRow, tile);
            acc.X1 = Weights(shared, lb1, logBeta1, acc.X1, ty * 4 + 1, tx, pAt + 1, a, firstRow + 1, tile);
            acc.X2 = Weights(shared, lb2, logBeta2, acc.X2, ty * 4 + 2, tx, pAt + 2, a, firstRow + 2, tile);
            acc.X3 = Weights(shared, lb3, logBeta3, acc.X3, ty * 4 + 3, tx, pAt + 3, a, firstRow + 3, tile);
            Group.Barrier();

            // out += A v, 4 x 8 per thread, two keys per iteration, over the keys the thread's rows see: a key a row
            // cannot see has weight 0, but 0 times a NaN or infinite v is NaN (masks select, never multiply). Below
            // the diagonal tile every row sees every key. In the diagonal tile (key0 == row0; the first one, as
            // BlockRows == KeyTile) all four rows see the keys before the first of them, some see the next four
            // (a step that selects each row's product) and none sees the rest (skipped).
            bool diagonal = key0 == row0;
            int allSee = diagonal ? ty * 4 : KeyTile;
            for (int kk = 0; kk < allSee; kk += 2)
            {
                Accumulate(shared, kk, ty, tx, ref o0, ref o1, ref o2, ref o3);
                Accumulate(shared, kk + 1, ty, tx, ref o0, ref o1, ref o2, ref o3);
            }
            if (diagonal)
            {
                for (int m = 0; m < 4; m++)
                    AccumulateDiagonal(shared, allSee + m, m - a.AttendCurrent, ty, tx, ref o0, ref o1, ref o2, ref o3);
            }
        }

        var o = HeadRows.Query(a.Rows, a.Rows.O, head);
        Store(a, o, firstRow, tx, o0, acc.X0);
        Store(a, o, firstRow + 1, tx, o1, acc.X1);
        Store(a, o, firstRow + 2, tx, o2, acc.X2);
        Store(a, o, firstRow + 3, tx, o3, acc.X3);
    }

    /// <summary>One step of z += q k^T: dimension d for the thread's 4 rows and 4 keys (two vector loads).</summary>
    private static void Dot(ArrayView<float> shared, int d, int ty, int tx, ref F4 s0, ref F4 s1, ref F4 s2, ref F4 s3)
    {
        var vectors = shared.Cast<F4>();
        var q = vectors[(QOffset + d * TransposedStride + ty * 4) / 4];   // rows ty*4 + i
        var k = vectors[(KvOffset + d * TransposedStride + tx * 4) / 4];  // keys tx*4 + j
        s0 = s0.Fma(q.X0, k);
        s1 = s1.Fma(q.X1, k);
        s2 = s2.Fma(q.X2, k);
        s3 = s3.Fma(q.X3, k);
    }

    /// <summary>One step of out += A v: key kk for the thread's 4 rows and 8 columns (three vector loads).</summary>
    private static void Accumulate(ArrayView<float> shared, int kk, int ty, int tx, ref F8 o0, ref F8 o1, ref F8 o2, ref F8 o3)
    {
        var vectors = shared.Cast<F4>();
        int vAt = (KvOffset + kk * MaxHeadDim + tx * 4) / 4;
        var v = new F8(vectors[vAt], vectors[vAt + 16]);                  // columns tx*4 + c and 64 + tx*4 + c
        var p = vectors[(POffset + kk * PStride + ty * 4) / 4];           // weights of rows ty*4 + i
        o0 = o0.Fma(p.X0, v);
        o1 = o1.Fma(p.X1, v);
        o2 = o2.Fma(p.X2, v);
        o3 = o3.Fma(p.X3, v);
    }

    /// <summary>
    /// <see cref="Accumulate"/> for key kk = ty*4 + m of the diagonal tile, which row ty*4 + i sees when
    /// i &gt; <paramref name="hidden"/> = m - AttendCurrent: the other rows' products are selected away, not
    /// multiplied by a zero weight.
    /// </summary>
    private static void AccumulateDiagonal(ArrayView<float> shared, int kk, int hidden, int ty, int tx,
        ref F8 o0, ref F8 o1, ref F8 o2, ref F8 o3)
    {
        var vectors = shared.Cast<F4>();
        int vAt = (KvOffset + kk * MaxHeadDim + tx * 4) / 4;
        var v = new F8(vectors[vAt], vectors[vAt + 16]);
        var p = vectors[(POffset + kk * PStride + ty * 4) / 4];
        if (0 > hidden)
            o0 = o0.Fma(p.X0, v);
        if (1 > hidden)
            o1 = o1.Fma(p.X1, v);
        if (2 > hidden)
            o2 = o2.Fma(p.X2, v);
        if (3 > hidden)
            o3 = o3.Fma(p.X3, v);
    }

    /// <summary>
    /// Stages a 64-key tile of K (transposed) or V (row-major) in the shared K/V buffer. Each
    /// thread owns one dimension d = tid % 128 and keys tid / 128 + 2m; the 32 loads go out 8 at a time before
    /// their stores, so that 8 global loads per thread are in flight (ILGPU does not unroll the loop itself).
    /// </summary>
    private static void LoadTile(ArrayView<float> x, ArrayView<float> shared, HeadRows keys, int key0, int T, int D,
        int tid, bool transpose)
    {
        int d = tid % MaxHeadDim, firstKey = tid / MaxHeadDim;
        bool column = d < D;
        for (int m = 0; m < KeyTile / 2; m += 8)
        {
            int kk = firstKey + 2 * m;
            float v0 = Element(x, keys, key0 + kk, T, d, column);
            float v1 = Element(x, keys, key0 + kk + 2, T, d, column);
            float v2 = Element(x, keys, key0 + kk + 4, T, d, column);
            float v3 = Element(x, keys, key0 + kk + 6, T, d, column);
            float v4 = Element(x, keys, key0 + kk + 8, T, d, column);
            float v5 = Element(x, keys, key0 + kk + 10, T, d, column);
            float v6 = Element(x, keys, key0 + kk + 12, T, d, column);
            float v7 = Element(x, keys, key0 + kk + 14, T, d, column);
            Put(shared, kk, d, v0, transpose);
            Put(shared, kk + 2, d, v1, transpose);
            Put(shared, kk + 4, d, v2, transpose);
            Put(shared, kk + 6, d, v3, transpose);
            Put(shared, kk + 8, d, v4, transpose);
            Put(shared, kk + 10, d, v5, transpose);
            Put(shared, kk + 12, d, v6, transpose);
            Put(shared, kk + 14, d, v7, transpose);
        }
    }

    private static float Element(ArrayView<float> x, HeadRows keys, int key, int T, int d, bool column) =>
        column && key < T ? x[keys.Row(key) + d] : 0f;

    private static void Put(ArrayView<float> shared, int kk, int d, float value, bool transpose)
    {
        if (transpose)
            shared[KvOffset + d * TransposedStride + kk] = value;
        else
            shared[KvOffset + kk * MaxHeadDim + d] = value;
    }

    /// <summary>
    /// One row's weights for this thread's 4 keys, written to Ps; returns the row's acc after the tile. Also
    /// writes the acc snapshots of the two 32-key tiles inside this 64-key tile.
    /// </summary>
    private static float Weights(ArrayView<float> shared, F4 lb, F4 logBeta, float rowAcc, int r, int tx, int pAt,
        ForwardArgs<float> a, int row, int tile)
    {
        int segRow = SegOffset + r * SegStride;
        float nearer = 0f;        // sum of lb over the segments right of this thread's
        float total = 0f;
        for (int seg = Segments - 1; seg >= 0; seg--)
        {
            if (seg == tx)
                nearer = total;
            total += shared[segRow + seg];
        }
        float suffix = rowAcc + nearer;
        float w3 = MathF.Exp(logBeta.X3 + suffix);
        suffix += lb.X3;
        float w2 = MathF.Exp(logBeta.X2 + suffix);
        suffix += lb.X2;
        float w1 = MathF.Exp(logBeta.X1 + suffix);
        suffix += lb.X1;
        float w0 = MathF.Exp(logBeta.X0 + suffix);
        shared[pAt] = w0;
        shared[pAt + PStride] = w1;
        shared[pAt + 2 * PStride] = w2;
        shared[pAt + 3 * PStride] = w3;

        if (a.WriteSnapshots != 0 && row < a.Length)
        {
            int half = 2 * tile;
            if (tx == Segments / 2 - 1)   // nearer = keys 32..63 of the tile: acc before the lower 32-key tile
                a.AccSnapshots[Snapshots.Index(Grid.IdxX, row, half, a.Length, a.SnapshotTiles)] = rowAcc + nearer;
            if (tx == Segments - 1 && half + 1 < a.SnapshotTiles)
                a.AccSnapshots[Snapshots.Index(Grid.IdxX, row, half + 1, a.Length, a.SnapshotTiles)] = rowAcc;
        }
        return rowAcc + total;
    }

    private static void Store(ForwardArgs<float> a, HeadRows o, int row, int tx, F8 x, float rowAcc)
    {
        if (row >= a.Length)
            return;
        long at = o.Row(row);
        StoreColumn(a, at, tx * 4, x.Lo.X0);
        StoreColumn(a, at, tx * 4 + 1, x.Lo.X1);
        StoreColumn(a, at, tx * 4 + 2, x.Lo.X2);
        StoreColumn(a, at, tx * 4 + 3, x.Lo.X3);
        StoreColumn(a, at, 64 + tx * 4, x.Hi.X0);
        StoreColumn(a, at, 64 + tx * 4 + 1, x.Hi.X1);
        StoreColumn(a, at, 64 + tx * 4 + 2, x.Hi.X2);
        StoreColumn(a, at, 64 + tx * 4 + 3, x.Hi.X3);
        if (tx == 0)
        {
            long stat = (long)Grid.IdxX * a.Length + row;
            a.LogRem[stat] = rowAcc;
            a.Rem[stat] = MathF.Exp(rowAcc);
        }
    }

    private static void StoreColumn(ForwardArgs<float> a, long rowAt, int column, float value)
    {
        if (column < a.HeadDim)
            a.O[rowAt + column] = value;
    }
}
