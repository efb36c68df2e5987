using System;
using System.Runtime.CompilerServices;
using ILGPU;
using ILGPU.Runtime;
using ILGPU.Runtime.Cuda;
using StickBreaking.ILGPU.Kernels.Common;
using StickBreaking.ILGPU.Launch;
using static StickBreaking.ILGPU.Kernels.TensorCore.TensorCoreOps;

namespace StickBreaking.ILGPU.Kernels.TensorCore;

/// <summary>
/// The tensor-core forward (docs/math.md, section 1, the tiled forward) for 16-bit storage (fp16 or bf16, the
/// <c>TStorage</c> type argument), head dimensions 64 and 128 (<see cref="Supports"/>): S = Q K^T and O += P V
/// on <c>mma.sync.m16n8k16</c> with fp32 accumulation (<see cref="Mma"/>), softplus, the in-tile reverse scan
/// and exp in fp32 on the accumulator registers.
/// <para>
/// One group of <see cref="GroupSize"/> threads (4 warps) per (head, block of <see cref="BlockRows"/> query
/// rows); warp w owns rows 16w .. 16w+15 of the block (lane 4g + t: rows g and g+8). Key tiles of
/// <see cref="KeyTile"/> are walked from the diagonal back to key 0. The Q block (as each thread's A fragments, in
/// mma operand order) and the K tile (row-major) and V tile (transposed, [d][key]) sit in shared memory as
/// 16-bit values; every K and V fragment is one 16-byte shared load feeding two mma, every Q fragment one load
/// feeding eight. Scores, lb and acc are in base 2 (ex2 without multiplies).
/// </para>
/// <para>
/// The grid is (query heads, row blocks); a group takes its (head, row block) from its place in launch order, in chunks
/// of <see cref="HeadChunk"/> heads with the heaviest row block first (tenth session, bf16 B=4 H=12 D=128, forward alone:
/// 5.033 -> 4.726 ms at T = 8192, 21.55 -> 18.30 at 16384, against all heads at once). Rows come from
/// <see cref="TensorCoreForwardArgs.Rows"/> (docs/math.md, "Layouts and grouped heads"): q and o are read and written at
/// the query head's rows, k and v at those of the key/value head it reads
/// (<see cref="AttentionRows.KeyBaseOfQuery"/>), any strides with D contiguous (16-byte aligned q, k, v rows, 4-byte
/// aligned o rows, as the host checks); rem, LogRem and the snapshots stay contiguous per query head.
/// </para>
/// <para>
/// How the next tile is staged is the plan (the <c>TPlan</c> type argument, <see cref="IForwardPlan"/>): the
/// library's (<see cref="ThreeGroupsPerSmNoPrefetch"/>) keeps one K / V^T buffer pair (54 KB) and at most 168
/// registers, so that three groups share an SM and hide each other's waits; after a tile's P V a barrier ends its
/// reads, the next tile is loaded and stored, and a second barrier ends the stores. The others (two buffer pairs
/// with the next tile loaded into registers during P V, two groups per SM; or one pair with that prefetch) were
/// measured slower and stay for comparison (TensorCoreForwardTests.TimingOnCuda; eighth session, kernel alone, bf16
/// rounded at B=4 H=12 T=4096 D=128: 1.451 ms against 1.484 and 1.501). A plan that copies the next K tile by
/// <c>cp.async</c> right after S measured the same with rounded weights (1.446) and slower with split ones (1.682
/// against 1.617), and is not kept (branch <c>next/forward-async-keys</c>). On SM 9.0 devices the library runs
/// <see cref="WgmmaPlan"/> instead (both products on wgmma from shared memory, the later tiles copied by cp.async,
/// TensorCoreForwardKernel.Wgmma.cs; tenth session, bf16 B=4: 1.280 ms against this plan's 1.415 at H=12 D=128
/// T=4096, 0.901 against 1.204 at H=16 D=64). A Hopper plan that issued the next tile's S before this tile's
/// elementwise work (two buffer pairs, two groups per SM) measured slower (1.573 ms against 1.338 for the same code
/// at three groups per SM) and is not kept (branch <c>next/wgmma-async</c>). At D = 128 from T = 2048 on it runs
/// <see cref="WgmmaTwoWarpgroupsPlan"/>: two warpgroups, 128 rows a group, sharing each staged K / V tile
/// (<see cref="IForwardPlan.WarpGroups"/>; eleventh session: 1.169 / 4.062 / 15.39 ms against 1.303 / 4.697 / 18.14 at
/// T = 4096 / 8192 / 16384).
/// </para>
/// <para>
/// The elementwise work (docs/math.md, steps 1 to 3) of a thread's two rows g and g + 8 is generated as one
/// straight-line block with the two rows' statements alternating and selects in place of branches, so that the
/// scheduler can hide one row's latencies (ex2, rcp, the quad shuffles, the serial suffix sums) behind the other's
/// work; the acc snapshots are written after P V.
/// </para>
/// <para>
/// The key permutation: mma column n of score n-tile nt stands for key 16 (n / 2) + 2 nt + n % 2 (the K
/// fragments are read through it), so that the 16 scores a thread holds of each of its rows are 16
/// CONSECUTIVE keys 16t .. 16t+15. The in-tile reverse scan is then a sequential scan over the thread's own
/// keys plus the sums of the nearer threads of the quad (4 shuffles), and the accumulators of n-tiles 2ks and
/// 2ks+1 are, converted to 16 bits, exactly the A fragment of k-step ks of P V (keys 16t + 4ks .. +3), whose
/// V fragments are again consecutive keys of the transposed V tile. The head dimension is permuted the same
/// way for Q and K (k-steps 2m and 2m+1 take dimensions 32m + 8t .. +3 and +4 .. +7), so that one 16-byte load
/// per row gives the fragments of two k-steps.
/// </para>
/// <para>
/// Masks select, never multiply by zero: a key that a row does not see gets lb = 0 and weight 0 by selection.
/// K and V rows at or past T, and keys that no row of the block sees, are staged as zeros (never read). A weight
/// 0 still meets every value of the tile inside the mma (0 * Inf = NaN), and only the diagonal tile holds keys
/// that some rows of the block see and others do not (every key of an earlier tile is seen by every row). So the
/// diagonal tile's V is staged with each non-finite value replaced by 0, and per column the first key holding one
/// is noted (shared atomic mins); a row that sees that key gets NaN in that column of o: a non-finite v[j, d]
/// reaches exactly column d of the rows that see key j, as in the plain product (which gives Inf or NaN there);
/// in the other tiles every row sees every key, and the mma propagates it as the product would.
/// </para>
/// </summary>
internal static partial class TensorCoreForwardKernel
{
    /// <summary>Threads per group: 4 warps of 32 (the kernel needs 32-thread warps).</summary>
    public const int GroupSize = 128;
    /// <summary>Query rows per group: 16 per warp.</summary>
    public const int BlockRows = 64;
    /// <summary>Keys per tile (two 32-key snapshot tiles).</summary>
    public const int KeyTile = 64;
    /// <summary>Heads whose row blocks are launched together (see the kernel's first lines).</summary>
    private const int HeadChunk = 4;
    /// <summary>The largest head dimension; <see cref="Supports"/> says which are served.</summary>
    public const int MaxHeadDim = 128;

