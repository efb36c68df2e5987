using System;
using ILGPU;

using StickBreaking.ILGPU.Kernels.Common;
using StickBreaking.ILGPU.Launch;

namespace StickBreaking.ILGPU.Kernels.Portable;

/// <summary>
/// Backward pass 1 (docs/math.md, "Backward"): one group per (head, block of <see cref="BlockRows"/> query rows,
/// slice of dq columns). Walks the key tiles from key 0 toward the diagonal so that the prefix P grows
/// naturally, reads the forward's acc snapshots (never peeling tile sums off LogRem), accumulates
/// dq = s sum_j dz_ij k_j and writes P per (row, key tile) for pass 2. Each group owns its outputs:
/// no atomics, bitwise deterministic.
/// </summary>
internal static class BackwardQueryKernel
{
    /// <summary>Query rows per group.</summary>
    public const int BlockRows = 32;
    private const int KeyTile = Snapshots.KeyTile;
    private const int DimChunk = TileLoad.DimChunk, ChunkStride = TileLoad.ChunkStride;

    /// <summary>Static shared memory in bytes, besides the dynamic dq accumulator.</summary>
    public const int StaticSharedBytes = 4 * (2 * BlockRows * ChunkStride + 2 * KeyTile * ChunkStride
        + 3 * BlockRows * KeyTile + 2 * BlockRows);
    /// <summary>Dynamic shared floats per dq column.</summary>
    public const int DynamicFloatsPerColumn = BlockRows;

    /// <summary>How the launch layer runs the fp32 pass: adapts to any group size and splits D over the grid's z when needed.</summary>
    public static readonly KernelLaunch<BackwardArgs<float>> Launch = Describe<float, Fp32Element>("backward dq");
    /// <summary>The same body on fp16 storage (q, k, v, dO, dq as IEEE binary16 bits).</summary>
    public static readonly KernelLaunch<BackwardArgs<ushort>> LaunchFp16 = Describe<ushort, Fp16Storage>("backward dq fp16");
    /// <summary>The same body on bf16 storage (q, k, v, dO, dq as bfloat16 bits).</summary>
    public static readonly KernelLaunch<BackwardArgs<ushort>> LaunchBf16 = Describe<ushort, Bf16Storage>("backward dq bf16");

    private static KernelLaunch<BackwardArgs<T>> Describe<T, TElement>(string name)
        where T : unmanaged
        where TElement : struct, IElement<T> => new()
    {
        Name = name, Body = Kernel<T, TElement>, Family = KernelFamily.Portable, RowsPerGroup = BlockRows,
        StaticSharedBytes = StaticSharedBytes, DynamicFloatsPerColumn = DynamicFloatsPerColumn,
    };

