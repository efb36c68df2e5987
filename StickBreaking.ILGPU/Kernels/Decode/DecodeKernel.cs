using System;
using ILGPU;
using StickBreaking.ILGPU.Kernels.Common;
using StickBreaking.ILGPU.Launch;

namespace StickBreaking.ILGPU.Kernels.Decode;

/// <summary>
/// Queries behind a key/value cache (docs/math.md, "Queries behind a cache", "Grouped-query heads", "Split and merge").
/// One group per (sequence b, key/value head, block of <see cref="BlockRows"/> rows, chunk of keys). A row is one
/// (query head of this key/value head, query i): all query heads that read this key/value head and all n queries share
/// every key and value the group stages, so each cache element is read once per (b, kv head, row block, chunk). The
/// group walks its chunk's keys from the nearest to the farthest, a tile of <see cref="DecodeArgs{T}.KeyTile"/> keys at
/// a time, keeping per row the running <c>acc</c> (the sum of log(1 - beta) over the keys already visited) and the output
/// accumulator, as the tiled forward does (docs/math.md, "Tiled forward"). Chunk 0 holds the nearest keys; each chunk
/// starts its stick whole, and the merge kernel combines them (<see cref="MergeKernel"/>); with one chunk the group writes
/// o, rem and LogRem itself.
/// <para>
/// Query i of n (at position L + after - n + i, L the keys present, after the keys held elsewhere) sees key j when
/// j &lt; L + after - n + i (&lt;= with AttendCurrent). Only slots below L are ever read, so a NaN past a sequence's
/// length reaches nothing; a key the row does not see gets lb = 0 and weight 0 by selection, and the product loop over
/// values stops before it (masks select, never multiply). Static shared memory and barriers only: every backend.
/// </para>
/// </summary>
internal static class DecodeKernel
{
    /// <summary>Rows (query head, query) per group.</summary>
    public const int BlockRows = 8;
    /// <summary>The most keys per tile.</summary>
    public const int MaxKeyTile = 64;
    /// <summary>Floats of one staged tile of keys (or values) before padding: keys per tile = this / D, at most <see cref="MaxKeyTile"/>.</summary>
    public const int TileFloats = 2048;
    private const int TileStorage = TileFloats + MaxKeyTile;   // rows padded to D + 1 floats against bank conflicts
    private const int MaxHeadDim = AttentionShape.MaxHeadDim;
    /// <summary>Partial dot products per tile: (row, key) pairs times the pieces of D they are split into.</summary>
    private const int PartialSlots = 512;

    /// <summary>Static shared memory per group, in bytes.</summary>
    public const int StaticSharedBytes = 4 * (2 * BlockRows * MaxHeadDim + 2 * TileStorage + 2 * BlockRows * MaxKeyTile + PartialSlots + BlockRows);

    /// <summary>Keys per tile for head dimension <paramref name="headDim"/>.</summary>
    public static int KeyTileFor(int headDim) => Math.Min(MaxKeyTile, TileFloats / headDim);

    /// <summary>fp32 storage.</summary>
    public static readonly KernelLaunch<DecodeArgs<float>> Launch = Describe<float, Fp32Element>("decode");
    /// <summary>fp16 storage (q, caches, o as IEEE binary16 bits).</summary>
    public static readonly KernelLaunch<DecodeArgs<ushort>> LaunchFp16 = Describe<ushort, Fp16Storage>("decode fp16");
    /// <summary>bf16 storage (q, caches, o as bfloat16 bits).</summary>
    public static readonly KernelLaunch<DecodeArgs<ushort>> LaunchBf16 = Describe<ushort, Bf16Storage>("decode bf16");

    private static KernelLaunch<DecodeArgs<T>> Describe<T, TElement>(string name)
        where T : unmanaged
        where TElement : struct, IElement<T> => new()
    {
        Name = name, Body = Kernel<T, TElement>, Family = KernelFamily.Portable, RowsPerGroup = BlockRows,
        StaticSharedBytes = StaticSharedBytes,
    };