    /// <summary>Row stride of the K tile in 16-bit values (320 bytes: conflict-free 16-byte fragment loads).</summary>
    private const int RowStride = 160;
    private const int RowStrideU4 = RowStride / 8;
    /// <summary>Row stride of the transposed V tile [d][key] in 16-bit values (144 bytes: conflict-free fragment loads).</summary>
    private const int VtStride = 72;
    private const int VtStrideU4 = VtStride / 8;

    /// <summary>16-byte vectors per warp of the Q fragments: 8 k-steps (D = 128) of 32 lanes.</summary>
    private const int QWarpVectors = 8 * 32;

    private const int QOffset = 0;                                             // in 32-bit words
    private const int KOffset = QOffset + (GroupSize / 32) * QWarpVectors * 4;
    private const int VtOffset = KOffset + KeyTile * RowStride / 2;
    /// <summary>Words of one K and V^T buffer pair; tile i uses the pair at (i % 2) BufferWords (double buffering).</summary>
    private const int BufferWords = KeyTile * RowStride / 2 + MaxHeadDim * VtStride / 2;
    /// <summary>
    /// The word holding the diagonal tile's first key (relative) with a non-finite V value (<see cref="KeyTile"/> when
    /// none): after the one or two K / V^T buffer pairs.
    /// </summary>
    private static int FlagOffset(bool doubleBuffered) => KOffset + (doubleBuffered ? 2 : 1) * BufferWords;

    /// <summary>Per column d, the diagonal tile's first key (relative) whose v[key, d] is non-finite; <see cref="KeyTile"/> when none.</summary>
    private static int BadKeyOffset(bool doubleBuffered) => FlagOffset(doubleBuffered) + 4;

    /// <summary>Words of a V tile in the wgmma plan's core-matrix layout (64 keys x <see cref="MaxHeadDim"/> 16-bit values).</summary>
    private const int CoreValueWords = KeyTile * MaxHeadDim / 2;

    /// <summary>
    /// The wgmma plan's V buffer of tile <paramref name="tile"/> (words): V^T's place in the buffer pair for even tiles,
    /// a second buffer after the flags for odd ones, so that the next tile's V is copied while this tile's P V reads its own.
    /// </summary>
    private static int CoreValueOffset(int tile) => (tile & 1) == 0 ? VtOffset : BadKeyOffset(false) + MaxHeadDim;

    /// <summary>Words of a Q block of 64 rows in the core-matrix layout (<see cref="MaxHeadDim"/> 16-bit values a row).</summary>
    private const int QueryCoreWords = BlockRows * MaxHeadDim / 2;

    /// <summary>
    /// The wgmma plans' Q block of warpgroup <paramref name="wg"/> (words): the first at <see cref="QOffset"/>, the others
    /// after the second V buffer.
    /// </summary>
    private static int QueryOffset(int wg) => wg == 0 ? QOffset : BadKeyOffset(false) + MaxHeadDim + CoreValueWords + (wg - 1) * QueryCoreWords;

    private static int SharedUints<TPlan>() where TPlan : struct, IForwardPlan
    {
        var plan = default(TPlan);
        return BadKeyOffset(plan.DoubleBuffered) + MaxHeadDim
            + (plan.Wgmma ? CoreValueWords + (plan.WarpGroups - 1) * QueryCoreWords : 0);
    }

    /// <summary>
    /// Dynamic shared memory per group on CUDA, in bytes: 92 KB double buffered (two groups per SM fit), 55 KB with one
    /// buffer pair (three fit), 71 KB for the wgmma plan (one pair and a second V buffer; three fit); all above the
    /// default 48 KB, so the loader raises the limit.
    /// </summary>
    public static int SharedBytes<TPlan>() where TPlan : struct, IForwardPlan => 4 * SharedUints<TPlan>();

