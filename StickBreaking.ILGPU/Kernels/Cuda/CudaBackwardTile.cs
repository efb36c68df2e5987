using System;
using ILGPU;

using StickBreaking.ILGPU.Kernels.Common;
using static StickBreaking.ILGPU.Kernels.Cuda.CudaTiles;

namespace StickBreaking.ILGPU.Kernels.Cuda;

/// <summary>
/// docs/math.md, "Backward", on a 64 x 64 tile held as register tiles, shared by both CUDA backward passes so that they
/// rebuild A, a, P and dz with the same code. Each of the 256 threads owns rows ty*4+i and keys tx*4+j of
/// the tile (ty = tid / 16, tx = tid % 16, as in <see cref="CudaForwardKernel"/>); per row, a thread works on
/// one <see cref="F4"/> of 4 keys. The 64-key tile is two snapshot tiles of 32 keys (<see cref="Snapshots"/>):
/// threads tx &lt; 8 hold the lower one, tx &gt;= 8 the upper one, so every thread reads the snapshot of its
/// own half. The 16 threads of a row are one half of a warp (lanes 16 * (ty % 2) + tx), so the scans along a
/// row combine the threads' segment sums (4 keys each) by warp shuffles: no shared memory and no barrier,
/// and a thread finishes one row (logs, A, a, P, dz) before it starts the next, which keeps few values live
/// beside the register tiles. The CUDA kernels therefore need warps of 32 threads.
/// </summary>
/// <remarks>
/// Every matrix product reads shared memory with 16-byte vector loads (<see cref="F4"/>), from two layouts:
/// <list type="bullet">
/// <item>transposed tiles [d][x] of Q, dO (x = row) or K, V (x = key): 128 x 64 floats, the chunk of 4 x-values
/// c of dimension d at <c>d * 16 + (c ^ (d % 8))</c> (in <see cref="F4"/> units). The XOR makes the loader's
/// transposing stores and the column reads of dq, dk, dv free of bank conflicts;</item>
/// <item>square tiles [y][x] of 64 x 64 (dz, A): plain for pass 1's dz [row][key], and for pass 2's dz and A
/// stored by key [key][row] with the chunk of rows c of key y at <c>y * 16 + (c ^ (y / 4 % 8))</c>.</item>
/// </list>
/// </remarks>
internal static class CudaBackwardTile
{
    /// <summary>Segments per 32-key snapshot tile.</summary>
    public const int HalfSegments = Segments / 2;
    /// <summary>Chunks of 4 floats per 64-wide row of a tile.</summary>
    public const int Chunks = 16;
    /// <summary>Floats of a transposed [d][row or key] tile.</summary>
    public const int TransposedFloats = MaxHeadDim * Chunks * 4;
    /// <summary>Floats of a 64 x 64 [row][key] or [key][row] tile.</summary>
    public const int SquareFloats = BlockRows * Chunks * 4;
    /// <summary>Floats of a per-row statistic staged for both 32-key halves of a tile: [row][half].</summary>
    public const int HalfStatFloats = 2 * BlockRows;
    /// <summary>Global loads a thread keeps in flight while staging a tile (ILGPU does not unroll loops).</summary>
    private const int LoadBatch = 8;

