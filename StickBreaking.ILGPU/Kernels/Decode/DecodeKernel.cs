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
    /// <summary>Rows (query head, query) per group: four, each kept in its own register by the product loops.</summary>
    public const int BlockRows = 4;
    /// <summary>The most keys per tile.</summary>
    public const int MaxKeyTile = 64;
    /// <summary>Elements of one staged tile of keys (or values): keys per tile = this / D, at most <see cref="MaxKeyTile"/>.</summary>
    public const int TileElements = 4096;
    private const int MaxHeadDim = AttentionShape.MaxHeadDim;
    /// <summary>Partial dot products per tile: rows times keys times the pieces of D they are split into.</summary>
    private const int PartialSlots = BlockRows * 256;

    /// <summary>Static shared memory per group, in bytes, for storage elements of <paramref name="elementBytes"/> bytes.</summary>
    public static int StaticSharedBytes(int elementBytes) =>
        2 * TileElements * elementBytes + 4 * (2 * BlockRows * MaxHeadDim + 2 * BlockRows * MaxKeyTile + PartialSlots + BlockRows);

    /// <summary>Keys per tile for head dimension <paramref name="headDim"/>.</summary>
    public static int KeyTileFor(int headDim) => Math.Min(MaxKeyTile, TileElements / headDim);

    /// <summary>Whether rows of <paramref name="headDim"/> elements of <paramref name="elementBytes"/> bytes are staged in 16-byte words (views 16-byte aligned as well).</summary>
    public static bool PackedRows(int headDim, int elementBytes) => headDim * elementBytes % 16 == 0;

    /// <summary>fp32 storage.</summary>
    public static readonly KernelLaunch<DecodeArgs<float>> Launch = Describe<float, Fp32Element>("decode", 4);
    /// <summary>fp16 storage (q, caches, o as IEEE binary16 bits).</summary>
    public static readonly KernelLaunch<DecodeArgs<ushort>> LaunchFp16 = Describe<ushort, Fp16Storage>("decode fp16", 2);
    /// <summary>bf16 storage (q, caches, o as bfloat16 bits).</summary>
    public static readonly KernelLaunch<DecodeArgs<ushort>> LaunchBf16 = Describe<ushort, Bf16Storage>("decode bf16", 2);

    private static KernelLaunch<DecodeArgs<T>> Describe<T, TElement>(string name, int elementBytes)
        where T : unmanaged
        where TElement : struct, IElement<T> => new()
    {
        Name = name, Body = Kernel<T, TElement>, Family = KernelFamily.Portable, RowsPerGroup = BlockRows,
        StaticSharedBytes = StaticSharedBytes(elementBytes),
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
        int keyTile = a.KeyTile;
        // Where each row's queries sit: row r sees the keys below its limit (a key past every limit is never staged in a product).
        int limit0 = RowLimit(0, rows, row0, n, end, a.AttendCurrent), limit1 = RowLimit(1, rows, row0, n, end, a.AttendCurrent);
        int limit2 = RowLimit(2, rows, row0, n, end, a.AttendCurrent), limit3 = RowLimit(3, rows, row0, n, end, a.AttendCurrent);
        // Staging in 16-byte words where rows allow it: words per key, and whether a whole tile fits in two words per thread
        // (then the next tile is loaded into registers while this one is used).
        int elementsPerWord = 16 / Interop.SizeOf<TStored>();
        int words = a.PackedRows != 0 ? D / elementsPerWord : D;
        bool prefetch = a.PackedRows != 0 && keyTile * words <= 2 * groupSize;

        var q = SharedMemory.Allocate<float>(BlockRows * MaxHeadDim);       // [BlockRows, D], rows past the block zero
        var outAcc = SharedMemory.Allocate<float>(BlockRows * MaxHeadDim);  // [BlockRows, D]
        // [keys, D] as stored; allocated as 16-byte words so that the word view is aligned on every backend.
        var kWords = SharedMemory.Allocate<Word16>(TileElements / 16 * Interop.SizeOf<TStored>());
        var vWords = SharedMemory.Allocate<Word16>(TileElements / 16 * Interop.SizeOf<TStored>());
        var k = kWords.Cast<TStored>();
        var v = vWords.Cast<TStored>();
        var lb = SharedMemory.Allocate<float>(BlockRows * MaxKeyTile);      // lb = log(1 - beta), 0 where not visible
        var logBeta = SharedMemory.Allocate<float>(BlockRows * MaxKeyTile); // log(beta), then the weights A
        var partial = SharedMemory.Allocate<float>(PartialSlots);           // [pieces, BlockRows, keys]
        var acc = SharedMemory.Allocate<float>(BlockRows);
        var tileLb = SharedMemory.Allocate<float>(BlockRows);              // the tile's sum of lb per row
        var kCache = a.K.Cast<Word16>();
        var vCache = a.V.Cast<Word16>();
        Word16 k0 = default, k1 = default, v0 = default, v1 = default;
        if (prefetch && hi > lo)
        {
            int firstKey0 = Math.Max(lo, hi - keyTile);
            int firstTotal = (hi - firstKey0) * words;
            long first = layout.CacheTile(b, kvHead, firstKey0) / elementsPerWord;
            if (tid < firstTotal)
            {
                k0 = kCache[first + tid];
                v0 = vCache[first + tid];
            }
            if (tid + groupSize < firstTotal)
            {
                k1 = kCache[first + tid + groupSize];
                v1 = vCache[first + tid + groupSize];
            }
        }

        for (int e = tid; e < BlockRows * D; e += groupSize)
        {
            int r = e / D, d = e - r * D;
            int flat = row0 + r, g = flat / n, i = flat - g * n;
            q[e] = r < rows ? element.Load(a.Q[layout.QueryRow(b, kvHead * perKv + g, i) + d]) : 0f;
            outAcc[e] = 0f;
        }
        for (int r = tid; r < BlockRows; r += groupSize)
            acc[r] = 0f;

        for (int tileEnd = hi; tileEnd > lo; tileEnd -= keyTile)
        {
            int key0 = Math.Max(lo, tileEnd - keyTile), keys = tileEnd - key0;
            Group.Barrier();
            // Stage the tile's keys and values as stored: slots below the length only. The tile's slots are one range of the
            // cache (DecodeLayout.CacheTile). With prefetching, the words were loaded into registers during the previous
            // tile's products; the next tile's loads are issued right after they are stored, so their latency is hidden.
            int total = keys * words;
            if (prefetch)
            {
                if (tid < total)
                {
                    kWords[tid] = k0;
                    vWords[tid] = v0;
                }
                if (tid + groupSize < total)
                {
                    kWords[tid + groupSize] = k1;
                    vWords[tid + groupSize] = v1;
                }
                int nextEnd = tileEnd - keyTile;
                if (nextEnd > lo)
                {
                    int nextKey0 = Math.Max(lo, nextEnd - keyTile);
                    int nextTotal = (nextEnd - nextKey0) * words;
                    long nextFirst = layout.CacheTile(b, kvHead, nextKey0) / elementsPerWord;
                    if (tid < nextTotal)
                    {
                        k0 = kCache[nextFirst + tid];
                        v0 = vCache[nextFirst + tid];
                    }
                    if (tid + groupSize < nextTotal)
                    {
                        k1 = kCache[nextFirst + tid + groupSize];
                        v1 = vCache[nextFirst + tid + groupSize];
                    }
                }
            }
            else if (a.PackedRows != 0)
            {
                long first = layout.CacheTile(b, kvHead, key0) / elementsPerWord;
                for (int e = tid; e < total; e += groupSize)
                {
                    kWords[e] = kCache[first + e];
                    vWords[e] = vCache[first + e];
                }
            }
            else
            {
                long first = layout.CacheTile(b, kvHead, key0);
                for (int e = tid; e < keys * D; e += groupSize)
                {
                    k[e] = a.K[first + e];
                    v[e] = a.V[first + e];
                }
            }
            Group.Barrier();

            // 1. q . k for every (row, key) pair: a thread takes one key and one piece of D (d = piece, piece + pieces, ...)
            //    for all four rows, so each k element it reads serves four registers; neighbouring threads read neighbouring d.
            int pieces = Math.Max(1, Math.Min(Math.Min(groupSize, PartialSlots / BlockRows) / keys, D));
            for (int e = tid; e < keys * pieces; e += groupSize)
            {
                int j = e / pieces, piece = e - j * pieces;
                float s0 = 0f, s1 = 0f, s2 = 0f, s3 = 0f;
                int d = piece;
                for (; d + pieces < D; d += 2 * pieces)   // two d per pass (the compiler unrolls nothing): same order of sums
                {
                    float kd = element.Load(k[j * D + d]), ke = element.Load(k[j * D + d + pieces]);
                    s0 += q[d] * kd;
                    s1 += q[D + d] * kd;
                    s2 += q[2 * D + d] * kd;
                    s3 += q[3 * D + d] * kd;
                    s0 += q[d + pieces] * ke;
                    s1 += q[D + d + pieces] * ke;
                    s2 += q[2 * D + d + pieces] * ke;
                    s3 += q[3 * D + d + pieces] * ke;
                }
                if (d < D)
                {
                    float kd = element.Load(k[j * D + d]);
                    s0 += q[d] * kd;
                    s1 += q[D + d] * kd;
                    s2 += q[2 * D + d] * kd;
                    s3 += q[3 * D + d] * kd;
                }
                int at = piece * BlockRows * keys + j;
                partial[at] = s0;
                partial[at + keys] = s1;
                partial[at + 2 * keys] = s2;
                partial[at + 3 * keys] = s3;
            }
            Group.Barrier();

            // 2. z, lb = log(1 - beta) and log(beta); lb = 0 where the row does not see the key (selected, not multiplied).
            int pairs = rows * keys;
            for (int pair = tid; pair < pairs; pair += groupSize)
            {
                int r = pair / keys, j = pair - r * keys;
                float dot = 0f;
                for (int piece = 0; piece < pieces; piece++)
                    dot += partial[(piece * BlockRows + r) * keys + j];
                bool visible = key0 + j < RowLimit(r, rows, row0, n, end, a.AttendCurrent);
                float z = a.Scale * dot;
                StickMath.Logs(z, out float lbj, out float logBetaj);
                lb[r * MaxKeyTile + j] = visible ? lbj : 0f;
                logBeta[r * MaxKeyTile + j] = logBetaj;
            }
            Group.Barrier();

            // 3. log A = log(beta) + acc + the sum of lb over the nearer keys of the tile (nearest first); A = 0 where not visible.
            for (int pair = tid; pair < pairs; pair += groupSize)
            {
                int r = pair / keys, j = pair - r * keys;
                bool visible = key0 + j < RowLimit(r, rows, row0, n, end, a.AttendCurrent);
                float suffix = 0f;
                int l = keys - 1;
                for (; l - 3 > j; l -= 4)   // four loads per pass, added nearest first
                {
                    float l0 = lb[r * MaxKeyTile + l], l1 = lb[r * MaxKeyTile + l - 1];
                    float l2 = lb[r * MaxKeyTile + l - 2], l3 = lb[r * MaxKeyTile + l - 3];
                    suffix += l0;
                    suffix += l1;
                    suffix += l2;
                    suffix += l3;
                }
                for (; l > j; l--)
                    suffix += lb[r * MaxKeyTile + l];
                float weight = MathF.Exp(logBeta[r * MaxKeyTile + j] + (acc[r] + suffix));
                logBeta[r * MaxKeyTile + j] = visible ? weight : 0f;
                if (j == 0)
                    tileLb[r] = suffix + lb[r * MaxKeyTile];   // every lb of the tile, nearest first
            }
            Group.Barrier();

            // 4. out += A v over the keys each row sees: a thread per column, the four rows in registers; a key a row does
            //    not see is selected away (its value may be NaN), keys no row sees are not visited. Then acc += the tile's lb.
            int seen0 = Seen(limit0, key0, keys), seen1 = Seen(limit1, key0, keys), seen2 = Seen(limit2, key0, keys), seen3 = Seen(limit3, key0, keys);
            int seen = Math.Max(Math.Max(seen0, seen1), Math.Max(seen2, seen3));
            for (int d = tid; d < D; d += groupSize)
            {
                float o0 = outAcc[d], o1 = outAcc[D + d], o2 = outAcc[2 * D + d], o3 = outAcc[3 * D + d];
                int j = 0;
                for (; j + 1 < seen; j += 2)   // two keys per pass, summed in key order
                {
                    float vd = element.Load(v[j * D + d]), ve = element.Load(v[(j + 1) * D + d]);
                    o0 += j < seen0 ? logBeta[j] * vd : 0f;
                    o1 += j < seen1 ? logBeta[MaxKeyTile + j] * vd : 0f;
                    o2 += j < seen2 ? logBeta[2 * MaxKeyTile + j] * vd : 0f;
                    o3 += j < seen3 ? logBeta[3 * MaxKeyTile + j] * vd : 0f;
                    o0 += j + 1 < seen0 ? logBeta[j + 1] * ve : 0f;
                    o1 += j + 1 < seen1 ? logBeta[MaxKeyTile + j + 1] * ve : 0f;
                    o2 += j + 1 < seen2 ? logBeta[2 * MaxKeyTile + j + 1] * ve : 0f;
                    o3 += j + 1 < seen3 ? logBeta[3 * MaxKeyTile + j + 1] * ve : 0f;
                }
                if (j < seen)
                {
                    float vd = element.Load(v[j * D + d]);
                    o0 += j < seen0 ? logBeta[j] * vd : 0f;
                    o1 += j < seen1 ? logBeta[MaxKeyTile + j] * vd : 0f;
                    o2 += j < seen2 ? logBeta[2 * MaxKeyTile + j] * vd : 0f;
                    o3 += j < seen3 ? logBeta[3 * MaxKeyTile + j] * vd : 0f;
                }
                outAcc[d] = o0;
                outAcc[D + d] = o1;
                outAcc[2 * D + d] = o2;
                outAcc[3 * D + d] = o3;
            }
            for (int r = tid; r < rows; r += groupSize)
                acc[r] += tileLb[r];
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

    /// <summary>
    /// Keys below this bound are seen by row <paramref name="r"/> of the block (the query at position end - n + i sees
    /// keys below end - n + i, or up to it with AttendCurrent); int.MinValue for a row past the block's.
    /// </summary>
    private static int RowLimit(int r, int rows, int row0, int n, int end, int attendCurrent)
    {
        int flat = row0 + r, i = flat - flat / n * n;
        return r < rows ? end - n + i + attendCurrent : int.MinValue;
    }

    /// <summary>How many keys of the tile from <paramref name="key0"/> (<paramref name="keys"/> of them) lie below <paramref name="limit"/>.</summary>
    private static int Seen(int limit, int key0, int keys) => limit == int.MinValue ? 0 : Math.Min(Math.Max(limit - key0, 0), keys);
}

/// <summary>Sixteen bytes, the unit the decode kernel stages cache rows in (one vector load and store per thread).</summary>
internal struct Word16
{
    public uint X, Y, Z, W;
}
