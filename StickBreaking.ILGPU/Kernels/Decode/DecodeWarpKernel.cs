using System;
using ILGPU;
using ILGPU.Runtime.Cuda;
using StickBreaking.ILGPU.Kernels.Common;
using StickBreaking.ILGPU.Kernels.TensorCore;
using StickBreaking.ILGPU.Launch;

namespace StickBreaking.ILGPU.Kernels.Decode;

/// <summary>
/// Queries behind a cache, one warp per (sequence b, key/value head, block of <see cref="DecodeKernel.BlockRows"/> rows,
/// chunk of keys), for head dimensions 64 and 128 on CUDA devices (its code also runs on the CPU accelerator with 32-thread
/// warps). It computes what <see cref="DecodeKernel"/> computes (docs/math.md, "Queries behind a cache", "Split and merge")
/// with no barrier across warps: a decode reads each cache element once and does little arithmetic on it, so what decides
/// its speed is how many bytes are on their way from memory, and a warp that never waits on other warps keeps its own.
/// <para>
/// fp32: each lane owns D / 32 consecutive dimensions (2 or 4) of q, of every key and value row, and of the four rows' o,
/// loaded into registers a round at a time. fp16 and bf16: the warp's staging ring (<see cref="DecodeRing"/>) holds three
/// rounds of keys and values in shared memory, each copied (cp.async on CUDA) two rounds before it is used; each lane reads
/// 16 bytes at a time from it, as the mma's fragments for the keys, and 8 dimensions of a value row (D / 8 lanes a row, so
/// a read holds 2 or 4 keys' values). The warp walks its chunk from the nearest key to the farthest, <see cref="Steps"/>
/// keys per round:
/// 1. q . k, leaving lane l = 4 s + r with z of step s, row r. fp32: every lane loads its piece of the round's keys
///    (coalesced rows) and multiplies them with its piece of the four rows' q; a butterfly over the warp sums the pieces.
///    fp16 and bf16: on the tensor cores (<see cref="QueryKeyMma"/>), the keys loaded as the mma's B fragments (16 bytes a
///    load, four lanes a key), fp32 accumulation; the products of 16-bit values are exact in fp32 either way.
/// 2. One (key, row) pair per lane: lb = log(1 - beta) and log(beta) (lb = 0 where the row does not see the key, selected);
///    the sum of lb over the nearer keys of the round by a scan over the lanes of the row (shuffles up by 4, 8, 16 lanes);
///    A = exp(log(beta) + acc + that sum), 0 where not seen; acc += the round's sum.
/// 3. o += A v: the weights go through 32 floats of shared memory (one 16-byte read per step gives a key's four rows), and
///    each lane takes its piece of the round's values; the 16-bit lanes sum their own keys' terms and add the lanes that
///    share their dimensions once, at the end of the chunk.
/// One chunk writes o, rem and LogRem; several write fp32 partials that <see cref="MergeKernel"/> combines nearest first.
/// Only slots below a sequence's length are read; terms a row does not see are selected away, never multiplied by zero.
/// </para>
/// </summary>
internal static partial class DecodeWarpKernel
{
    /// <summary>Keys per round: four rows times eight keys is one (key, row) pair per lane.</summary>
    public const int Steps = 8;
    /// <summary>Threads per group: one warp.</summary>
    public const int GroupSize = 32;

    /// <summary>Whether it serves head dimension <paramref name="headDim"/> (two or four dimensions per lane).</summary>
    public static bool Serves(int headDim) => headDim == 64 || headDim == 128;

    /// <summary>fp32 storage.</summary>
    public static readonly KernelLaunch<DecodeArgs<float>> Launch = Describe<float, Fp32Lane>("warp decode", KernelFamily.Cuda);
    /// <summary>fp16 storage (q . k on the tensor cores).</summary>
    public static readonly KernelLaunch<DecodeArgs<ushort>> LaunchFp16 = Describe<ushort, Fp16Lane>("warp decode fp16", KernelFamily.TensorCore);
    /// <summary>bf16 storage (q . k on the tensor cores).</summary>
    public static readonly KernelLaunch<DecodeArgs<ushort>> LaunchBf16 = Describe<ushort, Bf16Lane>("warp decode bf16", KernelFamily.TensorCore);