    /// <summary>Dynamic shared memory per group where the mma is emulated (CPU accelerator): adds the emulation's scratch.</summary>
    public static int EmulatedSharedBytes<TPlan>() where TPlan : struct, IForwardPlan =>
        SharedBytes<TPlan>() + 4 * (default(TPlan).WarpGroups * GroupSize / 32) * Mma.ScratchUintsPerWarp;

    /// <summary>Whether the kernel serves this head dimension (others fall back to the portable kernels).</summary>
    public static bool Supports(int headDim) => headDim == 64 || headDim == 128;

    public static void Kernel<TStorage, TWeights, TPlan>(TensorCoreForwardArgs a)
        where TStorage : struct, IStorage
        where TWeights : struct, IWeights
        where TPlan : struct, IForwardPlan
    {
        bool split = default(TWeights).Split;
        bool doubleBuffered = default(TPlan).DoubleBuffered;
        bool prefetch = default(TPlan).Prefetch;
        bool wgmma = default(TPlan).Wgmma;
        int W = default(TPlan).WarpGroups;
        int flag = FlagOffset(doubleBuffered);
        int tid = Group.IdxX;
        // Warpgroup wg of the group (W of them: WgmmaTwoWarpgroupsPlan) takes rows 64 wg .. 64 wg + 63 of the block; warp
        // and lt are within it. With one warpgroup these fold to constants and tid (without the folding ptxas 12.4 gave
        // the one-warpgroup plan 150 more IMAD and a 4-byte spill at 168 registers).
        int wg = W == 1 ? 0 : tid >> 7, lt = W == 1 ? tid : tid & 127;
        int warp = W == 1 ? tid >> 5 : (tid >> 5) & 3, lane = tid & 31, g = lane >> 2, t = lane & 3;
        // Groups in launch order (x fastest) take (head, row block) in chunks of HeadChunk heads, heaviest row block first
        // within a chunk: the groups that run at the same time read a few heads' K and V, which stay in L2.
        int linear = Grid.IdxY * Grid.DimX + Grid.IdxX;
        int chunkStart = linear / (HeadChunk * a.RowBlocks) * HeadChunk;
        int chunkHeads = Math.Min(HeadChunk, Grid.DimX - chunkStart);
        int within = linear - chunkStart * a.RowBlocks;
        int head = chunkStart + within % chunkHeads;
        int rowBlock = a.RowBlocks - 1 - within / chunkHeads;
        int T = a.Length, D = a.HeadDim;
        bool wide = D > 64;
        int row0 = rowBlock * BlockRows * W;
        int rowWg0 = row0 + BlockRows * wg;              // this warpgroup's first row
        // This query head's q, and the key/value head it reads as views at row 0 (grouped-query heads share one), rows
        // Rows.X.Token elements apart (docs/math.md, "Layouts and grouped heads"), addressed by 32-bit offsets in 16-byte
        // pieces from there.
        var rows = a.Rows;
        long kBase = rows.KeyBaseOfQuery(rows.K, head), vBase = rows.KeyBaseOfQuery(rows.V, head);
        var kHead = a.K.Cast<U4>().SubView(kBase >> 3);
        var vHead = a.V.Cast<U4>().SubView(vBase >> 3);
        int kToken = rows.K.TokenPieces, vToken = rows.V.TokenPieces;
        var shared = SharedMemory.GetDynamic<uint>();
        var vectors = shared.Cast<U4>();
        int emu = SharedUints<TPlan>() + (tid >> 5) * Mma.ScratchUintsPerWarp;   // used only where the mma is emulated
        uint windowBase = wgmma ? SharedWindowBase() : 0u;                     // the wgmma descriptors' base
        if (wgmma)
            DeclareWgmmaRegisters();
        // The device addresses of the K / V heads' row 0 (CUDA: the wgmma plan copies tiles by cp.async from them).
        long kAddress = a.KeyAddress + 2 * kBase;
        long vAddress = a.ValueAddress + 2 * vBase;

        // Keys at or past stageLimit are seen by no row of this block (nor exist past T): staged as zeros.
        int stageLimit = Math.Min(T, row0 + BlockRows * W) - 1 + a.AttendCurrent;
        int rowLo = rowWg0 + 16 * warp + g, rowHi = rowLo + 8;
        if (wgmma)
        {
            var qHead = a.Q.Cast<U4>().SubView(rows.QueryBase(rows.Q, head) >> 3);
            StoreCore(LoadCore(qHead, rows.Q.TokenPieces, rowWg0, T, D, lt, QueryRows), vectors, QueryOffset(wg) / 4, D, lt);
        }
        else
        {
            StageQueryFragments(a.Q, vectors.SubView(QOffset / 4 + warp * QWarpVectors + lane), rows.QueryBase(rows.Q, head),
                rows.Q.Token, rowLo, T, D, t);
        }
        // The block's first non-finite V value, relative to row0 (BlockRows W when none), and per column the same.
        if (tid == 0)
            shared[flag] = (uint)(BlockRows * W);  // ordered before the staging atomics by the barrier below
        if (tid < MaxHeadDim)
            shared[BadKeyOffset(doubleBuffered) + tid] = (uint)(BlockRows * W);
        uint exponentMask = default(TStorage).IsBFloat16 ? 0x7F80_7F80u : 0x7C00_7C00u;

        // Row i sees keys j < i (j <= i when attending to the current token); a row past T sees none.
        int limitLo = rowLo < T ? rowLo + a.AttendCurrent : 0;
        int limitHi = rowHi < T ? rowHi + a.AttendCurrent : 0;
        float accLo = 0f, accHi = 0f;                    // acc in base 2 (log2 of what the stick has left)
        float scale2 = a.Scale * Log2E;
        var o = new Tile16();

        // Fragment views ("sub-view + constant index"): Q rows g and g+8 of the warp, K key 16 (g / 2) + g % 2,
        // V^T row d = g, this thread's keys 16t ...
        int qAt = QOffset / 4 + warp * QWarpVectors + lane;
        int kAt = KOffset / 4 + (16 * (g >> 1) + (g & 1)) * RowStrideU4 + t;
        int vAt = VtOffset / 4 + g * VtStrideU4 + 2 * t;

        int lastKey = Math.Min(T - 1, row0 + BlockRows * W - 1);
        int tile = lastKey / KeyTile;
        // With several warpgroups the first warpgroup stages the tiles (lt = tid there).
        var kPieces = wgmma ? LoadCore(kHead, kToken, tile * KeyTile, stageLimit, D, lt, KeyRows)
            : LoadTileRows(kHead, kToken, tile * KeyTile, stageLimit, D, tid, GroupSize);
        var vPieces = wgmma ? LoadCore(vHead, vToken, tile * KeyTile, stageLimit, D, lt, ValueSlots)
            : LoadKeyPairs(vHead, vToken, tile * KeyTile, stageLimit, D, tid);
        Group.Barrier();
        // Double buffering: tile i lives in K / V^T buffer pair i % 2, so the next tile is stored while no warp
        // reads that pair any more, and one barrier per tile suffices: a warp stores into pair (i - 1) % 2 only
        // after the barrier that ended tile i + 1, the last reader of that pair. With one buffer pair, a barrier
        // ends the tile's reads before the next tile is stored, and another ends the stores.
        int buffer = doubleBuffered ? (tile & 1) * BufferWords : 0;
        if (wgmma)
        {
            if (wg == 0)
            {
                StoreCore(kPieces, vectors, KOffset / 4, D, lt);
                SanitizeCoreValues(ref vPieces, shared, D, lt, exponentMask, flag, tile * KeyTile - row0);
                StoreCore(vPieces, vectors, CoreValueOffset(tile) / 4, D, lt);
            }
            AsyncProxyFence();
        }
        else
        {
            StoreTileRows(kPieces, vectors, (KOffset + buffer) / 4, D, tid, GroupSize, RowStrideU4);
            StoreTransposed(ref vPieces, shared, VtOffset + buffer, D, tid, true, exponentMask, flag);
        }
        Group.Barrier();
        for (; tile >= 0; tile--)
        {
            int key0 = tile * KeyTile;
            buffer = doubleBuffered ? (tile & 1) * BufferWords : 0;
            bool diagonal = key0 == rowWg0;              // this warpgroup's first tile
            // A warpgroup works on the tiles from its diagonal one down (with one warpgroup, every tile walked).
            bool active = W == 1 || key0 <= rowWg0;
            // The next tile is one of the block's top tiles (several warpgroups): staged through registers, sanitized.
            bool nextTop = W > 1 && key0 - KeyTile >= row0;

            var s = new Tile8();
            if (wgmma)
            {
                // The next tile's V into the other V buffer (its last reader, the P V two tiles back, ended before the
                // previous tile's last barrier); S; then, once every warp's S is done, the next tile's K into the K
                // buffer. Both copies run during this tile's elementwise work and P V (cp.async on CUDA). The block's
                // top tiles after the first (several warpgroups) hold keys that some of its rows do not see: loaded
                // through registers and sanitized as the first, after this tile's P V. (Eleventh session: a second K
                // buffer, so that K is copied with V before S and the barrier after S goes, measured slower with two
                // warpgroups: 4.196 against 4.062 ms at T = 8192.)
                bool copyNext = tile > 0 && !nextTop && wg == 0;
                if (copyNext)
                    StageCore(vHead, vAddress, vToken, key0 - KeyTile, D, lt, ValueSlots, CoreValueOffset(tile - 1), vectors);
                if (active)
                {
                    IssueScores<TStorage>(ref s, windowBase, 4 * QueryOffset(wg), 4 * KOffset, D, shared, emu);
                    TakeScores(ref s);
                }
                if (tile > 0)
                {
                    Group.Barrier();
                    if (copyNext)
                    {
                        StageCore(kHead, kAddress, kToken, key0 - KeyTile, D, lt, KeyRows, KOffset, vectors);
                        CommitCopies();
                    }
                }
            }
            else
                AllScores<TStorage>(ref s, vectors.SubView(qAt), vectors.SubView(kAt + buffer / 4), wide, shared, emu);

            int firstKey = key0 + 16 * t;
            float accLoBefore = accLo, accHiBefore = accHi, nearerLo = 0f, nearerHi = 0f;
            if (active)
            {
                if (diagonal)
                    Rows(ref s, scale2, limitLo - firstKey, limitHi - firstKey, ref accLo, ref accHi, lane, t, out nearerLo, out nearerHi);
                else
                    RowsUnmasked(ref s, scale2, ref accLo, ref accHi, lane, t, out nearerLo, out nearerHi);
            }
            var p = PackWeights<TStorage>(s, split, out var residuals);
            // Register prefetch: the next tile's K and V pieces are loaded from global memory while this tile's
            // P V runs (they are dead through S and the elementwise work, where registers are scarcest), then
            // stored into the other buffer pair (or, with one pair, into the same after a barrier). Past the last
            // tile (tile 0) nothing is loaded or stored.
            int nextLimit = tile > 0 ? stageLimit : int.MinValue;
            if (prefetch)
            {
                kPieces = LoadTileRows(kHead, kToken, key0 - KeyTile, nextLimit, D, tid, GroupSize);
                vPieces = LoadKeyPairs(vHead, vToken, key0 - KeyTile, nextLimit, D, tid);
            }
            if (wgmma)
            {
                if (active)
                    WgmmaOutput<TStorage>(ref o, p, split, residuals, windowBase, 4 * CoreValueOffset(tile), wide, shared, emu);
            }
            else
                AccumulateOutput<TStorage>(ref o, p, split, residuals, vectors.SubView(vAt + buffer / 4), wide, shared, emu);
            if (active)
            {
                Snapshot(a, head, rowLo, tile, t, accLoBefore, nearerLo);
                Snapshot(a, head, rowHi, tile, t, accHiBefore, nearerHi);
            }
            if (tile > 0 && wgmma)
            {
                if (nextTop && wg == 0)
                {
                    StagePieces(kHead, kToken, key0 - KeyTile, stageLimit, D, lt, KeyRows, KOffset, vectors, shared, 0u, flag, 0);
                    StagePieces(vHead, vToken, key0 - KeyTile, stageLimit, D, lt, ValueSlots, CoreValueOffset(tile - 1), vectors,
                        shared, exponentMask, flag, key0 - KeyTile - row0);
                }
                // This thread's copies of the next tile are in; the fence orders them before the tensor cores' reads
                // and the barrier makes every thread's visible.
                WaitCopies();
                AsyncProxyFence();
                Group.Barrier();
            }
            else if (tile > 0)
            {
                int next = doubleBuffered ? BufferWords - buffer : 0;
                if (!doubleBuffered)
                    Group.Barrier();
                {
                    if (!prefetch)
                    {
                        kPieces = LoadTileRows(kHead, kToken, key0 - KeyTile, nextLimit, D, tid, GroupSize);
                        vPieces = LoadKeyPairs(vHead, vToken, key0 - KeyTile, nextLimit, D, tid);
                    }
                    StoreTileRows(kPieces, vectors, (KOffset + next) / 4, D, tid, GroupSize, RowStrideU4);
                    StoreTransposed(ref vPieces, shared, VtOffset + next, D, tid, false, exponentMask, flag);
                }
                Group.Barrier();
            }
        }

        if (wgmma)
            TakeOutput(ref o, wide);
        // A row that sees the block's first non-finite V value (a key of its sanitized top tiles) gets NaN in the columns
        // that hold one (StoreRow); the flags are relative to row0.
        int firstBad = row0 + (int)shared[flag];
        bool poisonedLo = firstBad < limitLo, poisonedHi = firstBad < limitHi;
        // o in 4-byte words (its start and strides are even numbers of elements).
        var words = a.O.Cast<uint>();
        long oBase = rows.QueryBase(rows.O, head);
        var badKey = shared.SubView(BadKeyOffset(doubleBuffered) + 2 * t);
        if (rowLo < T)
            StoreRow<TStorage>(o, false, poisonedLo, badKey, limitLo - row0, words.SubView(((oBase + rowLo * rows.O.Token) >> 1) + t), wide);
        if (rowHi < T)
            StoreRow<TStorage>(o, true, poisonedHi, badKey, limitHi - row0, words.SubView(((oBase + rowHi * rows.O.Token) >> 1) + t), wide);
        if (t == 0)
        {
            long stat = (long)head * T;
            if (rowLo < T)
            {
                float logRem = accLo * Ln2;
                a.LogRem[stat + rowLo] = logRem;
                a.Rem[stat + rowLo] = MathF.Exp(logRem);
            }
            if (rowHi < T)
            {
                float logRem = accHi * Ln2;
                a.LogRem[stat + rowHi] = logRem;
                a.Rem[stat + rowHi] = MathF.Exp(logRem);
            }
        }
    }

