using System;
using ILGPU;

using StickBreaking.ILGPU.Kernels.Common;
using StickBreaking.ILGPU.Launch;
using static StickBreaking.ILGPU.Kernels.Cuda.CudaTiles;

namespace StickBreaking.ILGPU.Kernels.Cuda;

/// <summary>
/// Backward pass 1 on CUDA for head dimensions up to <see cref="MaxHeadDim"/> (docs/math.md, "Backward"): one group of
/// <see cref="GroupSize"/> threads per (head, block of <see cref="BlockRows"/> query rows), key tiles of
/// <see cref="KeyTile"/> from key 0 toward the diagonal, so that the prefix P grows naturally. Register
/// tiles: each thread owns 4 x 4 of S = q.k and G = dO.v (rows ty*4+i, keys tx*4+j) and 4 x 8 of dq (rows
/// ty*4+i, columns tx+16c). A is rebuilt from the forward's acc snapshots (one per 32-key half), P from
/// segment sums of a combined by warp shuffles; P is written per 32-key tile for pass 2. Each group owns its dq
/// rows: no atomics, bitwise deterministic. Every product reads shared memory in 16-byte vectors
/// (layouts in <see cref="CudaBackwardTile"/>).
/// </summary>
/// <remarks>
/// Dynamic shared memory (<see cref="SharedFloats"/> floats, 112.5 KB: two groups per SM on an H200):
/// transposed Q and dO blocks [d][row]; one transposed [d][key] tile that holds V (for G) and then K (for S
/// and dq); one [row][key] tile that holds G while S is computed, then dz; the tile's acc snapshots [row][half],
/// replaced by the P snapshots it writes; per row, P before the tile and dRem rem.
/// </remarks>
internal static class CudaBackwardQueryKernel
{
    /// <summary>Launch bound (two groups per SM: 128 registers, no spills (measured with ptxas and cuFuncGetAttribute)).</summary>
    public const int MinGroupsPerMultiprocessor = 2;
    private const int Chunks = CudaBackwardTile.Chunks;

    private const int QOffset = 0;
    private const int DoOffset = QOffset + CudaBackwardTile.TransposedFloats;
    private const int XOffset = DoOffset + CudaBackwardTile.TransposedFloats;   // V, then K: [d][key]
    private const int ZOffset = XOffset + CudaBackwardTile.TransposedFloats;    // dz [row][key]
    private const int SnapshotOffset = ZOffset + CudaBackwardTile.SquareFloats;     // acc, then P snapshots [row][half]
    private const int PrefixOffset = SnapshotOffset + CudaBackwardTile.HalfStatFloats;  // P before the tile, per row
    private const int DRemRemOffset = PrefixOffset + BlockRows;                        // dRem rem, per row
    /// <summary>Dynamic shared memory, in floats: 113 KB, what two groups per SM leave each on an H200.</summary>
    public const int SharedFloats = DRemRemOffset + BlockRows;

    /// <summary>How the launch layer runs it: the CUDA tile (<see cref="CudaTiles"/>), its shared memory and launch bound.</summary>
    public static readonly KernelLaunch<BackwardArgs<float>> Launch = new()
    {
        Name = "CUDA backward dq", Body = Kernel, Family = KernelFamily.Cuda, RowsPerGroup = BlockRows, GroupSize = GroupSize,
        SharedBytes = sizeof(float) * SharedFloats, MinGroupsPerMultiprocessor = MinGroupsPerMultiprocessor,
        MaxHeadDim = MaxHeadDim, WarpSize = WarpSize,
    };

