using System;
using ILGPU;

using StickBreaking.ILGPU.Kernels.Common;
using StickBreaking.ILGPU.Launch;

namespace StickBreaking.ILGPU.Kernels.Portable;

/// <summary>
/// The portable tiled forward (docs/math.md, "Tiled forward"). One group per (head, block of
/// <see cref="BlockRows"/> query rows, slice of output columns). It walks the key tiles from the
/// diagonal back to key 0 and keeps per row the running log-stick sum <c>acc</c> and the output
/// accumulator. Shared memory and barriers only, so it builds for CUDA, OpenCL and the CPU accelerator;
/// any group size works (every loop strides by the group).
/// </summary>
internal static class ForwardKernel
{
    /// <summary>Query rows per group.</summary>
    public const int BlockRows = 32;
    /// <summary>Keys per tile (the snapshot tile).</summary>
    public const int KeyTile = Snapshots.KeyTile;
    private const int DimChunk = TileLoad.DimChunk, ChunkStride = TileLoad.ChunkStride;

    /// <summary>Static shared memory in bytes, besides the dynamic output accumulator.</summary>
    public const int StaticSharedBytes = 4 * (BlockRows * ChunkStride + KeyTile * ChunkStride + BlockRows * KeyTile + BlockRows);
    /// <summary>Dynamic shared floats per output column (the output accumulator).</summary>
    public const int DynamicFloatsPerColumn = BlockRows;

    /// <summary>How the launch layer runs the fp32 kernel: adapts to any group size and splits D over the grid's z when needed.</summary>
    public static readonly KernelLaunch<ForwardArgs<float>> Launch = Describe<float, Fp32Element>("forward");
    /// <summary>The same body on fp16 storage (q, k, v, o as IEEE binary16 bits).</summary>
    public static readonly KernelLaunch<ForwardArgs<ushort>> LaunchFp16 = Describe<ushort, Fp16Storage>("forward fp16");
    /// <summary>The same body on bf16 storage (q, k, v, o as bfloat16 bits).</summary>
    public static readonly KernelLaunch<ForwardArgs<ushort>> LaunchBf16 = Describe<ushort, Bf16Storage>("forward bf16");

    private static KernelLaunch<ForwardArgs<T>> Describe<T, TElement>(string name)
        where T : unmanaged
        where TElement : struct, IElement<T> => new()
    {
        Name = name, Body = Kernel<T, TElement>, Family = KernelFamily.Portable, RowsPerGroup = BlockRows,
        StaticSharedBytes = StaticSharedBytes, DynamicFloatsPerColumn = DynamicFloatsPerColumn,
    };