    /// <summary>
    /// Stages this thread's A fragments of Q (rows <paramref name="rowLo"/> and rowLo + 8, zeros past T) in the
    /// order the mma takes them, so that each k-step's fragment is one 16-byte shared load straight into the
    /// mma's operand registers: vector <c>32 ks</c> of <paramref name="to"/> (the warp's area at this lane) holds
    /// {a0, a1, a2, a3} of k-step ks. With the head dimension permuted as for K (k-steps 2m and 2m+1 take
    /// dimensions 32m + 8t .. +3 and +4 .. +7), one 16-byte global load per row and m gives both k-steps.
    /// Only this thread reads them back (no barrier needed beyond the loop's). Row i of the head starts at element
    /// <paramref name="headBase"/> + i <paramref name="token"/> (both multiples of 8).
    /// </summary>
    private static void StageQueryFragments(ArrayView<ushort> x, ArrayView<U4> to, long headBase, long token, int rowLo,
        int T, int D, int t)
    {
        bool wide = D > 64;
        bool loIn = rowLo < T, hiIn = rowLo + 8 < T;
        var source = x.Cast<U4>();
        var lo = source.SubView((headBase >> 3) + t + (loIn ? rowLo * (token >> 3) : 0));
        var hi = source.SubView((headBase >> 3) + t + (hiIn ? (rowLo + 8) * (token >> 3) : 0));
        U4 l0 = Piece(lo, 0, loIn), h0 = Piece(hi, 0, hiIn);
        U4 l1 = Piece(lo, 4, loIn), h1 = Piece(hi, 4, hiIn);
        U4 l2 = Piece(lo, 8, wide && loIn), h2 = Piece(hi, 8, wide && hiIn);
        U4 l3 = Piece(lo, 12, wide && loIn), h3 = Piece(hi, 12, wide && hiIn);
        to[0] = Fragment(l0.X0, h0.X0, l0.X1, h0.X1);
        to[32] = Fragment(l0.X2, h0.X2, l0.X3, h0.X3);
        to[64] = Fragment(l1.X0, h1.X0, l1.X1, h1.X1);
        to[96] = Fragment(l1.X2, h1.X2, l1.X3, h1.X3);
        if (wide)
        {
            to[128] = Fragment(l2.X0, h2.X0, l2.X1, h2.X1);
            to[160] = Fragment(l2.X2, h2.X2, l2.X3, h2.X3);
            to[192] = Fragment(l3.X0, h3.X0, l3.X1, h3.X1);
            to[224] = Fragment(l3.X2, h3.X2, l3.X3, h3.X3);
        }
    }

