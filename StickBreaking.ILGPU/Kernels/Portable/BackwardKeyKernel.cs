using System;
using ILGPU;

using StickBreaking.ILGPU.Kernels.Common;
using StickBreaking.ILGPU.Launch;

namespace StickBreaking.ILGPU.Kernels.Portable;

/// <summary>
/// Backward pass 2 (docs/math.md, "Backward"): one group per (key/value head, key tile of <see cref="Snapshots.KeyTile"/>
/// keys, slice of dk/dv columns). For each query head that reads the key/value head, in a fixed order, walks the
/// blocks of query rows that see the tile, rebuilds A and dz from both snapshots and accumulates
/// dk = s sum_i dz_ij q_i and dv = sum_i A_ij dO_i in fp32. Each group owns its keys: no atomics, no spin locks,
/// bitwise deterministic.
/// </summary>
internal static class BackwardKeyKernel
{
    /// <summary>Query rows per step of the walk.</summary>
    public const int BlockRows = 16;
    private const int KeyTile = Snapshots.KeyTile;
    private const int DimChunk = TileLoad.DimChunk, ChunkStride = TileLoad.ChunkStride;

    /// <summary>Static shared memory in bytes, besides the dynamic dk and dv accumulators.</summary>
    public const int StaticSharedBytes = 4 * (2 * BlockRows * ChunkStride + 2 * KeyTile * ChunkStride
        + 4 * BlockRows * KeyTile);
    /// <summary>Dynamic shared floats per dk/dv column (both accumulators).</summary>
    public const int DynamicFloatsPerColumn = 2 * KeyTile;

    /// <summary>How the launch layer runs the fp32 pass: one group per key tile; adapts to any group size and splits D over the grid's z when needed.</summary>
    public static readonly KernelLaunch<BackwardArgs<float>> Launch = Describe<float, Fp32Element>("backward dk/dv");
    /// <summary>The same body on fp16 storage (q, k, v, dO, dk, dv as IEEE binary16 bits).</summary>
    public static readonly KernelLaunch<BackwardArgs<ushort>> LaunchFp16 = Describe<ushort, Fp16Storage>("backward dk/dv fp16");
    /// <summary>The same body on bf16 storage (q, k, v, dO, dk, dv as bfloat16 bits).</summary>
    public static readonly KernelLaunch<BackwardArgs<ushort>> LaunchBf16 = Describe<ushort, Bf16Storage>("backward dk/dv bf16");

    private static KernelLaunch<BackwardArgs<T>> Describe<T, TElement>(string name)
        where T : unmanaged
        where TElement : struct, IElement<T> => new()
    {
        Name = name, Body = Kernel<T, TElement>, Family = KernelFamily.Portable, RowsPerGroup = KeyTile, PerKeyValueHead = true,
        StaticSharedBytes = StaticSharedBytes, DynamicFloatsPerColumn = DynamicFloatsPerColumn,
    };