    public static void Kernel<TStored, TElement>(ForwardArgs<TStored> a)
        where TStored : unmanaged
        where TElement : struct, IElement<TStored>
    {
        int tid = Group.IdxX, groupSize = Group.DimX;
        int head = Grid.IdxX;
        int rowBlock = a.RowBlocks - 1 - Grid.IdxY;   // heaviest blocks (near the end) first
        int T = a.Length, D = a.HeadDim;
        int row0 = rowBlock * BlockRows;
        int col0 = Grid.IdxZ * a.ColumnsPerGroup;
        int cols = Math.Min(a.ColumnsPerGroup, D - col0);
        // Rows of this query head in q and o, and of the key/value head it reads in k and v (any layout).
        var q = HeadRows.Query(a.Rows, a.Rows.Q, head);
        var o = HeadRows.Query(a.Rows, a.Rows.O, head);
        var k = HeadRows.KeyOfQuery(a.Rows, a.Rows.K, head);
        var v = HeadRows.KeyOfQuery(a.Rows, a.Rows.V, head);

        var qChunk = SharedMemory.Allocate<float>(BlockRows * ChunkStride);
        var kvChunk = SharedMemory.Allocate<float>(KeyTile * ChunkStride);
        var p = SharedMemory.Allocate<float>(BlockRows * KeyTile);   // q.k, then the weights A
        var acc = SharedMemory.Allocate<float>(BlockRows);
        var outAcc = SharedMemory.GetDynamic<float>();              // [BlockRows, ColumnsPerGroup]
        // On OpenCL the output accumulator is in global memory (see OutputAccumulator): O itself for fp32, the fp32
        // scratch for 16-bit storage (a constant choice per specialization, indexed as a contiguous [B * H, T, D]
        // tensor of its own); never a select with the shared view.
        bool inOutput = OutputAccumulator.InOutput;
        var element = default(TElement);
        var outGlobal = element.Accumulator(a.O, a.AccumulatorScratch);
        var outRows = OutputAccumulator.AccumulatorRows(element.Wide, o, head, T, D);
        long outBase = outRows.Row(row0) + col0;                    // the accumulator's [row0, col0] of this group

        if (inOutput)
            OutputAccumulator.ZeroOutput(outGlobal, outBase, outRows.Token, row0, BlockRows, T, cols, tid, groupSize);
        else
            OutputAccumulator.ZeroShared(outAcc, BlockRows * a.ColumnsPerGroup, tid, groupSize);
        for (int r = tid; r < BlockRows; r += groupSize)
            acc[r] = 0f;

        int lastKey = Math.Min(T - 1, row0 + BlockRows - 1);
        for (int tile = lastKey / KeyTile; tile >= 0; tile--)
        {
            int key0 = tile * KeyTile;

            // 1. q.k for the tile, over chunks of the head dimension.
            for (int e = tid; e < BlockRows * KeyTile; e += groupSize)
                p[e] = 0f;
            for (int c0 = 0; c0 < D; c0 += DimChunk)
            {
                Group.Barrier();
                TileLoad.Rows<TStored, TElement>(a.Q, qChunk, q, row0, BlockRows, T, D, c0, tid, groupSize);
                TileLoad.Rows<TStored, TElement>(a.K, kvChunk, k, key0, KeyTile, T, D, c0, tid, groupSize);
                Group.Barrier();
                for (int e = tid; e < BlockRows * KeyTile; e += groupSize)
                {
                    int r = e / KeyTile, j = e - r * KeyTile;
                    float s = p[e];
                    for (int dd = 0; dd < DimChunk; dd++)
                        s += qChunk[r * ChunkStride + dd] * kvChunk[j * ChunkStride + dd];
                    p[e] = s;
                }
            }
            Group.Barrier();

            // 2.-3. Per row, nearest key first: suffix of log(1 - beta) inside the tile, then the weights.
            for (int r = tid; r < BlockRows; r += groupSize)
            {
                int row = row0 + r;
                float rowAcc = acc[r];
                if (a.WriteSnapshots != 0 && Grid.IdxZ == 0 && row < T)
                    a.AccSnapshots[Snapshots.Index(head, row, tile, T, a.SnapshotTiles)] = rowAcc;
                float suffix = 0f;   // sum of lb over the visible keys of this tile nearer than j
                for (int j = KeyTile - 1; j >= 0; j--)
                {
                    float weight = 0f;
                    if (StickMath.Visible(row, key0 + j, T, a.AttendCurrent))
                    {
                        float z = a.Scale * p[r * KeyTile + j];
                        StickMath.Logs(z, out float lb, out float logBeta);
                        weight = MathF.Exp(logBeta + rowAcc + suffix);
                        suffix += lb;
                    }
                    p[r * KeyTile + j] = weight;
                }
                acc[r] = rowAcc + suffix;
            }

            // 4. out += A v over this group's columns and the keys each row sees (masks select, never multiply).
            OutputAccumulator.AddWeightedKeys<TStored, TElement>(a.V, kvChunk, p, outGlobal, outAcc, v, outBase, outRows.Token, row0, BlockRows,
                key0, KeyTile, T, D, col0, cols, a.ColumnsPerGroup, a.AttendCurrent, tid, groupSize);
        }

        if (!inOutput)
        {
            for (int e = tid; e < BlockRows * cols; e += groupSize)
            {
                int r = e / cols, c = e - r * cols;
                int row = row0 + r;
                if (row < T)
                    a.O[o.Row(row) + col0 + c] = element.Store(outAcc[r * a.ColumnsPerGroup + c]);
            }
        }
        else if (!element.Wide)   // OpenCL, 16-bit o: round the fp32 scratch once (an fp32 O already holds the result)
        {
            for (int e = tid; e < BlockRows * cols; e += groupSize)
            {
                int r = e / cols, c = e - r * cols;
                int row = row0 + r;
                if (row < T)
                    a.O[o.Row(row) + col0 + c] = element.Store(outGlobal[outRows.Row(row) + col0 + c]);
            }
        }
        if (Grid.IdxZ == 0)
        {
            for (int r = tid; r < BlockRows; r += groupSize)
            {
                int row = row0 + r;
                if (row < T)
                {
                    long at = (long)head * T + row;
                    a.LogRem[at] = acc[r];
                    a.Rem[at] = MathF.Exp(acc[r]);
                }
            }
        }
    }

}