    public static void Kernel<TStored, TElement>(BackwardArgs<TStored> a)
        where TStored : unmanaged
        where TElement : struct, IElement<TStored>
    {
        int tid = Group.IdxX, groupSize = Group.DimX;
        int head = Grid.IdxX;
        int rowBlock = a.RowBlocks - 1 - Grid.IdxY;
        int T = a.Length, D = a.HeadDim;
        int row0 = rowBlock * BlockRows;
        int col0 = Grid.IdxZ * a.ColumnsPerGroup;
        int cols = Math.Min(a.ColumnsPerGroup, D - col0);
        // Rows of this query head in q, dO and dq, and of the key/value head it reads in k and v (any layout).
        var q = HeadRows.Query(a.Rows, a.Rows.Q, head);
        var dO = HeadRows.Query(a.Rows, a.Rows.DO, head);
        var dqRows = HeadRows.Query(a.Rows, a.Rows.DQ, head);
        var k = HeadRows.KeyOfQuery(a.Rows, a.Rows.K, head);
        var v = HeadRows.KeyOfQuery(a.Rows, a.Rows.V, head);

        var qChunk = SharedMemory.Allocate<float>(BlockRows * ChunkStride);
        var doChunk = SharedMemory.Allocate<float>(BlockRows * ChunkStride);
        var kChunk = SharedMemory.Allocate<float>(KeyTile * ChunkStride);
        var vChunk = SharedMemory.Allocate<float>(KeyTile * ChunkStride);
        var z = SharedMemory.Allocate<float>(BlockRows * KeyTile);    // q.k, then dz
        var g = SharedMemory.Allocate<float>(BlockRows * KeyTile);    // dO.v, then a
        var w = SharedMemory.Allocate<float>(BlockRows * KeyTile);    // (1 - beta) a
        var prefix = SharedMemory.Allocate<float>(BlockRows);         // P carried across tiles
        var dRemRem = SharedMemory.Allocate<float>(BlockRows);
        var dqAcc = SharedMemory.GetDynamic<float>();                 // [BlockRows, ColumnsPerGroup]
        // On OpenCL the (unscaled) dq accumulator is in global memory (see OutputAccumulator): DQ itself for fp32,
        // the fp32 scratch for 16-bit storage (a constant choice per specialization, indexed as a contiguous
        // [B * H, T, D] tensor of its own); never a select with the shared view.
        bool inOutput = OutputAccumulator.InOutput;
        var element = default(TElement);
        var dqGlobal = element.Accumulator(a.DQ, a.AccumulatorScratch);
        var accRows = OutputAccumulator.AccumulatorRows(element.Wide, dqRows, head, T, D);
        long outBase = accRows.Row(row0) + col0;                      // the accumulator's [row0, col0] of this group

        if (inOutput)
            OutputAccumulator.ZeroOutput(dqGlobal, outBase, accRows.Token, row0, BlockRows, T, cols, tid, groupSize);
        else
            OutputAccumulator.ZeroShared(dqAcc, BlockRows * a.ColumnsPerGroup, tid, groupSize);
        for (int r = tid; r < BlockRows; r += groupSize)
        {
            int row = row0 + r;
            prefix[r] = 0f;
            dRemRem[r] = row < T ? a.DRem[(long)head * T + row] * MathF.Exp(a.LogRem[(long)head * T + row]) : 0f;
        }

        int lastKey = Math.Min(T - 1, row0 + BlockRows - 1);
        int lastTile = lastKey / KeyTile;
        for (int tile = 0; tile <= lastTile; tile++)
        {
            int key0 = tile * KeyTile;

            BackwardDots.Run<TStored, TElement>(a, qChunk, doChunk, kChunk, vChunk, z, g, q, dO, k, v, row0, BlockRows, key0, KeyTile, tid, groupSize);

            for (int r = tid; r < BlockRows; r += groupSize)
            {
                int row = row0 + r;
                if (row < T && key0 <= row)
                {
                    long snap = Snapshots.Index(head, row, tile, T, a.SnapshotTiles);
                    if (Grid.IdxZ == 0)
                        a.PrefixSnapshots[snap] = prefix[r];
                    prefix[r] = BackwardRowScan.Run(z, g, w, w, false, r, row, key0, T, a.AttendCurrent,
                        a.Scale, a.AccSnapshots[snap], prefix[r], dRemRem[r]);
                }
                else
                {
                    BackwardRowScan.Clear(z, w, false, r);
                }
            }

            // dq += dz k over this group's columns and the keys each row sees (dz is 0 for the others, but 0 times a
            // NaN or infinite k is NaN).
            OutputAccumulator.AddWeightedKeys<TStored, TElement>(a.K, kChunk, z, dqGlobal, dqAcc, k, outBase, accRows.Token, row0, BlockRows,
                key0, KeyTile, T, D, col0, cols, a.ColumnsPerGroup, a.AttendCurrent, tid, groupSize);
        }

        for (int e = tid; e < BlockRows * cols; e += groupSize)
        {
            int r = e / cols, c = e - r * cols;
            int row = row0 + r;
            if (row < T)
            {
                float dq = inOutput ? dqGlobal[accRows.Row(row) + col0 + c] : dqAcc[r * a.ColumnsPerGroup + c];
                a.DQ[dqRows.Row(row) + col0 + c] = element.Store(a.Scale * dq);   // in place on OpenCL fp32
            }
        }
    }
}