    public static void Kernel<TStored, TElement>(BackwardArgs<TStored> a)
        where TStored : unmanaged
        where TElement : struct, IElement<TStored>
    {
        int tid = Group.IdxX, groupSize = Group.DimX;
        int keyHead = Grid.IdxX;                  // a key/value head: the launch is per key/value head
        int tile = Grid.IdxY;                     // tile 0 has the most rows: launched first
        int T = a.Length, D = a.HeadDim;
        int key0 = tile * KeyTile;
        int col0 = Grid.IdxZ * a.ColumnsPerGroup;
        int cols = Math.Min(a.ColumnsPerGroup, D - col0);
        // Rows of this key/value head in k, v, dk and dv (any layout).
        var k = HeadRows.Key(a.Rows, a.Rows.K, keyHead);
        var v = HeadRows.Key(a.Rows, a.Rows.V, keyHead);
        var dkRows = HeadRows.Key(a.Rows, a.Rows.DK, keyHead);
        var dvRows = HeadRows.Key(a.Rows, a.Rows.DV, keyHead);

        var qChunk = SharedMemory.Allocate<float>(BlockRows * ChunkStride);
        var doChunk = SharedMemory.Allocate<float>(BlockRows * ChunkStride);
        var kChunk = SharedMemory.Allocate<float>(KeyTile * ChunkStride);
        var vChunk = SharedMemory.Allocate<float>(KeyTile * ChunkStride);
        var z = SharedMemory.Allocate<float>(BlockRows * KeyTile);    // q.k, then dz
        var g = SharedMemory.Allocate<float>(BlockRows * KeyTile);    // dO.v, then a
        var w = SharedMemory.Allocate<float>(BlockRows * KeyTile);    // (1 - beta) a
        var weights = SharedMemory.Allocate<float>(BlockRows * KeyTile);
        var acc = SharedMemory.GetDynamic<float>();                   // dk [KeyTile, cols], then dv
        int dvBase = KeyTile * a.ColumnsPerGroup;
        // On OpenCL the (unscaled) dk and the dv accumulators are in global memory (see OutputAccumulator): DK and DV
        // themselves for fp32, the two halves of the fp32 scratch for 16-bit storage (a constant choice per
        // specialization; each half a contiguous [B * Hkv, T, D] tensor of its own); never a select with the shared view.
        bool inOutput = OutputAccumulator.InOutput;
        var element = default(TElement);
        var dkGlobal = element.Accumulator(a.DK, a.AccumulatorScratch);
        var dvGlobal = element.Accumulator(a.DV, a.AccumulatorScratch);
        long dvOffset = element.Wide ? 0L : (long)Grid.DimX * T * D;   // dv: the scratch's second half
        var dkAccRows = OutputAccumulator.AccumulatorRows(element.Wide, dkRows, keyHead, T, D);
        var dvAccRows = OutputAccumulator.AccumulatorRows(element.Wide, dvRows, keyHead, T, D);
        long dkStart = dkAccRows.Row(key0) + col0;                    // the accumulators' [key0, col0] of this group
        long dvStart = dvOffset + dvAccRows.Row(key0) + col0;

        if (inOutput)
        {
            OutputAccumulator.ZeroOutput(dkGlobal, dkStart, dkAccRows.Token, key0, KeyTile, T, cols, tid, groupSize);
            OutputAccumulator.ZeroOutput(dvGlobal, dvStart, dvAccRows.Token, key0, KeyTile, T, cols, tid, groupSize);
        }
        else
        {
            OutputAccumulator.ZeroShared(acc, 2 * KeyTile * a.ColumnsPerGroup, tid, groupSize);
        }

        // Every query head that reads this key/value head, in a fixed order, into the same accumulators: one owner
        // per dk and dv element, no atomics, bitwise deterministic (one member when every head has its own k and v).
        for (int member = 0; member < a.Rows.GroupSize; member++)
        {
            int head = a.Rows.QueryHeadOf(keyHead, member);
            var q = HeadRows.Query(a.Rows, a.Rows.Q, head);
            var dO = HeadRows.Query(a.Rows, a.Rows.DO, head);
            for (int row0 = key0 - key0 % BlockRows; row0 < T; row0 += BlockRows)
            {
                BackwardDots.Run<TStored, TElement>(a, qChunk, doChunk, kChunk, vChunk, z, g, q, dO, k, v, row0, BlockRows, key0, KeyTile, tid, groupSize);

                for (int r = tid; r < BlockRows; r += groupSize)
                {
                    int row = row0 + r;
                    if (row < T && key0 <= row)
                    {
                        long snap = Snapshots.Index(head, row, tile, T, a.SnapshotTiles);
                        long at = (long)head * T + row;
                        float dRemRem = a.DRem[at] * MathF.Exp(a.LogRem[at]);
                        BackwardRowScan.Run(z, g, w, weights, true, r, row, key0, T, a.AttendCurrent,
                            a.Scale, a.AccSnapshots[snap], a.PrefixSnapshots[snap], dRemRem);
                    }
                    else
                    {
                        BackwardRowScan.Clear(z, weights, true, r);
                    }
                }

                // dk += dz^T q, dv += A^T dO over this group's columns, and over the rows that see the key only (dz and
                // A are 0 for the others, but 0 times a NaN or infinite q or dO is NaN).
                for (int c = 0; c < cols; c += DimChunk)
                {
                    Group.Barrier();
                    TileLoad.Rows<TStored, TElement>(a.Q, qChunk, q, row0, BlockRows, T, D, col0 + c, tid, groupSize);
                    TileLoad.Rows<TStored, TElement>(a.DO, doChunk, dO, row0, BlockRows, T, D, col0 + c, tid, groupSize);
                    Group.Barrier();
                    for (int e = tid; e < KeyTile * DimChunk; e += groupSize)
                    {
                        int j = e / DimChunk, dd = e - j * DimChunk;
                        if (c + dd < cols && (!inOutput || key0 + j < T))
                        {
                            int slot = j * a.ColumnsPerGroup + c + dd;
                            long dkOut = dkStart + j * dkAccRows.Token + c + dd;
                            long dvOut = dvStart + j * dvAccRows.Token + c + dd;
                            float dk = inOutput ? dkGlobal[dkOut] : acc[slot];
                            float dv = inOutput ? dvGlobal[dvOut] : acc[dvBase + slot];
                            int firstRow = StickMath.FirstRowSeeing(key0 + j, row0, BlockRows, a.AttendCurrent);
                            int endRow = Math.Min(BlockRows, T - row0);
                            for (int r = firstRow; r < endRow; r++)
                            {
                                dk += z[r * KeyTile + j] * qChunk[r * ChunkStride + dd];
                                dv += weights[r * KeyTile + j] * doChunk[r * ChunkStride + dd];
                            }
                            if (inOutput)
                            {
                                dkGlobal[dkOut] = dk;
                                dvGlobal[dvOut] = dv;
                            }
                            else
                            {
                                acc[slot] = dk;
                                acc[dvBase + slot] = dv;
                            }
                        }
                    }
                }
                Group.Barrier();
            }
        }

        for (int e = tid; e < KeyTile * cols; e += groupSize)
        {
            int j = e / cols, c = e - j * cols;
            int key = key0 + j;
            if (key < T)
            {
                long dkOut = dkRows.Row(key) + col0 + c, dvOut = dvRows.Row(key) + col0 + c;
                if (inOutput)
                {
                    // In place for fp32 (the accumulators are DK and DV themselves, where DV already holds dv).
                    a.DK[dkOut] = element.Store(a.Scale * dkGlobal[dkAccRows.Row(key) + col0 + c]);
                    if (!element.Wide)
                        a.DV[dvOut] = element.Store(dvGlobal[dvOffset + dvAccRows.Row(key) + col0 + c]);
                }
                else
                {
                    a.DK[dkOut] = element.Store(a.Scale * acc[j * a.ColumnsPerGroup + c]);
                    a.DV[dvOut] = element.Store(acc[dvBase + j * a.ColumnsPerGroup + c]);
                }
            }
        }
    }
}
