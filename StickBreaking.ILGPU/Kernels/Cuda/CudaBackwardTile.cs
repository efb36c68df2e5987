using System;
using ILGPU;

namespace StickBreaking.ILGPU.Kernels.Cuda;

/// <summary>
/// SPEC section 2 on a 64 x 64 tile held as register tiles, shared by both CUDA backward passes so that they
/// rebuild A, a, P and dz with the same code. Each of the 256 threads owns rows ty*4+i and keys tx*4+j of
/// the tile (ty = tid / 16, tx = tid % 16, as in <see cref="CudaForwardKernel"/>); per row, a thread works on
/// one <see cref="F4"/> of 4 keys. The 64-key tile is two snapshot tiles of 32 keys (<see cref="Snapshots"/>):
/// threads tx &lt; 8 hold the lower one, tx &gt;= 8 the upper one, so every thread reads the snapshot of its
/// own half. Scans across threads go through segment sums (4 keys per thread) in shared memory.
/// </summary>
internal static class CudaBackwardTile
{
    public const int GroupSize = 256;
    public const int BlockRows = 64;
    public const int KeyTile = 64;
    public const int MaxHeadDim = 128;
    /// <summary>Segments (of 4 keys) per row of a key tile: the 16 threads of a row.</summary>
    public const int Segments = 16;
    /// <summary>Segments per 32-key snapshot tile.</summary>
    public const int HalfSegments = Segments / 2;
    public const int SegStride = Segments + 1;
    /// <summary>Floats of one segment-sum array [row][segment].</summary>
    public const int SegFloats = BlockRows * SegStride;
    /// <summary>Row stride of a [d][key] K or V tile (keys swizzled: key tx*4+j at column j*16+tx) and of [row][key] tiles.</summary>
    public const int TileStride = KeyTile + 1;
    /// <summary>Floats of a transposed [d][key] K or V tile.</summary>
    public const int KeyTileFloats = MaxHeadDim * TileStride;
    /// <summary>Floats of a [row][key] tile (dz or A).</summary>
    public const int RowTileFloats = BlockRows * TileStride;

    /// <summary>
    /// Loads keys [key0, key0 + 64) of <paramref name="source"/> (K or V), transposed and swizzled:
    /// key kk, dimension d at <c>offset + d * TileStride + (kk % 4) * 16 + kk / 4</c>; zeros outside the sequence and head.
    /// </summary>
    public static void LoadKeyTile(ArrayView<float> shared, int offset, ArrayView<float> source, long headBase,
        int key0, int length, int headDim, int tid)
    {
        for (int e = tid; e < KeyTile * MaxHeadDim; e += GroupSize)
        {
            int kk = e / MaxHeadDim, d = e - kk * MaxHeadDim;
            int key = key0 + kk;
            int column = (kk & 3) * Segments + (kk >> 2);
            shared[offset + d * TileStride + column] = key < length && d < headDim ? source[headBase + (long)key * headDim + d] : 0f;
        }
    }

    /// <summary>lb = log(1 - beta) per key of one row's segment (0 where not visible), logBeta = log(beta) (-inf where not visible).</summary>
    public static F4 Logs(F4 dots, float scale, int row, int key, int length, int attendCurrent, out F4 logBeta)
    {
        var lb = new F4();
        logBeta = new F4();
        Element(dots.X0, scale, row, key, length, attendCurrent, out lb.X0, out logBeta.X0);
        Element(dots.X1, scale, row, key + 1, length, attendCurrent, out lb.X1, out logBeta.X1);
        Element(dots.X2, scale, row, key + 2, length, attendCurrent, out lb.X2, out logBeta.X2);
        Element(dots.X3, scale, row, key + 3, length, attendCurrent, out lb.X3, out logBeta.X3);
        return lb;
    }

    private static void Element(float dot, float scale, int row, int key, int length, int attendCurrent, out float lb, out float logBeta)
    {
        if (StickMath.Visible(row, key, length, attendCurrent))
        {
            StickMath.Logs(scale * dot, out lb, out logBeta);
        }
        else
        {
            lb = 0f;
            logBeta = float.NegativeInfinity;   // A = exp(-inf) = 0, beta = 0
        }
    }

    /// <summary>Sum of lb over one segment (the forward's order: nearest key first).</summary>
    public static float SumNearestFirst(F4 x) => x.X3 + x.X2 + x.X1 + x.X0;

    /// <summary>Sum of a over one segment, farthest key first (the direction of the prefix P).</summary>
    public static float SumFarthestFirst(F4 x) => x.X0 + x.X1 + x.X2 + x.X3;

