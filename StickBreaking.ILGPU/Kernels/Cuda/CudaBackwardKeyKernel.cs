using System;
using ILGPU;

using StickBreaking.ILGPU.Kernels.Common;
using StickBreaking.ILGPU.Launch;
using static StickBreaking.ILGPU.Kernels.Cuda.CudaTiles;

namespace StickBreaking.ILGPU.Kernels.Cuda;

/// <summary>
/// Backward pass 2 on CUDA for head dimensions up to <see cref="MaxHeadDim"/> (docs/math.md, "Backward"): one group of
/// <see cref="GroupSize"/> threads per (key/value head, block of <see cref="KeyTile"/> keys), walking, for each query head
/// that reads the key/value head in a fixed order, the blocks of <see cref="BlockRows"/> query rows from the diagonal to
/// the end. Per 64 x 64 tile it rebuilds S = q.k,
/// G = dO.v (4 x 4 per thread, rows ty*4+i, keys tx*4+j), A from the acc snapshots, P from pass 1's P
/// snapshots plus segment sums, and dz, with the same code as pass 1 (<see cref="CudaBackwardTile"/>); then
/// accumulates dk = s dz^T Q and dv = A^T dO as 4 x 8 register tiles per thread (keys ty*4+i, columns
/// tx+16c). Each group owns its keys: no atomics, bitwise deterministic. Every product reads shared memory
/// in 16-byte vectors.
/// </summary>
/// <remarks>
/// One group per SM (<see cref="MinGroupsPerMultiprocessor"/>), so the group has the SM's shared memory to
/// itself: <see cref="SharedFloats"/> floats, 161.25 KB. The transposed K and V tiles [d][key] of the group's
/// keys stay for the whole walk; per step, the transposed Q and dO blocks [d][row], then dz and A by key
/// [key][row] (for dk and dv), the row block's acc and P snapshots [row][half] and dRem rem per row.
/// </remarks>
internal static class CudaBackwardKeyKernel
{
    /// <summary>
    /// Launch bound: one group per SM. The dk and dv register tiles (64 floats) with S and G need about 255
    /// registers; at 128 (two groups) ptxas spills about 400 bytes per thread.
    /// </summary>
    public const int MinGroupsPerMultiprocessor = 1;

    private const int QOffset = 0;
    private const int DoOffset = QOffset + CudaBackwardTile.TransposedFloats;
    private const int KOffset = DoOffset + CudaBackwardTile.TransposedFloats;   // K [d][key], for the whole walk
    private const int VOffset = KOffset + CudaBackwardTile.TransposedFloats;   // V [d][key], likewise
    private const int DzOffset = VOffset + CudaBackwardTile.TransposedFloats;  // dz [key][row]
    private const int AOffset = DzOffset + CudaBackwardTile.SquareFloats;      // A [key][row]
    private const int AccOffset = AOffset + CudaBackwardTile.SquareFloats;     // acc snapshots [row][half]
    private const int PrefixOffset = AccOffset + CudaBackwardTile.HalfStatFloats;   // P snapshots [row][half]
    private const int DRemRemOffset = PrefixOffset + CudaBackwardTile.HalfStatFloats;
    /// <summary>Dynamic shared memory, in floats.</summary>
    public const int SharedFloats = DRemRemOffset + BlockRows;

    /// <summary>How the launch layer runs it: the CUDA tile (<see cref="CudaTiles"/>), its shared memory and launch bound.</summary>
    public static readonly KernelLaunch<BackwardArgs<float>> Launch = new()
    {
        Name = "CUDA backward dk/dv", Body = Kernel, Family = KernelFamily.Cuda, RowsPerGroup = KeyTile, GroupSize = GroupSize, PerKeyValueHead = true,
        SharedBytes = sizeof(float) * SharedFloats, MinGroupsPerMultiprocessor = MinGroupsPerMultiprocessor,
        MaxHeadDim = MaxHeadDim, WarpSize = WarpSize,
    };