    private static KernelLaunch<DecodeArgs<T>> Describe<T, TLane>(string name, KernelFamily family)
        where T : unmanaged
        where TLane : struct, ILane<T> => new()
    {
        Name = name, Body = Kernel<T, TLane>, Family = family, RowsPerGroup = DecodeKernel.BlockRows,
        GroupSize = GroupSize, WarpSize = 32, MaxHeadDim = 128, HeadDims = Serves, MinGroupsPerMultiprocessor = 16,
        EmulationSharedBytes = family == KernelFamily.TensorCore ? DecodeRing.EmulatedBytes + 4 * Mma.ScratchUintsPerWarp : 0,
    };

    public static void Kernel<T, TLane>(DecodeArgs<T> a)
        where T : unmanaged
        where TLane : struct, ILane<T>
    {
        int lane = Group.IdxX;
        var layout = a.Layout;
        var loader = default(TLane);
        int D = layout.HeadDim, n = layout.Queries, kvHeads = layout.KeyValueHeads;
        int dims = D / 32;
        int perKv = layout.QueryHeads / kvHeads;
        int b = Grid.IdxX / kvHeads, kvHead = Grid.IdxX - b * kvHeads;
        int chunk = Grid.IdxY % a.Chunks, rowBlock = Grid.IdxY / a.Chunks;
        int row0 = rowBlock * DecodeKernel.BlockRows;
        int rows = Math.Min(DecodeKernel.BlockRows, perKv * n - row0);
        int length = a.CacheLengths[b];
        int end = length + (a.HasKeysAfter != 0 ? a.KeysAfter[b] : 0);
        int hi = length - chunk * a.ChunkKeys;
        int lo = Math.Max(0, hi - a.ChunkKeys);
        int limit0 = Limit(0, rows, row0, n, end, a.AttendCurrent), limit1 = Limit(1, rows, row0, n, end, a.AttendCurrent);
        int limit2 = Limit(2, rows, row0, n, end, a.AttendCurrent), limit3 = Limit(3, rows, row0, n, end, a.AttendCurrent);
        int seenByAll = Math.Min(Math.Min(rows > 0 ? limit0 : int.MaxValue, rows > 1 ? limit1 : int.MaxValue),
            Math.Min(rows > 2 ? limit2 : int.MaxValue, rows > 3 ? limit3 : int.MaxValue));
        // This lane's (step, row) pair in steps 2 and 3, and its row's limit.
        int myRow = lane & 3, myStep = lane >> 2;
        int myLimit = myRow == 0 ? limit0 : myRow == 1 ? limit1 : myRow == 2 ? limit2 : limit3;

        long piece = (long)lane * dims;
        bool mma = loader.KeysOnTensorCores;   // a constant of the storage type
        Lane4 q0 = default, q1 = default, q2 = default, q3 = default;
        Round qFragments = default;
        if (mma)
        {
            qFragments = QueryFragments(a, loader, layout, b, kvHead, perKv, row0, rows, n, lane, D / 32);
        }
        else
        {
            q0 = QueryPiece(a, loader, layout, b, kvHead, perKv, row0, 0, rows, n, piece, dims);
            q1 = QueryPiece(a, loader, layout, b, kvHead, perKv, row0, 1, rows, n, piece, dims);
            q2 = QueryPiece(a, loader, layout, b, kvHead, perKv, row0, 2, rows, n, piece, dims);
            q3 = QueryPiece(a, loader, layout, b, kvHead, perKv, row0, 3, rows, n, piece, dims);
        }
        Lane4 o0 = default, o1 = default, o2 = default, o3 = default;
        // The 16-bit lanes read values 16 bytes a lane too (DecodeRing.ReadValues): 8 dimensions, the upper 4 in u_r; keysPerLoad keys
        // per load, this lane's part of them.
        Lane4 u0 = default, u1 = default, u2 = default, u3 = default;
        int lanesPerKey = D / 8, keysPerLoad = 32 / lanesPerKey, part = lane / lanesPerKey;
        long widePiece = (long)(lane - part * lanesPerKey) * 8;
        float acc = 0f;   // this lane's row's sum of lb over the keys already visited

        // Where there is no PTX: the ring and the mma emulation's scratch in dynamic shared memory, which a CUDA launch does
        // not request. The ring first: its PTX declaration precedes every use.
        var emulated = SharedMemory.GetDynamic<uint>();
        var ring = mma ? DecodeRing.Allocate(emulated.Cast<Raw16>()) : default;
        var mmaScratch = mma ? emulated.SubView(DecodeRing.Pieces * 4, Mma.ScratchUintsPerWarp) : default;
        var weights = SharedMemory.Allocate<float>(GroupSize);
        long kBase = layout.CacheRow(b, kvHead, 0), vBase = kBase, token = D;
        int unitsPerRow = D / dims;   // a row in pieces of dims elements
        // fp16 / bf16: the ring's first Stages - 1 rounds on their way before the loop; one more each round, each round a
        // copy group (possibly empty) so that waiting for all but the newest Stages - 1 groups waits for this round's.
        int stage = 0, fillStage = DecodeRing.Stages - 1;
        if (mma)
        {
            for (int s = 0; s < DecodeRing.Stages - 1; s++)
            {
                if (hi - s * Steps > lo)
                    DecodeRing.Fill(ring, a.K.Cast<ushort>(), a.V.Cast<ushort>(), a.KeyAddress, a.ValueAddress, kBase, hi - s * Steps, lo, s, lane, D);
                TensorCoreOps.CommitCopies();
            }
        }
        for (int roundEnd = hi; roundEnd > lo; roundEnd -= Steps)
        {
            Round round = default;
            if (mma)
            {
                int fillEnd = roundEnd - (DecodeRing.Stages - 1) * Steps;
                if (fillEnd > lo)
                    DecodeRing.Fill(ring, a.K.Cast<ushort>(), a.V.Cast<ushort>(), a.KeyAddress, a.ValueAddress, kBase, fillEnd, lo, fillStage, lane, D);
                TensorCoreOps.CommitCopies();
                DecodeRing.WaitForOldest();
                Group.Barrier();                       // every lane's copies of this round are in the ring
                round = DecodeRing.ReadKeys(round, ring, stage, roundEnd, lo, lane, D);
            }
            else
            {
                // Every load of the round at once (the values' are in flight while q . k and the stick are computed).
                round = Fetch<T, TLane>(a.K, a.V, kBase + piece, vBase + piece, token, unitsPerRow, roundEnd, lo, dims);
            }
            float dot = mma
                ? QueryKeyMma<T, TLane>(round, qFragments, lane, D / 32, mmaScratch)
                : QueryKeyRound<T, TLane>(round, lane, dims, q0, q1, q2, q3);
            int key = roundEnd - 1 - myStep;
            bool seen = key >= lo && key < myLimit;
            StickMath.Logs(a.Scale * dot, out float lb, out float logBeta);
            lb = seen ? lb : 0f;
            // Sum of lb over the nearer keys of the round (steps before this one, same row): an exclusive scan over the
            // lanes 4 apart, nearest first.
            float nearer = Warp.ShuffleUp(lb, 4);
            nearer = myStep >= 1 ? nearer : 0f;
            float t = Warp.ShuffleUp(nearer, 4);
            nearer += myStep >= 1 ? t : 0f;
            t = Warp.ShuffleUp(nearer, 8);
            nearer += myStep >= 2 ? t : 0f;
            t = Warp.ShuffleUp(nearer, 16);
            nearer += myStep >= 4 ? t : 0f;
            float roundSum = Warp.Shuffle(nearer + lb, 28 + myRow);   // every lb of the round, for this lane's row
            float weight = MathF.Exp(logBeta + (acc + nearer));
            weights[lane] = seen ? weight : 0f;
            acc += roundSum;
            Group.Barrier();
            bool allSeen = roundEnd - Steps >= lo && roundEnd - 1 < seenByAll;
            if (mma)
            {
                round = DecodeRing.ReadValues(round, ring, stage, roundEnd, lo, lane, D, keysPerLoad, part);
                ValueRoundWide<T, TLane>(round, roundEnd, lo, keysPerLoad, part, weights.Cast<Lane4>(), allSeen,
                    limit0, limit1, limit2, limit3, ref o0, ref o1, ref o2, ref o3, ref u0, ref u1, ref u2, ref u3);
                stage = stage == DecodeRing.Stages - 1 ? 0 : stage + 1;
                fillStage = fillStage == DecodeRing.Stages - 1 ? 0 : fillStage + 1;
            }
            else
                ValueRound<T, TLane>(round, roundEnd, lo, dims, weights.Cast<Lane4>(), allSeen,
                    limit0, limit1, limit2, limit3, ref o0, ref o1, ref o2, ref o3);
            Group.Barrier();
        }

        if (mma)
        {
            // The parts' sums: every lane ends with the same total (a + b = b + a), the lanes of part 0 store it.
            for (int mask = 16; mask >= lanesPerKey; mask >>= 1)
            {
                o0 = Lane4.Add(o0, ShuffleXor(o0, mask));
                o1 = Lane4.Add(o1, ShuffleXor(o1, mask));
                o2 = Lane4.Add(o2, ShuffleXor(o2, mask));
                o3 = Lane4.Add(o3, ShuffleXor(o3, mask));
                u0 = Lane4.Add(u0, ShuffleXor(u0, mask));
                u1 = Lane4.Add(u1, ShuffleXor(u1, mask));
                u2 = Lane4.Add(u2, ShuffleXor(u2, mask));
                u3 = Lane4.Add(u3, ShuffleXor(u3, mask));
            }
            if (part == 0)
            {
                Store<T, TLane>(a, layout, b, kvHead, perKv, row0, 0, rows, n, chunk, widePiece, 4, o0);
                Store<T, TLane>(a, layout, b, kvHead, perKv, row0, 0, rows, n, chunk, widePiece + 4, 4, u0);
                Store<T, TLane>(a, layout, b, kvHead, perKv, row0, 1, rows, n, chunk, widePiece, 4, o1);
                Store<T, TLane>(a, layout, b, kvHead, perKv, row0, 1, rows, n, chunk, widePiece + 4, 4, u1);
                Store<T, TLane>(a, layout, b, kvHead, perKv, row0, 2, rows, n, chunk, widePiece, 4, o2);
                Store<T, TLane>(a, layout, b, kvHead, perKv, row0, 2, rows, n, chunk, widePiece + 4, 4, u2);
                Store<T, TLane>(a, layout, b, kvHead, perKv, row0, 3, rows, n, chunk, widePiece, 4, o3);
                Store<T, TLane>(a, layout, b, kvHead, perKv, row0, 3, rows, n, chunk, widePiece + 4, 4, u3);
            }
        }
        else
        {
            // One chunk: the result. Several: this chunk's part, merged later nearest first.
            Store<T, TLane>(a, layout, b, kvHead, perKv, row0, 0, rows, n, chunk, piece, dims, o0);
            Store<T, TLane>(a, layout, b, kvHead, perKv, row0, 1, rows, n, chunk, piece, dims, o1);
            Store<T, TLane>(a, layout, b, kvHead, perKv, row0, 2, rows, n, chunk, piece, dims, o2);
            Store<T, TLane>(a, layout, b, kvHead, perKv, row0, 3, rows, n, chunk, piece, dims, o3);
        }

        if (lane < rows)
        {
            int flat = row0 + lane, g = flat / n, i = flat - g * n, h = kvHead * perKv + g;
            if (a.Chunks == 1)
            {
                long at = layout.Row(b, h, i);
                a.LogRem[at] = acc;
                a.Rem[at] = MathF.Exp(acc);
            }
            else
            {
                a.PartialLogRem[layout.PartialRow(chunk, b, h, i)] = acc;
            }
        }
    }