    /// <summary>
    /// Stages rows or keys [x0, x0 + 64) of <paramref name="source"/> (Q, dO, K or V) as a transposed tile at
    /// float offset <paramref name="offset"/>; zeros outside the sequence and head. <paramref name="rows"/>: where the
    /// head's rows lie in <paramref name="source"/>. A warp stores 4 x-values x 8 dimensions: 32 distinct banks, and
    /// 4 full 32-byte sectors of global memory per load.
    /// </summary>
    public static void LoadTransposed(ArrayView<float> shared, int offset, ArrayView<float> source, HeadRows rows,
        int x0, int length, int headDim, int tid)
    {
        // Element m (0..31) of thread tid: x = (m / 2) * 4 + (tid / 8) % 4, d = (tid / 32 + 8 * (m % 2)) * 8 + tid % 8.
        int dLow = tid & 7, xLow = (tid >> 3) & 3, dHigh = (tid >> 5) * 8;
        for (int m = 0; m < 32; m += LoadBatch)
        {
            float v0 = Element(source, rows, x0, length, headDim, m, dLow, xLow, dHigh);
            float v1 = Element(source, rows, x0, length, headDim, m + 1, dLow, xLow, dHigh);
            float v2 = Element(source, rows, x0, length, headDim, m + 2, dLow, xLow, dHigh);
            float v3 = Element(source, rows, x0, length, headDim, m + 3, dLow, xLow, dHigh);
            float v4 = Element(source, rows, x0, length, headDim, m + 4, dLow, xLow, dHigh);
            float v5 = Element(source, rows, x0, length, headDim, m + 5, dLow, xLow, dHigh);
            float v6 = Element(source, rows, x0, length, headDim, m + 6, dLow, xLow, dHigh);
            float v7 = Element(source, rows, x0, length, headDim, m + 7, dLow, xLow, dHigh);
            Put(shared, offset, m, dLow, xLow, dHigh, v0);
            Put(shared, offset, m + 1, dLow, xLow, dHigh, v1);
            Put(shared, offset, m + 2, dLow, xLow, dHigh, v2);
            Put(shared, offset, m + 3, dLow, xLow, dHigh, v3);
            Put(shared, offset, m + 4, dLow, xLow, dHigh, v4);
            Put(shared, offset, m + 5, dLow, xLow, dHigh, v5);
            Put(shared, offset, m + 6, dLow, xLow, dHigh, v6);
            Put(shared, offset, m + 7, dLow, xLow, dHigh, v7);
        }
    }

    private static float Element(ArrayView<float> source, HeadRows rows, int x0, int length, int headDim,
        int m, int dLow, int xLow, int dHigh)
    {
        int x = x0 + (m >> 1) * 4 + xLow, d = dHigh + (m & 1) * 64 + dLow;
        return x < length && d < headDim ? source[rows.Row(x) + d] : 0f;
    }

    private static void Put(ArrayView<float> shared, int offset, int m, int dLow, int xLow, int dHigh, float value)
    {
        int chunk = m >> 1, d = dHigh + (m & 1) * 64 + dLow;
        shared[offset + d * 64 + ((chunk ^ dLow) << 2) + xLow] = value;
    }

    /// <summary>
    /// One matrix product over the head dimension, 4 x 4 per thread: s_i.X_j = sum_d rows[d][ty*4+i] keys[d][tx*4+j]
    /// (S = q.k or G = dO.v), from two transposed tiles at <see cref="F4"/> offsets <paramref name="rowsTile"/>
    /// and <paramref name="keysTile"/>, two dimensions per iteration (the tiles are zero past the head; with
    /// four, ptxas keeps more loads in flight than pass 1's 128 registers hold).
    /// </summary>
    public static void Products(ArrayView<F4> vectors, int rowsTile, int keysTile, int headDim, int ty, int tx,
        out F4 s0, out F4 s1, out F4 s2, out F4 s3)
    {
        s0 = new F4(); s1 = new F4(); s2 = new F4(); s3 = new F4();
        for (int d = 0; d < headDim; d += 2)
        {
            ProductStep(vectors, rowsTile, keysTile, d, ty, tx, ref s0, ref s1, ref s2, ref s3);
            ProductStep(vectors, rowsTile, keysTile, d + 1, ty, tx, ref s0, ref s1, ref s2, ref s3);
        }
    }

    private static void ProductStep(ArrayView<F4> vectors, int rowsTile, int keysTile, int d, int ty, int tx,
        ref F4 s0, ref F4 s1, ref F4 s2, ref F4 s3)
    {
        int swizzle = d & 7;
        var r = vectors[rowsTile + d * Chunks + (ty ^ swizzle)];   // x = ty*4 + i
        var k = vectors[keysTile + d * Chunks + (tx ^ swizzle)];   // x = tx*4 + j
        s0 = s0.Fma(r.X0, k);
        s1 = s1.Fma(r.X1, k);
        s2 = s2.Fma(r.X2, k);
        s3 = s3.Fma(r.X3, k);
    }