    public static void Kernel(BackwardArgs<float> a)
    {
        int tid = Group.IdxX;
        int ty = tid / Segments, tx = tid - ty * Segments;
        int keyHead = Grid.IdxX;    // a key/value head: the launch is per key/value head
        int keyBlock = Grid.IdxY;   // block 0 has the longest walk: launched first
        int T = a.Length, D = a.HeadDim;
        int key0 = keyBlock * KeyTile;
        var shared = SharedMemory.GetDynamic<float>();
        var vectors = shared.Cast<F4>();

        CudaBackwardTile.LoadTransposed(shared, KOffset, a.K, HeadRows.Key(a.Rows, a.Rows.K, keyHead), key0, T, D, tid);
        CudaBackwardTile.LoadTransposed(shared, VOffset, a.V, HeadRows.Key(a.Rows, a.Rows.V, keyHead), key0, T, D, tid);
        var dk = new Columns();
        var dv = new Columns();
        int key = key0 + tx * 4;
        int r = ty * 4;                            // the thread's first row in the block (S, G) and first key (dk, dv)
        // Every query head that reads this key/value head, in a fixed order, into the same dk and dv register tiles:
        // one owner per output element, no atomics, bitwise deterministic (one member when every head has its own k, v).
        for (int member = 0; member < a.Rows.GroupSize; member++)
        {
            int head = a.Rows.QueryHeadOf(keyHead, member);
            var q = HeadRows.Query(a.Rows, a.Rows.Q, head);
            var dO = HeadRows.Query(a.Rows, a.Rows.DO, head);
            for (int rowBlock = keyBlock; rowBlock < a.RowBlocks; rowBlock++)
            {
                int row0 = rowBlock * BlockRows;
                int firstRow = row0 + r;

                // S = q.k and G = dO.v, 4 x 4 per thread; the row block's snapshots and dRem rem staged meanwhile.
                Group.Barrier();   // the previous step's dk and dv steps are done with Q, dO, dz and A
                CudaBackwardTile.LoadTransposed(shared, QOffset, a.Q, q, row0, T, D, tid);
                CudaBackwardTile.LoadTransposed(shared, DoOffset, a.DO, dO, row0, T, D, tid);
                CudaBackwardTile.StageSnapshots(shared, AccOffset, a.AccSnapshots, head, row0, keyBlock, T, a.SnapshotTiles, tid, part: 0);
                CudaBackwardTile.StageSnapshots(shared, PrefixOffset, a.PrefixSnapshots, head, row0, keyBlock, T, a.SnapshotTiles, tid, part: 1);
                if (tid < BlockRows)
                    shared[DRemRemOffset + tid] = CudaBackwardTile.DRemRem(a.DRem, a.LogRem, head, row0 + tid, T);
                Group.Barrier();
                CudaBackwardTile.Products(vectors, QOffset / 4, KOffset / 4, D, ty, tx, out var s0, out var s1, out var s2, out var s3);
                CudaBackwardTile.Products(vectors, DoOffset / 4, VOffset / 4, D, ty, tx, out var g0, out var g1, out var g2, out var g3);

                // Row by row: logs, A from the acc snapshots (into shared, by key), a = A G, P from pass 1's snapshot
                // of this half plus the farther segments, dz (into shared, by key).
                RowDz(a, shared, s0, g0, firstRow, key, r, tx);
                RowDz(a, shared, s1, g1, firstRow + 1, key, r + 1, tx);
                RowDz(a, shared, s2, g2, firstRow + 2, key, r + 2, tx);
                RowDz(a, shared, s3, g3, firstRow + 3, key, r + 3, tx);
                Group.Barrier();

                // dk += dz^T q, dv += A^T dO, 4 x 8 per thread (keys ty*4+i, columns tx+16c), four rows per step
                // (dz and A are 0 past the sequence, and so are Q and dO), over the rows that see the thread's keys:
                // dz and A are 0 for a row that cannot see a key, but 0 times a NaN or infinite q or dO is NaN (masks
                // select, never multiply). Below the diagonal every row sees every key. In the diagonal block
                // (rowBlock == keyBlock) no row of the chunks before chunk ty sees the thread's keys (skipped), some
                // rows of chunk ty do (a step that selects each product), and every row after it does.
                int chunks = (Math.Min(BlockRows, T - row0) + 3) / 4;
                int k0 = ty * 4;
                bool diagonal = rowBlock == keyBlock;
                if (diagonal && ty < chunks)
                {
                    // keys ty*4+i, rows ty*4+m: m >= i + 1 - AttendCurrent
                    int lo = 1 - a.AttendCurrent;
                    CudaBackwardTile.DiagonalColumnStep(vectors, QOffset / 4, ty, tx,
                        CudaBackwardTile.ReadByKey(vectors, DzOffset / 4, k0, ty), CudaBackwardTile.ReadByKey(vectors, DzOffset / 4, k0 + 1, ty),
                        CudaBackwardTile.ReadByKey(vectors, DzOffset / 4, k0 + 2, ty), CudaBackwardTile.ReadByKey(vectors, DzOffset / 4, k0 + 3, ty),
                        lo, 3, ref dk);
                    CudaBackwardTile.DiagonalColumnStep(vectors, DoOffset / 4, ty, tx,
                        CudaBackwardTile.ReadByKey(vectors, AOffset / 4, k0, ty), CudaBackwardTile.ReadByKey(vectors, AOffset / 4, k0 + 1, ty),
                        CudaBackwardTile.ReadByKey(vectors, AOffset / 4, k0 + 2, ty), CudaBackwardTile.ReadByKey(vectors, AOffset / 4, k0 + 3, ty),
                        lo, 3, ref dv);
                }
                for (int c = diagonal ? ty + 1 : 0; c < chunks; c++)
                {
                    CudaBackwardTile.ColumnStep(vectors, QOffset / 4, c, tx,
                        CudaBackwardTile.ReadByKey(vectors, DzOffset / 4, k0, c), CudaBackwardTile.ReadByKey(vectors, DzOffset / 4, k0 + 1, c),
                        CudaBackwardTile.ReadByKey(vectors, DzOffset / 4, k0 + 2, c), CudaBackwardTile.ReadByKey(vectors, DzOffset / 4, k0 + 3, c),
                        ref dk);
                    CudaBackwardTile.ColumnStep(vectors, DoOffset / 4, c, tx,
                        CudaBackwardTile.ReadByKey(vectors, AOffset / 4, k0, c), CudaBackwardTile.ReadByKey(vectors, AOffset / 4, k0 + 1, c),
                        CudaBackwardTile.ReadByKey(vectors, AOffset / 4, k0 + 2, c), CudaBackwardTile.ReadByKey(vectors, AOffset / 4, k0 + 3, c),
                        ref dv);
                }
            }
        }

        int firstKey = key0 + r;
        var dkRows = HeadRows.Key(a.Rows, a.Rows.DK, keyHead);
        var dvRows = HeadRows.Key(a.Rows, a.Rows.DV, keyHead);
        Store(a, dkRows, dvRows, firstKey, tx, dk.Row0, dv.Row0);
        Store(a, dkRows, dvRows, firstKey + 1, tx, dk.Row1, dv.Row1);
        Store(a, dkRows, dvRows, firstKey + 2, tx, dk.Row2, dv.Row2);
        Store(a, dkRows, dvRows, firstKey + 3, tx, dk.Row3, dv.Row3);
    }