    /// <summary>
    /// This lane's A fragments of q for <see cref="QueryKeyMma"/>: lane 4 g + c holds, of row g of the block (zero for g past
    /// the block's rows, which leaves rows 4 to 15 of the mma's A zero), the <paramref name="pieces"/> pieces of 8
    /// consecutive dimensions 4 i + c (i = 0 .. pieces - 1), as stored: the same dimensions <see cref="DecodeRing.ReadKeys"/> gives
    /// lanes c of the keys.
    /// </summary>
    private static Round QueryFragments<T, TLane>(DecodeArgs<T> a, TLane loader, DecodeLayout layout, int b, int kvHead,
        int perKv, int row0, int rows, int n, int lane, int pieces)
        where T : unmanaged
        where TLane : struct, ILane<T>
    {
        int r = lane >> 2, c = lane & 3;
        Round q = default;
        if (r >= rows)
            return q;
        int flat = row0 + r, g = flat / n, i = flat - g * n;
        return RowPieces<T, TLane>(q, a.Q.SubView(layout.QueryRow(b, kvHead * perKv + g, i)), c, pieces);
    }

    /// <summary>
    /// <paramref name="round"/> with K0 .. K<paramref name="pieces"/> - 1 the pieces of 8 consecutive dimensions 4 i + c of
    /// <paramref name="row"/>, one 16-byte load each: q's A fragments (<see cref="QueryFragments"/>) and a key's B fragments
    /// (<see cref="DecodeRing.ReadKeys"/>) hold the same dimensions.
    /// </summary>
    private static Round RowPieces<T, TLane>(Round round, ArrayView<T> row, int c, int pieces)
        where T : unmanaged
        where TLane : struct, ILane<T>
    {
        var loader = default(TLane);
        round.K0 = loader.FetchWide(row, c);
        round.K1 = loader.FetchWide(row, 4 + c);
        if (pieces == 4)
        {
            round.K2 = loader.FetchWide(row, 8 + c);
            round.K3 = loader.FetchWide(row, 12 + c);
        }
        return round;
    }