    /// <summary>
    /// One step of dq += dz k, dk += dz^T q or dv += A^T dO over 4 of the summed index: column c of
    /// <paramref name="acc"/> (dimension d = tx + 16c) gains z_i . x[d][chunk], x a transposed tile at
    /// <see cref="F4"/> offset <paramref name="tile"/>. Since d % 8 = tx % 8 for every c, the eight loads share
    /// one swizzle and a warp's loads hit distinct banks.
    /// </summary>
    public static void ColumnStep(ArrayView<F4> vectors, int tile, int chunk, int tx, F4 z0, F4 z1, F4 z2, F4 z3,
        ref Columns acc)
    {
        // One base address and constant offsets (a view per step: ptxas cannot fold 32-bit index sums into offsets).
        const int Column = 16 * Chunks;   // d + 16
        var x = vectors.SubView(tile + tx * Chunks + (chunk ^ (tx & 7)), 7 * Column + 1);
        acc.C0 = acc.C0.AddDots(z0, z1, z2, z3, x[0]);
        acc.C1 = acc.C1.AddDots(z0, z1, z2, z3, x[Column]);
        acc.C2 = acc.C2.AddDots(z0, z1, z2, z3, x[2 * Column]);
        acc.C3 = acc.C3.AddDots(z0, z1, z2, z3, x[3 * Column]);
        acc.C4 = acc.C4.AddDots(z0, z1, z2, z3, x[4 * Column]);
        acc.C5 = acc.C5.AddDots(z0, z1, z2, z3, x[5 * Column]);
        acc.C6 = acc.C6.AddDots(z0, z1, z2, z3, x[6 * Column]);
        acc.C7 = acc.C7.AddDots(z0, z1, z2, z3, x[7 * Column]);
    }

    /// <summary>
    /// <see cref="ColumnStep"/> for the one 4 x 4 block of a diagonal tile where some pairs are not visible: the
    /// term of element i of the register tile and element m of the summed index is added only when
    /// <paramref name="lo"/> &lt;= m - i &lt;= <paramref name="hi"/>, and selected away otherwise, never multiplied
    /// by a zero dz or A (0 times a NaN or infinite k, q or dO is NaN). Pass 1 (dq, i a row, m a key):
    /// lo = -3, hi = AttendCurrent - 1; pass 2 (dk and dv, i a key, m a row): lo = 1 - AttendCurrent, hi = 3.
    /// </summary>
    public static void DiagonalColumnStep(ArrayView<F4> vectors, int tile, int chunk, int tx, F4 z0, F4 z1, F4 z2, F4 z3,
        int lo, int hi, ref Columns acc)
    {
        const int Column = 16 * Chunks;
        var x = vectors.SubView(tile + tx * Chunks + (chunk ^ (tx & 7)), 7 * Column + 1);
        acc.C0 = acc.C0.AddDotsInBand(z0, z1, z2, z3, x[0], lo, hi);
        acc.C1 = acc.C1.AddDotsInBand(z0, z1, z2, z3, x[Column], lo, hi);
        acc.C2 = acc.C2.AddDotsInBand(z0, z1, z2, z3, x[2 * Column], lo, hi);
        acc.C3 = acc.C3.AddDotsInBand(z0, z1, z2, z3, x[3 * Column], lo, hi);
        acc.C4 = acc.C4.AddDotsInBand(z0, z1, z2, z3, x[4 * Column], lo, hi);
        acc.C5 = acc.C5.AddDotsInBand(z0, z1, z2, z3, x[5 * Column], lo, hi);
        acc.C6 = acc.C6.AddDotsInBand(z0, z1, z2, z3, x[6 * Column], lo, hi);
        acc.C7 = acc.C7.AddDotsInBand(z0, z1, z2, z3, x[7 * Column], lo, hi);
    }