    /// <summary>
    /// Loads this thread's share of a V tile for <see cref="StoreTransposed"/>: the 32 lanes of a warp take the 32
    /// key pairs (2j, 2j+1), warp w the 16-byte pieces c = w + 4i of the head dimension (D / 32 of them), two
    /// pieces each (keys 2j and 2j+1: P0, P1 for c, P2, P3 for c + 4, ...). Keys at or past
    /// <paramref name="limit"/> are zeros. Key i of the head starts <paramref name="token"/> i 16-byte pieces into
    /// <paramref name="head"/>.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Pieces8 LoadKeyPairs(ArrayView<U4> head, int token, int key0, int limit, int D, int tid)
    {
        bool wide = D > 64;
        int j = tid & 31, c = tid >> 5;
        int key = key0 + 2 * j;
        bool lo = key < limit, hi = key + 1 < limit;
        // Rows 2j and 2j + 1 as sub-views (at row 0 where not loaded, so in bounds), the pieces at constant indices.
        var loRow = head.SubView(c + (lo ? key : 0) * token);
        var hiRow = head.SubView(c + (hi ? key + 1 : 0) * token);
        Pieces8 p;
        p.P0 = Piece(loRow, 0, lo);
        p.P1 = Piece(hiRow, 0, hi);
        p.P2 = Piece(loRow, 4, lo);
        p.P3 = Piece(hiRow, 4, hi);
        p.P4 = Piece(loRow, 8, wide && lo);
        p.P5 = Piece(hiRow, 8, wide && hi);
        p.P6 = Piece(loRow, 12, wide && lo);
        p.P7 = Piece(hiRow, 12, wide && hi);
        return p;
    }