    private static Lane4 ShuffleXor(Lane4 x, int mask) => new()
    {
        X = Warp.ShuffleXor(x.X, mask), Y = Warp.ShuffleXor(x.Y, mask), Z = Warp.ShuffleXor(x.Z, mask), W = Warp.ShuffleXor(x.W, mask),
    };

    /// <summary>
    /// q . k of the round's keys on the tensor cores: S = Q K^T as m16n8k16 mmas with fp32 accumulation, rows of A the
    /// block's query rows (4 used of 16), columns of B the round's 8 steps, and k running over the head dimensions in the
    /// order the lanes hold them (<see cref="QueryFragments"/>, <see cref="DecodeRing.ReadKeys"/>; a dot product does not depend on
    /// the order of its terms, only each dimension of q must meet the same one of k). The accumulator leaves lane 4 r + c
    /// with z of row r at steps 2 c and 2 c + 1; two shuffles hand lane l = 4 s + r its own pair, as
    /// <see cref="QueryKeyRound"/> does.
    /// </summary>
    private static float QueryKeyMma<T, TLane>(in Round round, in Round q, int lane, int pieces, ArrayView<uint> scratch)
        where T : unmanaged
        where TLane : struct, ILane<T>
    {
        var loader = default(TLane);
        Acc4 s = default, s1 = default;   // two chains of mmas, added at the end (a fixed order)
        loader.QueryKey(ref s, q.K0, round.K0, scratch);
        loader.QueryKey(ref s1, q.K1, round.K1, scratch);
        if (pieces == 4)
        {
            loader.QueryKey(ref s, q.K2, round.K2, scratch);
            loader.QueryKey(ref s1, q.K3, round.K3, scratch);
        }
        int step = lane >> 2, from = 4 * (lane & 3) + (step >> 1);
        float even = Warp.Shuffle(s.C0 + s1.C0, from), odd = Warp.Shuffle(s.C1 + s1.C1, from);
        return (step & 1) != 0 ? odd : even;
    }