    /// <summary>
    /// The 32-key snapshot tile that thread column <paramref name="tx"/> of 64-key tile <paramref name="tile"/>
    /// falls in, and whether <paramref name="row"/> has a snapshot there (inside the sequence and at or after
    /// the snapshot tile's first key: the snapshots every forward and pass 1 write).
    /// </summary>
    public static bool HasSnapshot(int tile, int tx, int row, int length, out int snapshotTile)
    {
        snapshotTile = 2 * tile + (tx >= HalfSegments ? 1 : 0);
        return row < length && snapshotTile * Snapshots.KeyTile <= row;
    }

    /// <summary>Reads snapshot (row, snapshot tile) or 0 where the row has none there (its keys are all invisible).</summary>
    public static float ReadSnapshot(ArrayView<float> snapshots, int head, int row, int tile, int tx, int length, int tiles)
    {
        bool has = HasSnapshot(tile, tx, row, length, out int snapshotTile);
        return has ? snapshots[Snapshots.Index(head, row, snapshotTile, length, tiles)] : 0f;
    }

    /// <summary>
    /// The weights A = exp(logBeta + acc + sum of lb over the nearer keys) of one row's 4 keys, and returns
    /// a = A * G. <paramref name="accSnapshot"/>: the forward's acc before this thread's 32-key half (the sum
    /// of lb over the keys past it); the nearer segments of the half come from the lb segment sums.
    /// </summary>
    public static F4 Weights(ArrayView<float> shared, int segRow, int tx, float accSnapshot, F4 lb, F4 logBeta, F4 g, out F4 weights)
    {
        int half = tx >= HalfSegments ? HalfSegments : 0;
        float nearer = 0f;
        for (int k = HalfSegments - 1; k >= 0; k--)
        {
            float seg = shared[segRow + half + k];
            if (half + k > tx)
                nearer += seg;
        }
        float suffix = accSnapshot + nearer;
        weights = new F4();
        weights.X3 = MathF.Exp(logBeta.X3 + suffix);
        suffix += lb.X3;
        weights.X2 = MathF.Exp(logBeta.X2 + suffix);
        suffix += lb.X2;
        weights.X1 = MathF.Exp(logBeta.X1 + suffix);
        suffix += lb.X1;
        weights.X0 = MathF.Exp(logBeta.X0 + suffix);
        return new F4(weights.X0 * g.X0, weights.X1 * g.X1, weights.X2 * g.X2, weights.X3 * g.X3);
    }

    /// <summary>
    /// dz = (1 - beta) a - beta (P + dRem rem) for one row's 4 keys, with 1 - beta = exp(lb) and beta = exp(logBeta)
    /// (never 1 - beta); <paramref name="prefix"/> is P before the first of the 4 keys.
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
        return dz;
    }

    /// <summary>
    /// P before this thread's 4 keys, from P before its 32-key half (<paramref name="halfPrefix"/>) plus the
    /// a segment sums of the farther segments of the half, farthest first. Pass 1 reaches the same value
    /// through <see cref="Prefixes"/> in the same order of additions.
    /// </summary>
    public static float PrefixInHalf(ArrayView<float> shared, int segRow, int tx, float halfPrefix)
    {
        int half = tx >= HalfSegments ? HalfSegments : 0;
        float p = halfPrefix;
        for (int k = 0; k < HalfSegments; k++)
        {
            float seg = shared[segRow + half + k];
            if (half + k < tx)
                p += seg;
        }
        return p;
    }

    /// <summary>
    /// Pass 1: from P before the 64-key tile, P before the upper 32-key half (a snapshot), P before this
    /// thread's keys, and (returned) P after the tile.
    /// </summary>
    public static float Prefixes(ArrayView<float> shared, int segRow, int tx, float tilePrefix, out float upperPrefix, out float mine)
    {
        float p = tilePrefix;
        for (int k = 0; k < HalfSegments; k++)
            p += shared[segRow + k];
        upperPrefix = p;
        mine = PrefixInHalf(shared, segRow, tx, tx >= HalfSegments ? upperPrefix : tilePrefix);
        for (int k = HalfSegments; k < Segments; k++)
            p += shared[segRow + k];
        return p;
    }

    /// <summary>Stores one row's 4 values at keys tx*4 .. tx*4+3 of a [row][key] tile.</summary>
    public static void StoreRow(ArrayView<float> shared, int at, F4 x)
    {
        shared[at] = x.X0;
        shared[at + 1] = x.X1;
        shared[at + 2] = x.X2;
        shared[at + 3] = x.X3;
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