    public static void Kernel(BackwardArgs<float> a)
    {
        int tid = Group.IdxX;
        int ty = tid / Segments, tx = tid - ty * Segments;
        int head = Grid.IdxX;
        int rowBlock = a.RowBlocks - 1 - Grid.IdxY;   // the longest walks first
        int T = a.Length, D = a.HeadDim;
        int row0 = rowBlock * BlockRows;
        // Rows of this query head in q and dO (any layout). k and v: the rows of the key/value head it reads, taken
        // per tile from its number (one register across the walk; two 64-bit bases held there spilled).
        var q = HeadRows.Query(a.Rows, a.Rows.Q, head);
        var dO = HeadRows.Query(a.Rows, a.Rows.DO, head);
        int keyHead = a.Rows.KeyHeadOfQuery(head);
        var shared = SharedMemory.GetDynamic<float>();
        var vectors = shared.Cast<F4>();

        CudaBackwardTile.LoadTransposed(shared, QOffset, a.Q, q, row0, T, D, tid);
        CudaBackwardTile.LoadTransposed(shared, DoOffset, a.DO, dO, row0, T, D, tid);

        int firstRow = row0 + ty * 4;
        if (tid < BlockRows)
        {
            // Per-row state lives in shared memory, not in registers: the register tiles need them all.
            shared[PrefixOffset + tid] = 0f;
            shared[DRemRemOffset + tid] = CudaBackwardTile.DRemRem(a.DRem, a.LogRem, head, row0 + tid, T);
        }
        var dq = new Columns();
        int lastKey = Math.Min(T - 1, row0 + BlockRows - 1);
        int lastTile = lastKey / KeyTile;
        int r = ty * 4;                            // the thread's first row in the block
        int zRow = ZOffset / 4 + ty * 4 * Chunks;   // dz of row ty*4, in F4 units
        for (int tile = 0; tile <= lastTile; tile++)
        {
            int key0 = tile * KeyTile;

            // G = dO.v, 4 x 4 per thread; the tile's acc snapshots staged meanwhile.
            Group.Barrier();
            CudaBackwardTile.LoadTransposed(shared, XOffset, a.V, HeadRows.Key(a.Rows, a.Rows.V, keyHead), key0, T, D, tid);
            CudaBackwardTile.StageSnapshots(shared, SnapshotOffset, a.AccSnapshots, head, row0, tile, T, a.SnapshotTiles, tid, part: 0);
            Group.Barrier();
            CudaBackwardTile.Products(vectors, DoOffset / 4, XOffset / 4, D, ty, tx, out var g0, out var g1, out var g2, out var g3);
            vectors[zRow + tx] = g0;   // G waits in the dz tile (its rows are this thread's): registers for S
            vectors[zRow + Chunks + tx] = g1;
            vectors[zRow + 2 * Chunks + tx] = g2;
            vectors[zRow + 3 * Chunks + tx] = g3;

            // S = q.k, 4 x 4 per thread; K stays for dq.
            Group.Barrier();
            CudaBackwardTile.LoadTransposed(shared, XOffset, a.K, HeadRows.Key(a.Rows, a.Rows.K, keyHead), key0, T, D, tid);
            Group.Barrier();
            CudaBackwardTile.Products(vectors, QOffset / 4, XOffset / 4, D, ty, tx, out var s0, out var s1, out var s2, out var s3);

            // Row by row: logs, A from the acc snapshots, a = A G, P (strict prefix of a) and its snapshots, dz.
            int key = key0 + tx * 4;
            // (The previous tile's dq steps have read dz: the barriers above separate them.)
            vectors[zRow + tx] = RowDz(a, shared, s0, vectors[zRow + tx], firstRow, key, r, tx);
            vectors[zRow + Chunks + tx] = RowDz(a, shared, s1, vectors[zRow + Chunks + tx], firstRow + 1, key, r + 1, tx);
            vectors[zRow + 2 * Chunks + tx] = RowDz(a, shared, s2, vectors[zRow + 2 * Chunks + tx], firstRow + 2, key, r + 2, tx);
            vectors[zRow + 3 * Chunks + tx] = RowDz(a, shared, s3, vectors[zRow + 3 * Chunks + tx], firstRow + 3, key, r + 3, tx);
            Group.Barrier();
            CudaBackwardTile.WriteSnapshots(shared, SnapshotOffset, a.PrefixSnapshots, head, row0, tile, T, a.SnapshotTiles, tid);

            // dq += dz k, 4 x 8 per thread, four keys per step (dz is 0 past the last key, K 0 past the sequence),
            // over the keys the thread's rows see: a key a row cannot see has dz = 0, but 0 times a NaN or infinite
            // k is NaN (masks select, never multiply). Below the diagonal tile every row sees every key. In the
            // diagonal tile (the last, key0 == row0) all four rows see the chunks before chunk ty, some see chunk ty
            // (a step that selects each product) and none sees the chunks after it (skipped).
            int chunks = (Math.Min(KeyTile, lastKey - key0 + 1) + 3) / 4;
            bool diagonal = tile == lastTile;
            int allSee = diagonal ? Math.Min(ty, chunks) : chunks;
            for (int c = 0; c < allSee; c++)
            {
                var z = vectors.SubView(zRow + c, 3 * Chunks + 1);   // rows ty*4+i, keys 4c..4c+3
                CudaBackwardTile.ColumnStep(vectors, XOffset / 4, c, tx, z[0], z[Chunks], z[2 * Chunks], z[3 * Chunks], ref dq);
            }
            if (diagonal && ty < chunks)
            {
                // rows ty*4+i, keys ty*4+m: m < i + AttendCurrent. The band's bounds are constants in each branch, so
                // every term's select folds away at compile time (a runtime bound kept 7 predicates live and spilled).
                var z = vectors.SubView(zRow + ty, 3 * Chunks + 1);
                if (a.AttendCurrent != 0)
                    CudaBackwardTile.DiagonalColumnStep(vectors, XOffset / 4, ty, tx, z[0], z[Chunks], z[2 * Chunks], z[3 * Chunks], -3, 0, ref dq);
                else
                    CudaBackwardTile.DiagonalColumnStep(vectors, XOffset / 4, ty, tx, z[0], z[Chunks], z[2 * Chunks], z[3 * Chunks], -3, -1, ref dq);
            }
        }

        var dqRows = HeadRows.Query(a.Rows, a.Rows.DQ, head);
        Store(a, dqRows, firstRow, tx, dq.Row0);
        Store(a, dqRows, firstRow + 1, tx, dq.Row1);
        Store(a, dqRows, firstRow + 2, tx, dq.Row2);
        Store(a, dqRows, firstRow + 3, tx, dq.Row3);
    }