    /// <summary>
    /// Stores one row (<paramref name="r"/> = ty*4+i) of the thread's block, keys tx*4+j, into a [key][row] square
    /// tile at float offset <paramref name="offset"/>: key y, rows 4c..4c+3 at <c>y * 64 + 4 * (c ^ (y / 4 % 8))</c>, so that
    /// the 8 threads of a quarter warp (keys 4 apart) write distinct banks.
    /// </summary>
    public static void StoreRowByKey(ArrayView<float> shared, int offset, int r, int tx, F4 x)
    {
        int at = offset + tx * 4 * 64 + (((r >> 2) ^ (tx & 7)) << 2) + (r & 3);
        shared[at] = x.X0;
        shared[at + 64] = x.X1;
        shared[at + 2 * 64] = x.X2;
        shared[at + 3 * 64] = x.X3;
    }

    /// <summary>Rows 4c..4c+3 of key <paramref name="key"/> in a [key][row] square tile (see <see cref="StoreRowByKey"/>).</summary>
    public static F4 ReadByKey(ArrayView<F4> vectors, int tile, int key, int chunk) =>
        vectors[tile + key * Chunks + (chunk ^ ((key >> 2) & 7))];

    /// <summary>
    /// Stages a per-row snapshot for both 32-key halves of 64-key tile <paramref name="tile"/>: row r, half h at
    /// float <c>offset + 2r + h</c>, 0 where the row has none (it is outside the
    /// sequence or before the half's first key: no forward or pass 1 writes one there). Threads 0..127 load
    /// it when <paramref name="part"/> is 0, threads 128..255 when it is 1.
    /// </summary>
    public static void StageSnapshots(ArrayView<float> shared, int offset, ArrayView<float> snapshots, int head,
        int row0, int tile, int length, int tiles, int tid, int part)
    {
        if ((tid >> 7) != part)
            return;
        int r = (tid & 127) >> 1, h = tid & 1;
        int row = row0 + r, snapshotTile = 2 * tile + h;
        bool has = row < length && snapshotTile * Snapshots.KeyTile <= row;
        shared[offset + (tid & 127)] = has ? snapshots[Snapshots.Index(head, row, snapshotTile, length, tiles)] : 0f;
    }

    /// <summary>
    /// Writes out the per-row snapshots of both 32-key halves of 64-key tile <paramref name="tile"/> staged at float
    /// <paramref name="offset"/> (row r, half h at <c>offset + 2r + h</c>), where the row has one (see
    /// <see cref="StageSnapshots"/>): threads 0..127, one snapshot each, so that no thread keeps per-row addresses.
    /// </summary>
    public static void WriteSnapshots(ArrayView<float> shared, int offset, ArrayView<float> snapshots, int head,
        int row0, int tile, int length, int tiles, int tid)
    {
        if (tid >= HalfStatFloats)
            return;
        int r = tid >> 1, h = tid & 1;
        int row = row0 + r, snapshotTile = 2 * tile + h;
        if (row < length && snapshotTile * Snapshots.KeyTile <= row)
            snapshots[Snapshots.Index(head, row, snapshotTile, length, tiles)] = shared[offset + tid];
    }

    /// <summary>The staged snapshot of this thread's 32-key half for the tile's row <paramref name="r"/>.</summary>
    public static float StagedSnapshot(ArrayView<float> shared, int offset, int r, int tx) =>
        shared[offset + 2 * r + (tx >= HalfSegments ? 1 : 0)];

    /// <summary>Sum of a over one segment, farthest key first (the direction of the prefix P).</summary>
    public static float SumFarthestFirst(F4 x) => x.X0 + x.X1 + x.X2 + x.X3;