    /// <summary>
    /// Stores the V pieces of <see cref="LoadKeyPairs"/> transposed, Vt[d][key] (row stride <see cref="VtStride"/>):
    /// 8 words per piece pair, each the pair (key 2j, key 2j+1) of one dimension; the 32 lanes' stores fall in 32
    /// different banks. In the <paramref name="diagonal"/> tile non-finite values become zeros and the first key
    /// holding one is noted at <paramref name="flag"/>.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void StoreTransposed(ref Pieces8 p, ArrayView<uint> shared, int vt, int D, int tid, bool diagonal,
        uint exponentMask, int flag)
    {
        bool wide = D > 64;
        int j = tid & 31, c = tid >> 5;
        if (diagonal)
        {
            var original = p;
            bool badLo = Sanitize(ref p.P0, exponentMask) | Sanitize(ref p.P2, exponentMask)
                | Sanitize(ref p.P4, exponentMask) | Sanitize(ref p.P6, exponentMask);
            bool badHi = Sanitize(ref p.P1, exponentMask) | Sanitize(ref p.P3, exponentMask)
                | Sanitize(ref p.P5, exponentMask) | Sanitize(ref p.P7, exponentMask);
            if (badLo || badHi)
            {
                Atomic.Min(ref shared[flag], (uint)(badLo ? 2 * j : 2 * j + 1));
                NoteBadColumns(shared, flag + 4, original, 2 * j, c, wide, exponentMask);
            }
        }
        PutTransposed(shared, vt, c, j, p.P0, p.P1);
        PutTransposed(shared, vt, c + 4, j, p.P2, p.P3);
        if (wide)
        {
            PutTransposed(shared, vt, c + 8, j, p.P4, p.P5);
            PutTransposed(shared, vt, c + 12, j, p.P6, p.P7);
        }
    }

    /// <summary>
    /// For each column of the diagonal tile's key pair (2j, 2j+1) holding a non-finite value (looked up in the pieces
    /// before <see cref="Sanitize"/> zeroed them: the caller passes the originals), the per-column first bad key at
    /// <paramref name="badKeys"/> (<see cref="BadKeyOffset"/>) is lowered to that key (a shared atomic min). The rare path: only when a piece held one.
    /// </summary>
    private static void NoteBadColumns(ArrayView<uint> shared, int badKeys, in Pieces8 original, int key, int c, bool wide, uint exponentMask)
    {
        NotePiece(shared, badKeys, original.P0, key, c, exponentMask);
        NotePiece(shared, badKeys, original.P1, key + 1, c, exponentMask);
        NotePiece(shared, badKeys, original.P2, key, c + 4, exponentMask);
        NotePiece(shared, badKeys, original.P3, key + 1, c + 4, exponentMask);
        if (wide)
        {
            NotePiece(shared, badKeys, original.P4, key, c + 8, exponentMask);
            NotePiece(shared, badKeys, original.P5, key + 1, c + 8, exponentMask);
            NotePiece(shared, badKeys, original.P6, key, c + 12, exponentMask);
            NotePiece(shared, badKeys, original.P7, key + 1, c + 12, exponentMask);
        }
    }

    /// <summary>Notes <paramref name="key"/> for each of columns 8c .. 8c+7 whose value in <paramref name="piece"/> is non-finite.</summary>
    private static void NotePiece(ArrayView<uint> shared, int badKeys, U4 piece, int key, int c, uint exponentMask)
    {
        uint bad0 = NonFinite(piece.X0, exponentMask), bad1 = NonFinite(piece.X1, exponentMask);
        uint bad2 = NonFinite(piece.X2, exponentMask), bad3 = NonFinite(piece.X3, exponentMask);
        if ((bad0 | bad1 | bad2 | bad3) == 0)
            return;
        int at = badKeys + 8 * c;
        NoteHalves(shared, at, bad0, key);
        NoteHalves(shared, at + 2, bad1, key);
        NoteHalves(shared, at + 4, bad2, key);
        NoteHalves(shared, at + 6, bad3, key);
    }

    private static void NoteHalves(ArrayView<uint> shared, int at, uint bad, int key)
    {
        if ((bad & 0xFFFFu) != 0)
            Atomic.Min(ref shared[at], (uint)key);
        if ((bad & 0xFFFF_0000u) != 0)
            Atomic.Min(ref shared[at + 1], (uint)key);
    }

    /// <summary>
    /// <paramref name="word"/> (columns <paramref name="column"/> + 2t and + 1 of a row) with each half whose column's
    /// first bad diagonal key (<paramref name="badKey"/>) the row sees (below <paramref name="visible"/>) replaced by NaN.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static uint PoisonColumns(uint word, ArrayView<uint> badKey, int column, int visible, uint nan)
    {
        uint mask = ((int)badKey[column] < visible ? 0xFFFFu : 0u) | ((int)badKey[column + 1] < visible ? 0xFFFF_0000u : 0u);
        return (word & ~mask) | (nan & mask);
    }

    /// <summary>Writes dimensions 8c .. 8c+7 of keys 2j (<paramref name="lo"/>) and 2j+1 (<paramref name="hi"/>) into Vt, one word per dimension.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void PutTransposed(ArrayView<uint> shared, int vt, int c, int j, U4 lo, U4 hi)
    {
        int at = vt + 8 * c * (VtStride / 2) + j;
        shared[at] = (lo.X0 & 0xFFFFu) | (hi.X0 << 16);
        shared[at + VtStride / 2] = (lo.X0 >> 16) | (hi.X0 & 0xFFFF0000u);
        shared[at + 2 * (VtStride / 2)] = (lo.X1 & 0xFFFFu) | (hi.X1 << 16);
        shared[at + 3 * (VtStride / 2)] = (lo.X1 >> 16) | (hi.X1 & 0xFFFF0000u);
        shared[at + 4 * (VtStride / 2)] = (lo.X2 & 0xFFFFu) | (hi.X2 << 16);
        shared[at + 5 * (VtStride / 2)] = (lo.X2 >> 16) | (hi.X2 & 0xFFFF0000u);
        shared[at + 6 * (VtStride / 2)] = (lo.X3 & 0xFFFFu) | (hi.X3 << 16);
        shared[at + 7 * (VtStride / 2)] = (lo.X3 >> 16) | (hi.X3 & 0xFFFF0000u);
    }

    /// <summary>
    /// The acc snapshots of the two 32-key tiles of this 64-key tile (<see cref="Snapshots"/>): before the lower one
    /// (keys 32 .. 63 of the tile nearer: thread t = 1's nearer sum), and before the upper one (the row's acc);
    /// the kernel sums in base 2, the snapshots are natural logs like the fp32 forwards'.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void Snapshot(in TensorCoreForwardArgs a, int head, int row, int tile, int t, float rowAcc, float nearer)
    {
        if (a.WriteSnapshots == 0 || row >= a.Length)
            return;
        int half = 2 * tile;
        if (t == 1)
            a.AccSnapshots[Snapshots.Index(head, row, half, a.Length, a.SnapshotTiles)] = (rowAcc + nearer) * Ln2;
        if (t == 3 && half + 1 < a.SnapshotTiles)
            a.AccSnapshots[Snapshots.Index(head, row, half + 1, a.Length, a.SnapshotTiles)] = rowAcc * Ln2;
    }

}