    /// <summary>This lane's piece of row <paramref name="r"/>'s query; zero for a row past the block's.</summary>
    private static Lane4 QueryPiece<T, TLane>(DecodeArgs<T> a, TLane loader, DecodeLayout layout, int b, int kvHead, int perKv,
        int row0, int r, int rows, int n, long piece, int dims)
        where T : unmanaged
        where TLane : struct, ILane<T>
    {
        if (r >= rows)
            return default;
        int flat = row0 + r, g = flat / n, i = flat - g * n;
        return loader.Load(a.Q, layout.QueryRow(b, kvHead * perKv + g, i) + piece, dims);
    }

    /// <summary>Writes this lane's piece of row <paramref name="r"/>'s o (one chunk) or of its chunk partial (several).</summary>
    private static void Store<T, TLane>(DecodeArgs<T> a, DecodeLayout layout, int b, int kvHead, int perKv, int row0, int r,
        int rows, int n, int chunk, long piece, int dims, Lane4 o)
        where T : unmanaged
        where TLane : struct, ILane<T>
    {
        if (r >= rows)
            return;
        int flat = row0 + r, g = flat / n, i = flat - g * n, h = kvHead * perKv + g;
        if (a.Chunks == 1)
        {
            default(TLane).Store(a.O, layout.QueryRow(b, h, i) + piece, dims, o);
            return;
        }
        long at = layout.PartialRow(chunk, b, h, i) * layout.HeadDim + piece;
        a.PartialO[at] = o.X;
        a.PartialO[at + 1] = o.Y;
        if (dims == 4)
        {
            a.PartialO[at + 2] = o.Z;
            a.PartialO[at + 3] = o.W;
        }
    }