    /// <summary>
    /// One row's dz for this thread's 4 keys (<see cref="CudaBackwardTile.Weights"/>, then P and dz). Reads the
    /// row's staged acc snapshots, P before the tile and dRem rem; stages the row's P snapshots of this tile in
    /// place of the acc ones and P after the tile.
    /// </summary>
    private static F4 RowDz(BackwardArgs<float> a, ArrayView<float> shared, F4 s, F4 g, int row, int key, int r, int tx)
    {
        float accSnapshot = CudaBackwardTile.StagedSnapshot(shared, SnapshotOffset, r, tx);
        float tilePrefix = shared[PrefixOffset + r];
        float dRemRem = shared[DRemRemOffset + r];
        var weighted = CudaBackwardTile.Weights(s, g, a.Scale, row, key, a.Length, a.AttendCurrent, accSnapshot,
            tx, out var lb, out var logBeta, out _);
        float nextPrefix = CudaBackwardTile.Prefixes(CudaBackwardTile.SumFarthestFirst(weighted), tx, tilePrefix,
            out float upperPrefix, out float mine);
        Warp.Barrier();   // every thread of the row has read what threads 0 and 8 overwrite now
        if (tx == 0)
        {
            shared[SnapshotOffset + 2 * r] = tilePrefix;   // thread 0 starts the lower 32-key half: P before it
            shared[PrefixOffset + r] = nextPrefix;
        }
        if (tx == CudaBackwardTile.HalfSegments)
            shared[SnapshotOffset + 2 * r + 1] = upperPrefix;   // thread 8 starts the upper half
        return CudaBackwardTile.Dz(weighted, lb, logBeta, mine, dRemRem);
    }

    private static void Store(BackwardArgs<float> a, HeadRows dqRows, int row, int tx, F8 dq)
    {
        if (row < a.Length)
            CudaBackwardTile.StoreColumns(a.DQ, dqRows.Row(row), tx, a.HeadDim, dq, a.Scale);
    }
}