/// <summary>
/// How the tensor-core forward feeds its fp32 weights P to the 16-bit P V product (a type argument of the kernel,
/// so that the choice folds away at compile time).
/// </summary>
internal interface IWeights
{
    /// <summary>
    /// False: P rounded to the storage type, one mma per k-step (relative error 2^-9 per weight in bf16, 2^-12
    /// in fp16, which in bf16 puts o at up to about 2x the error of rounding the exact o). True: P = high + low,
    /// both 16-bit, two mma per k-step on the same V fragments (P V exact to about 2^-17: o at the rounding floor).
    /// </summary>
    bool Split { get; }
}

/// <summary>P rounded to 16 bits: 64 mma per 64-key tile for P V (D = 128).</summary>
internal readonly struct RoundedWeights : IWeights
{
    public bool Split => false;
}

/// <summary>P split into two 16-bit parts: 128 mma per 64-key tile for P V (D = 128).</summary>
internal readonly struct SplitWeights : IWeights
{
    public bool Split => true;
}

/// <summary>
/// How the tensor-core forward stages K and V and how many groups share an SM (a type argument of the kernel, so that
/// the choice folds away at compile time): registers and shared memory decide the groups per SM, and the groups per
/// SM how well one group's waits (barriers, global loads, the exp / rcp pipe) hide behind the others' work.
/// </summary>
internal interface IForwardPlan
{
    /// <summary>Two K / V^T buffer pairs (one barrier per tile, 92 KB) rather than one (two barriers, 54 KB).</summary>
    bool DoubleBuffered { get; }