    /// <summary>Keys below this are seen by row <paramref name="r"/> (as <see cref="DecodeKernel"/>); int.MinValue past the block's rows.</summary>
    private static int Limit(int r, int rows, int row0, int n, int end, int attendCurrent)
    {
        int flat = row0 + r, i = flat - flat / n * n;
        return r < rows ? end - n + i + attendCurrent : int.MinValue;
    }
}

/// <summary>Four floats: a lane's piece (2 or 4 dimensions, the rest zero) of a row, or one key's weights for four rows.</summary>
internal struct Lane4
{
    public float X, Y, Z, W;

    public static float Dot(Lane4 a, Lane4 b) => a.X * b.X + a.Y * b.Y + a.Z * b.Z + a.W * b.W;

    /// <summary>a + b, element by element.</summary>
    public static Lane4 Add(Lane4 a, Lane4 b) => new() { X = a.X + b.X, Y = a.Y + b.Y, Z = a.Z + b.Z, W = a.W + b.W };

    /// <summary>o + a v, element by element.</summary>
    public static Lane4 Axpy(Lane4 o, float a, Lane4 v) =>
        new() { X = o.X + a * v.X, Y = o.Y + a * v.Y, Z = o.Z + a * v.Z, W = o.W + a * v.W };
}

/// <summary>Sixteen bytes as loaded: a lane's piece of a row before it is converted (8 or 4 bytes of 16-bit storage in Lo, 16 or 8 of fp32).</summary>
internal struct Raw16
{
    public ulong Lo, Hi;
}