    /// <summary>
    /// One row's A and dz for this thread's 4 keys (<see cref="CudaBackwardTile.Weights"/>, then P from pass 1's
    /// snapshot of the thread's 32-key half, staged, and dz), stored by key for the dk and dv steps.
    /// </summary>
    private static void RowDz(BackwardArgs<float> a, ArrayView<float> shared, F4 s, F4 g, int row, int key, int r, int tx)
    {
        var weighted = CudaBackwardTile.Weights(s, g, a.Scale, row, key, a.Length, a.AttendCurrent,
            CudaBackwardTile.StagedSnapshot(shared, AccOffset, r, tx), tx, out var lb, out var logBeta, out var weights);
        CudaBackwardTile.StoreRowByKey(shared, AOffset, r, tx, weights);
        float prefix = CudaBackwardTile.PrefixInHalf(CudaBackwardTile.SumFarthestFirst(weighted), tx,
            CudaBackwardTile.StagedSnapshot(shared, PrefixOffset, r, tx));
        CudaBackwardTile.StoreRowByKey(shared, DzOffset, r, tx, CudaBackwardTile.Dz(weighted, lb, logBeta, prefix, shared[DRemRemOffset + r]));
    }

    private static void Store(BackwardArgs<float> a, HeadRows dkRows, HeadRows dvRows, int key, int tx, F8 dk, F8 dv)
    {
        if (key >= a.Length)
            return;
        CudaBackwardTile.StoreColumns(a.DK, dkRows.Row(key), tx, a.HeadDim, dk, a.Scale);
        CudaBackwardTile.StoreColumns(a.DV, dvRows.Row(key), tx, a.HeadDim, dv, 1f);
    }
}