    /// <summary>The next tile's K and V are loaded into registers during this tile's P V (else after its last read).</summary>
    bool Prefetch { get; }

    /// <summary>Launch bound: groups of 128 threads per SM the compiler must allow registers for (2: 255, 3: 168).</summary>
    int MinGroupsPerMultiprocessor { get; }

    /// <summary>
    /// Hopper's wgmma for both products, Q, K and V in the core-matrix layouts (TensorCoreForwardKernel.Wgmma.cs); the
    /// PTX is retargeted to sm_90a, so the plan runs on SM 9.0 devices only (and emulated on the CPU accelerator).
    /// </summary>
    bool Wgmma { get; }

    /// <summary>
    /// Warpgroups a group (1, or with <see cref="Wgmma"/> 2): each takes 64 query rows of the block, and all share
    /// the block's K / V tiles, so that a tile staged once serves 64 W rows.
    /// </summary>
    int WarpGroups { get; }
}

/// <summary>
/// Hopper: S and P V on wgmma from shared memory, one K buffer and two V buffers filled by cp.async during the tile
/// before, three groups per SM (168 registers, 71 KB).
/// </summary>
internal readonly struct WgmmaPlan : IForwardPlan
{
    public bool DoubleBuffered => false;
    public bool Prefetch => false;
    public int MinGroupsPerMultiprocessor => 3;
    public bool Wgmma => true;
    public int WarpGroups => 1;
}

/// <summary>
/// Hopper, two warpgroups a group sharing each K / V tile (128 query rows, 256 threads, one group per SM, up to 255
/// registers, 87 KB): half the staging per score, 8 warps per SM.
/// </summary>
internal readonly struct WgmmaTwoWarpgroupsPlan : IForwardPlan
{
    public bool DoubleBuffered => false;
    public bool Prefetch => false;
    public int MinGroupsPerMultiprocessor => 1;
    public bool Wgmma => true;
    public int WarpGroups => 2;
}

/// <summary>Two groups per SM, double buffered, register prefetch (255 registers, 92 KB).</summary>
internal readonly struct TwoGroupsPerSm : IForwardPlan
{
    public bool DoubleBuffered => true;
    public bool Prefetch => true;
    public int MinGroupsPerMultiprocessor => 2;
    public bool Wgmma => false;
    public int WarpGroups => 1;
}

/// <summary>Three groups per SM: one buffer pair, register prefetch (168 registers, 54 KB).</summary>
internal readonly struct ThreeGroupsPerSm : IForwardPlan
{
    public bool DoubleBuffered => false;
    public bool Prefetch => true;
    public int MinGroupsPerMultiprocessor => 3;
    public bool Wgmma => false;
    public int WarpGroups => 1;
}

/// <summary>Three groups per SM: one buffer pair, the next tile loaded after this tile's last read (168 registers, 54 KB).</summary>
internal readonly struct ThreeGroupsPerSmNoPrefetch : IForwardPlan
{
    public bool DoubleBuffered => false;
    public bool Prefetch => false;
    public int MinGroupsPerMultiprocessor => 3;
    public bool Wgmma => false;
    public int WarpGroups => 1;
}

/// <summary>Eight 16-byte pieces of a K or V tile, loaded one tile ahead (register prefetch).</summary>
internal struct Pieces8
{
    public U4 P0, P1, P2, P3, P4, P5, P6, P7;
}

/// <summary>The score tile of one warp: 8 n-tiles of 8 keys (16 rows x 64 keys).</summary>
internal struct Tile8
{
    public Acc4 N0, N1, N2, N3, N4, N5, N6, N7;
}

/// <summary>The output tile of one warp: 16 n-tiles of 8 columns (16 rows x 128 columns).</summary>
internal struct Tile16
{
    public Acc4 N0, N1, N2, N3, N4, N5, N6, N7, N8, N9, N10, N11, N12, N13, N14, N15;
}

/// <summary>The weights of one warp's 16 rows x 64 keys as the A fragments of the four k-steps of P V.</summary>
internal struct Frag16
{
    public uint K0A0, K0A1, K0A2, K0A3, K1A0, K1A1, K1A2, K1A3, K2A0, K2A1, K2A2, K2A3, K3A0, K3A1, K3A2, K3A3;
}