/// <summary>How a lane reads and writes its piece of a row in one storage type: 2 or 4 consecutive elements, in one load.</summary>
internal interface ILane<T>
    where T : unmanaged
{
    /// <summary>Loads <paramref name="dims"/> (2 or 4) elements from index <paramref name="at"/> (a multiple of dims), as stored.</summary>
    Raw16 Fetch(ArrayView<T> x, long at, int dims);

    /// <summary>Loads piece <paramref name="unit"/> of <paramref name="dims"/> elements of <paramref name="x"/> (a view starting at a piece), as stored.</summary>
    Raw16 FetchUnit(ArrayView<T> x, int unit, int dims);

    /// <summary>The fetched elements as floats; the rest zero.</summary>
    Lane4 Unpack(Raw16 raw, int dims);

    /// <summary>Whether q . k runs on the tensor cores (<see cref="QueryKey"/>): the 16-bit types; a constant of each.</summary>
    bool KeysOnTensorCores { get; }

    /// <summary>Loads 16 bytes, unit <paramref name="unit"/> of <paramref name="x"/> (a view starting 16-byte aligned), as stored.</summary>
    Raw16 FetchWide(ArrayView<T> x, int unit);

    /// <summary>
    /// s += two m16n8k16 mmas over 16 of the head dimensions: 8 consecutive dimensions of q (<paramref name="q"/>, A rows g)
    /// and of a key (<paramref name="k"/>, B column g), as stored; dimensions 0, 1 and 4, 5 at k = 2c, 2c + 1 of the first
    /// and second mma, 2, 3 and 6, 7 at k = 2c + 8, 2c + 9. Every lane of the warp calls it. Not used where
    /// <see cref="KeysOnTensorCores"/> is false.
    /// </summary>
    void QueryKey(ref Acc4 s, Raw16 q, Raw16 k, ArrayView<uint> scratch);

    /// <summary>Fetch and unpack.</summary>
    Lane4 Load(ArrayView<T> x, long at, int dims);

    /// <summary>Rounds and writes <paramref name="dims"/> elements at index <paramref name="at"/>.</summary>
    void Store(ArrayView<T> x, long at, int dims, Lane4 value);
}

/// <summary>What the two 16-bit lanes share: 4 elements in one 8-byte load, 2 in one 4-byte load; stores rounded by the storage type.</summary>
internal static class Lane16
{
    public static Raw16 Fetch(ArrayView<ushort> x, long at, int dims) =>
        new() { Lo = dims == 4 ? x.Cast<ulong>()[at / 4] : x.Cast<uint>()[at / 2] };

    public static Raw16 FetchUnit(ArrayView<ushort> x, int unit, int dims) =>
        new() { Lo = dims == 4 ? x.Cast<ulong>()[unit] : x.Cast<uint>()[unit] };

    public static Raw16 FetchWide(ArrayView<ushort> x, int unit) => x.Cast<Raw16>()[unit];

    public static void QueryKey<TStorage>(ref Acc4 s, Raw16 q, Raw16 k, ArrayView<uint> scratch)
        where TStorage : struct, IStorage
    {
        Mma.Run<TStorage>(ref s, (uint)q.Lo, 0u, (uint)(q.Lo >> 32), 0u, (uint)k.Lo, (uint)(k.Lo >> 32), scratch, 0);
        Mma.Run<TStorage>(ref s, (uint)q.Hi, 0u, (uint)(q.Hi >> 32), 0u, (uint)k.Hi, (uint)(k.Hi >> 32), scratch, 0);
    }

    public static void Store<TStorage>(ArrayView<ushort> x, long at, int dims, Lane4 value)
        where TStorage : struct, IStorage
    {
        var s = default(TStorage);
        x[at] = s.Store(value.X);
        x[at + 1] = s.Store(value.Y);
        if (dims == 4)
        {
            x[at + 2] = s.Store(value.Z);
            x[at + 3] = s.Store(value.W);
        }
    }
}

/// <summary>bf16 bits: 4 elements in one 8-byte load, 2 in one 4-byte load.</summary>
internal readonly struct Bf16Lane : ILane<ushort>
{
    public Raw16 Fetch(ArrayView<ushort> x, long at, int dims) => Lane16.Fetch(x, at, dims);

    public Raw16 FetchUnit(ArrayView<ushort> x, int unit, int dims) => Lane16.FetchUnit(x, unit, dims);

    public bool KeysOnTensorCores => true;

    public Raw16 FetchWide(ArrayView<ushort> x, int unit) => Lane16.FetchWide(x, unit);

    public void QueryKey(ref Acc4 s, Raw16 q, Raw16 k, ArrayView<uint> scratch) => Lane16.QueryKey<Bf16Storage>(ref s, q, k, scratch);

    public Lane4 Unpack(Raw16 raw, int dims)
    {
        uint lo = (uint)raw.Lo, hi = (uint)(raw.Lo >> 32);
        return new Lane4
        {
            X = Interop.IntAsFloat(lo << 16), Y = Interop.IntAsFloat(lo & 0xFFFF0000u),
            Z = Interop.IntAsFloat(hi << 16), W = Interop.IntAsFloat(hi & 0xFFFF0000u),
        };
    }

    public Lane4 Load(ArrayView<ushort> x, long at, int dims) => Unpack(Fetch(x, at, dims), dims);

    public void Store(ArrayView<ushort> x, long at, int dims, Lane4 value) => Lane16.Store<Bf16Storage>(x, at, dims, value);
}