    /// <summary>
    /// One row's logs and weights for this thread's 4 keys: lb = log(1 - beta) and logBeta = log(beta) from the
    /// dots <paramref name="s"/>, A = exp(logBeta + acc + sum of lb over the nearer keys) (<paramref name="weights"/>),
    /// and returns a = A * G. <paramref name="accSnapshot"/>: the forward's acc before this thread's 32-key half
    /// (the sum of lb over the keys past it); the nearer segments of the half come from the other threads of
    /// the row by shuffles (<see cref="ExclusiveSuffix"/>). Every thread of the warp must call it.
    /// </summary>
    public static F4 Weights(F4 s, F4 g, float scale, int row, int key, int length, int attendCurrent, float accSnapshot,
        int tx, out F4 lb, out F4 logBeta, out F4 weights)
    {
        lb = TileLogs.Logs(s, scale, row, key, length, attendCurrent, out logBeta);
        float suffix = accSnapshot + ExclusiveSuffix(TileLogs.SumNearestFirst(lb), tx & (HalfSegments - 1));
        weights = new F4();
        weights.X3 = MathF.Exp(logBeta.X3 + suffix);
        suffix += lb.X3;
        weights.X2 = MathF.Exp(logBeta.X2 + suffix);
        suffix += lb.X2;
        weights.X1 = MathF.Exp(logBeta.X1 + suffix);
        suffix += lb.X1;
        weights.X0 = MathF.Exp(logBeta.X0 + suffix);
        // A and a of a key the row cannot see are selected to 0: G = dO.v there may be NaN or infinite (a poisoned
        // v_j or dO_i of a pair that is not visible), and 0 times it would carry the NaN into P and dz.
        // An unseen key is the one whose logBeta TileLogs.Logs set to -inf (see Dz).
        weights = new F4(Seen(logBeta.X0, weights.X0), Seen(logBeta.X1, weights.X1),
            Seen(logBeta.X2, weights.X2), Seen(logBeta.X3, weights.X3));
        return new F4(Seen(logBeta.X0, weights.X0 * g.X0), Seen(logBeta.X1, weights.X1 * g.X1),
            Seen(logBeta.X2, weights.X2 * g.X2), Seen(logBeta.X3, weights.X3 * g.X3));
    }

    /// <summary>
    /// dz = (1 - beta) a - beta (P + dRem rem) for one row's 4 keys, with 1 - beta = exp(lb) and beta = exp(logBeta)
    /// (never 1 - beta); <paramref name="prefix"/> is P before the first of the 4 keys. A key the row cannot see
    /// gets dz = 0 by a select: beta = 0 there, but 0 times an infinite P + dRem rem is NaN. Such a key is the one
    /// whose logBeta <see cref="TileLogs.Logs"/> set to -inf (a visible key has logBeta = -inf only where z = -inf,
    /// beta = 0 and the true dz is 0 as well), so the select needs no row, key or length kept live in registers.
    /// </summary>
    public static F4 Dz(F4 a, F4 lb, F4 logBeta, float prefix, float dRemRem)
    {
        var dz = new F4();
        float p = prefix;
        dz.X0 = MathF.Exp(lb.X0) * a.X0 - MathF.Exp(logBeta.X0) * (p + dRemRem);
        p += a.X0;
        dz.X1 = MathF.Exp(lb.X1) * a.X1 - MathF.Exp(logBeta.X1) * (p + dRemRem);
        p += a.X1;
        dz.X2 = MathF.Exp(lb.X2) * a.X2 - MathF.Exp(logBeta.X2) * (p + dRemRem);
        p += a.X2;
        dz.X3 = MathF.Exp(lb.X3) * a.X3 - MathF.Exp(logBeta.X3) * (p + dRemRem);
        return new F4(Seen(logBeta.X0, dz.X0), Seen(logBeta.X1, dz.X1), Seen(logBeta.X2, dz.X2), Seen(logBeta.X3, dz.X3));
    }

    /// <summary><paramref name="value"/> where the key is seen (logBeta above -inf, or NaN), else 0 by a select.</summary>
    private static float Seen(float logBeta, float value) => logBeta != float.NegativeInfinity ? value : 0f;

    /// <summary>
    /// P before this thread's 4 keys, from P before its 32-key half (<paramref name="halfPrefix"/>) plus the
    /// a segment sums (<paramref name="segment"/>: this thread's) of the farther segments of the half. Pass 1
    /// reaches the same value through <see cref="Prefixes"/>. Every thread of the warp must call it.
    /// </summary>
    public static float PrefixInHalf(float segment, int tx, float halfPrefix) =>
        halfPrefix + ExclusivePrefix(segment, tx & (HalfSegments - 1));