    public static void Kernel<TStored, TElement>(DecodeArgs<TStored> a)
        where TStored : unmanaged
        where TElement : struct, IElement<TStored>
    {
        int tid = Group.IdxX, groupSize = Group.DimX;
        var layout = a.Layout;
        var element = default(TElement);
        int D = layout.HeadDim, n = layout.Queries, kvHeads = layout.KeyValueHeads;
        int perKv = layout.QueryHeads / kvHeads;
        int b = Grid.IdxX / kvHeads, kvHead = Grid.IdxX - b * kvHeads;
        int chunk = Grid.IdxY % a.Chunks, rowBlock = Grid.IdxY / a.Chunks;
        int row0 = rowBlock * BlockRows;
        int rows = Math.Min(BlockRows, perKv * n - row0);
        int length = a.CacheLengths[b];
        int end = length + (a.HasKeysAfter != 0 ? a.KeysAfter[b] : 0);   // the sequence's length: queries at end - n ..
        int hi = length - chunk * a.ChunkKeys;                           // this chunk: keys [lo, hi)
        int lo = Math.Max(0, hi - a.ChunkKeys);
        int keyTile = a.KeyTile, stride = D + 1;

        var q = SharedMemory.Allocate<float>(BlockRows * MaxHeadDim);       // [rows, D]
        var outAcc = SharedMemory.Allocate<float>(BlockRows * MaxHeadDim);  // [rows, D]
        var k = SharedMemory.Allocate<float>(TileStorage);                  // [keys, D + 1]
        var v = SharedMemory.Allocate<float>(TileStorage);                  // [keys, D + 1]
        var lb = SharedMemory.Allocate<float>(BlockRows * MaxKeyTile);      // lb, then acc + the exclusive suffix of lb
        var logBeta = SharedMemory.Allocate<float>(BlockRows * MaxKeyTile); // log(beta), then the weights A
        var partial = SharedMemory.Allocate<float>(PartialSlots);
        var acc = SharedMemory.Allocate<float>(BlockRows);

        for (int e = tid; e < rows * D; e += groupSize)
        {
            int r = e / D, d = e - r * D;
            int flat = row0 + r, g = flat / n, i = flat - g * n;
            q[e] = element.Load(a.Q[layout.QueryRow(b, kvHead * perKv + g, i) + d]);
            outAcc[e] = 0f;
        }
        for (int r = tid; r < rows; r += groupSize)
            acc[r] = 0f;

        for (int tileEnd = hi; tileEnd > lo; tileEnd -= keyTile)
        {
            int key0 = Math.Max(lo, tileEnd - keyTile), keys = tileEnd - key0;
            Group.Barrier();
            // Stage the tile's keys and values (slots below the length only), converted to fp32.
            for (int e = tid; e < keys * D; e += groupSize)
            {
                int j = e / D, d = e - j * D;
                long at = layout.CacheRow(b, kvHead, key0 + j) + d;
                k[j * stride + d] = element.Load(a.K[at]);
                v[j * stride + d] = element.Load(a.V[at]);
            }
            Group.Barrier();

            // 1. q . k for every (row, key) pair, D split into pieces so that the whole group works.
            int pairs = rows * keys;
            int pieces = Math.Max(1, Math.Min(Math.Min(groupSize, PartialSlots) / pairs, D));
            int span = (D + pieces - 1) / pieces;
            for (int e = tid; e < pairs * pieces; e += groupSize)
            {
                int piece = e / pairs, pair = e - piece * pairs;
                int r = pair / keys, j = pair - r * keys;
                int d0 = piece * span, d1 = Math.Min(D, d0 + span);
                float s = 0f;
                for (int d = d0; d < d1; d++)
                    s += q[r * D + d] * k[j * stride + d];
                partial[e] = s;
            }
            Group.Barrier();

            // 2. z, lb = log(1 - beta) and log(beta); lb = 0 where the row does not see the key (selected, not multiplied).
            for (int pair = tid; pair < pairs; pair += groupSize)
            {
                int r = pair / keys, j = pair - r * keys;
                float dot = 0f;
                for (int piece = 0; piece < pieces; piece++)
                    dot += partial[piece * pairs + pair];
                int flat = row0 + r, i = flat - flat / n * n;
                bool visible = key0 + j < end - n + i + a.AttendCurrent;
                float z = a.Scale * dot;
                StickMath.Logs(z, out float lbj, out float logBetaj);
                lb[r * MaxKeyTile + j] = visible ? lbj : 0f;
                logBeta[r * MaxKeyTile + j] = logBetaj;
            }
            Group.Barrier();

            // 3. Per row, nearest key first: acc plus the sum of lb over the nearer keys (the exclusive suffix).
            for (int r = tid; r < rows; r += groupSize)
            {
                float running = acc[r];
                for (int j = keys - 1; j >= 0; j--)
                {
                    float lbj = lb[r * MaxKeyTile + j];
                    lb[r * MaxKeyTile + j] = running;
                    running += lbj;
                }
                acc[r] = running;
            }
            Group.Barrier();

            // 4. log A = log(beta) + acc + suffix; A = 0 where not visible.
            for (int pair = tid; pair < pairs; pair += groupSize)
            {
                int r = pair / keys, j = pair - r * keys;
                int flat = row0 + r, i = flat - flat / n * n;
                bool visible = key0 + j < end - n + i + a.AttendCurrent;
                float weight = MathF.Exp(logBeta[r * MaxKeyTile + j] + lb[r * MaxKeyTile + j]);
                logBeta[r * MaxKeyTile + j] = visible ? weight : 0f;
            }
            Group.Barrier();

            // 5. out += A v over the keys each row sees (the loop stops before the others: masks select).
            for (int e = tid; e < rows * D; e += groupSize)
            {
                int r = e / D, d = e - r * D;
                int flat = row0 + r, i = flat - flat / n * n;
                int visible = Math.Min(Math.Max(end - n + i + a.AttendCurrent - key0, 0), keys);
                float sum = outAcc[e];
                for (int j = 0; j < visible; j++)
                    sum += logBeta[r * MaxKeyTile + j] * v[j * stride + d];
                outAcc[e] = sum;
            }
        }
        Group.Barrier();

        // One chunk: the result. Several: this chunk's part, merged later nearest first.
        for (int e = tid; e < rows * D; e += groupSize)
        {
            int r = e / D, d = e - r * D;
            int flat = row0 + r, g = flat / n, i = flat - g * n, h = kvHead * perKv + g;
            if (a.Chunks == 1)
                a.O[layout.QueryRow(b, h, i) + d] = element.Store(outAcc[e]);
            else
                a.PartialO[layout.PartialRow(chunk, b, h, i) * D + d] = outAcc[e];
        }
        for (int r = tid; r < rows; r += groupSize)
        {
            int flat = row0 + r, g = flat / n, i = flat - g * n, h = kvHead * perKv + g;
            if (a.Chunks == 1)
            {
                long at = layout.Row(b, h, i);
                a.LogRem[at] = acc[r];
                a.Rem[at] = MathF.Exp(acc[r]);
            }
            else
            {
                a.PartialLogRem[layout.PartialRow(chunk, b, h, i)] = acc[r];
            }
        }
    }
}