/// <summary>fp16 bits: 4 elements in one 8-byte load, 2 in one 4-byte load.</summary>
internal readonly struct Fp16Lane : ILane<ushort>
{
    public Raw16 Fetch(ArrayView<ushort> x, long at, int dims) => Lane16.Fetch(x, at, dims);

    public Raw16 FetchUnit(ArrayView<ushort> x, int unit, int dims) => Lane16.FetchUnit(x, unit, dims);

    public bool KeysOnTensorCores => true;

    public Raw16 FetchWide(ArrayView<ushort> x, int unit) => Lane16.FetchWide(x, unit);

    public void QueryKey(ref Acc4 s, Raw16 q, Raw16 k, ArrayView<uint> scratch) => Lane16.QueryKey<Fp16Storage>(ref s, q, k, scratch);

    public Lane4 Unpack(Raw16 raw, int dims)
    {
        var s = default(Fp16Storage);
        ulong w = raw.Lo;
        return new Lane4
        {
            X = s.Load((ushort)w), Y = s.Load((ushort)(w >> 16)),
            Z = dims == 4 ? s.Load((ushort)(w >> 32)) : 0f, W = dims == 4 ? s.Load((ushort)(w >> 48)) : 0f,
        };
    }

    public Lane4 Load(ArrayView<ushort> x, long at, int dims) => Unpack(Fetch(x, at, dims), dims);

    public void Store(ArrayView<ushort> x, long at, int dims, Lane4 value) => Lane16.Store<Fp16Storage>(x, at, dims, value);
}

/// <summary>fp32: 4 elements in one 16-byte load, 2 in one 8-byte load.</summary>
internal readonly struct Fp32Lane : ILane<float>
{
    public Raw16 Fetch(ArrayView<float> x, long at, int dims) =>
        dims == 4 ? x.Cast<Raw16>()[at / 4] : new Raw16 { Lo = x.Cast<ulong>()[at / 2] };

    public Raw16 FetchUnit(ArrayView<float> x, int unit, int dims) =>
        dims == 4 ? x.Cast<Raw16>()[unit] : new Raw16 { Lo = x.Cast<ulong>()[unit] };

    public bool KeysOnTensorCores => false;

    public Raw16 FetchWide(ArrayView<float> x, int unit) => x.Cast<Raw16>()[unit];

    public void QueryKey(ref Acc4 s, Raw16 q, Raw16 k, ArrayView<uint> scratch)
    {
        // fp32 keys: q . k on the FMA units (QueryKeyRound).
    }

    public Lane4 Unpack(Raw16 raw, int dims) => new()
    {
        X = Interop.IntAsFloat((uint)raw.Lo), Y = Interop.IntAsFloat((uint)(raw.Lo >> 32)),
        Z = Interop.IntAsFloat((uint)raw.Hi), W = Interop.IntAsFloat((uint)(raw.Hi >> 32)),
    };

    public Lane4 Load(ArrayView<float> x, long at, int dims) => Unpack(Fetch(x, at, dims), dims);

    public void Store(ArrayView<float> x, long at, int dims, Lane4 value)
    {
        x[at] = value.X;
        x[at + 1] = value.Y;
        if (dims == 4)
        {
            x[at + 2] = value.Z;
            x[at + 3] = value.W;
        }
    }
}