    /// <summary>
    /// Pass 1: from P before the 64-key tile, P before the upper 32-key half (a snapshot), P before this
    /// thread's keys, and (returned) P after the tile, the same in all 16 threads of the row. Every thread of
    /// the warp must call it.
    /// </summary>
    public static float Prefixes(float segment, int tx, float tilePrefix, out float upperPrefix, out float mine)
    {
        bool upper = tx >= HalfSegments;
        float halfTotal = Total(segment);
        float otherTotal = Warp.ShuffleXor(halfTotal, HalfSegments);   // the other half of the row
        upperPrefix = tilePrefix + (upper ? otherTotal : halfTotal);
        mine = PrefixInHalf(segment, tx, upper ? upperPrefix : tilePrefix);
        return upperPrefix + (upper ? halfTotal : otherTotal);
    }

    // Scans over the 8 threads of a 32-key half (lanes 8k..8k+7 of the warp; position = tx % 8), by shuffles
    // with constant offsets (no lane indices held in registers). Each is a fixed tree of fp32 additions, so the
    // same inputs give bitwise the same sums in both passes.

    /// <summary>Sum of <paramref name="x"/> over the positions of the half below <paramref name="position"/> (farther keys).</summary>
    private static float ExclusivePrefix(float x, int position)
    {
        float y = Warp.ShuffleUp(x, 1, HalfSegments);
        if (position >= 1)
            x += y;
        y = Warp.ShuffleUp(x, 2, HalfSegments);
        if (position >= 2)
            x += y;
        y = Warp.ShuffleUp(x, 4, HalfSegments);
        if (position >= 4)
            x += y;
        y = Warp.ShuffleUp(x, 1, HalfSegments);
        return position >= 1 ? y : 0f;
    }

    /// <summary>Sum of <paramref name="x"/> over the positions of the half above <paramref name="position"/> (nearer keys).</summary>
    private static float ExclusiveSuffix(float x, int position)
    {
        const int Last = HalfSegments - 1;
        float y = Warp.ShuffleDown(x, 1, HalfSegments);
        if (position + 1 <= Last)
            x += y;
        y = Warp.ShuffleDown(x, 2, HalfSegments);
        if (position + 2 <= Last)
            x += y;
        y = Warp.ShuffleDown(x, 4, HalfSegments);
        if (position + 4 <= Last)
            x += y;
        y = Warp.ShuffleDown(x, 1, HalfSegments);
        return position < Last ? y : 0f;
    }

    /// <summary>Sum of <paramref name="x"/> over the 8 threads of the half, bitwise the same in each (a butterfly: a + b = b + a exactly).</summary>
    private static float Total(float x)
    {
        x += Warp.ShuffleXor(x, 1);
        x += Warp.ShuffleXor(x, 2);
        x += Warp.ShuffleXor(x, 4);
        return x;
    }

    /// <summary>dRem_i rem_i for one row, 0 outside the sequence.</summary>
    public static float DRemRem(ArrayView<float> dRem, ArrayView<float> logRem, int head, int row, int length)
    {
        if (row >= length)
            return 0f;
        long at = (long)head * length + row;
        return dRem[at] * MathF.Exp(logRem[at]);
    }

    /// <summary>Stores a row of a 4 x 8 register tile at columns tx + 16c, times <paramref name="factor"/>.</summary>
    public static void StoreColumns(ArrayView<float> target, long rowAt, int tx, int headDim, F8 x, float factor)
    {
        StoreColumn(target, rowAt, tx, headDim, factor * x.Lo.X0);
        StoreColumn(target, rowAt, tx + 16, headDim, factor * x.Lo.X1);
        StoreColumn(target, rowAt, tx + 32, headDim, factor * x.Lo.X2);
        StoreColumn(target, rowAt, tx + 48, headDim, factor * x.Lo.X3);
        StoreColumn(target, rowAt, tx + 64, headDim, factor * x.Hi.X0);
        StoreColumn(target, rowAt, tx + 80, headDim, factor * x.Hi.X1);
        StoreColumn(target, rowAt, tx + 96, headDim, factor * x.Hi.X2);
        StoreColumn(target, rowAt, tx + 112, headDim, factor * x.Hi.X3);
    }

    private static void StoreColumn(ArrayView<float> target, long rowAt, int column, int headDim, float value)
    {
        if (column < headDim)
            target[rowAt + column] = value;
    }
}
