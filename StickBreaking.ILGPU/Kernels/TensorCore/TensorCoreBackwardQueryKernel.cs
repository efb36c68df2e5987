using System;
using System.Runtime.CompilerServices;
using ILGPU;
using ILGPU.Runtime;
using ILGPU.Runtime.Cuda;
using StickBreaking.ILGPU.Kernels.Common;
using static StickBreaking.ILGPU.Kernels.TensorCore.TensorCoreOps;

namespace StickBreaking.ILGPU.Kernels.TensorCore;

/// <summary>
/// Backward pass 1 on tensor cores (docs/math.md, "Backward" and "Snapshots") for 16-bit storage (fp16 or bf16, the
/// <c>TStorage</c> type argument), head dimensions 64 and 128: per query row, walking the key tiles from key 0 to
/// the diagonal, S = Q K^T and dOV = dO V^T on <c>mma.sync.m16n8k16</c> (fp32 accumulation), the weights A, a, the
/// prefix P and dz in fp32 on the accumulator registers, dq += dz K on the mma again, and P per (row, 32-key tile)
/// into the prefix snapshots for pass 2. Three GEMMs per tile (S, dOV, dq).
/// <para>
/// One group of <see cref="GroupSize"/> threads (4 warps) per (head, block of <see cref="BlockRows"/> query rows);
/// warp w owns rows 16w .. 16w+15 (lane 4g + t: rows g and g+8), and keeps dq of its rows in registers (64 fp32
/// per thread at D = 128). Q and dO sit in shared memory as each thread's A fragments in mma operand order (one
/// 16-byte load per k-step), the key tile three times: K and V row-major (the B operands of S and dOV) and K
/// transposed ([d][key], the B operand of dq += dz K). The key permutation of the forward
/// (<see cref="TensorCoreForwardKernel"/>): mma column n of score n-tile nt stands for key 16 (n / 2) + 2 nt + n % 2,
/// so that each thread holds 16 CONSECUTIVE keys 16t .. 16t+15 of its two rows, and the accumulators of n-tiles 2ks
/// and 2ks+1, converted to 16 bits, are the A fragment of k-step ks of dz K. The head dimension is permuted the same
/// way for Q and K, and for dO and V.
/// </para>
/// <para>
/// Rows come from <see cref="BackwardArgs{T}.Rows"/> (docs/math.md, "Layouts and grouped heads"): grid X is the query
/// head; q, dO and dq at its rows, k and v at those of the key/value head it reads
/// (<see cref="AttentionRows.KeyBaseOfQuery"/>), any strides with D contiguous (16-byte aligned q, k, v, dO rows, 4-byte
/// aligned dq rows, as the host checks); LogRem, dRem and the snapshots stay contiguous per query head.
/// </para>
/// <para>
/// The elementwise work is lean (SASS of the unmasked row code: about 17 instructions per score, 2 of them MUFU):
/// e = 2^-z2 (z2 = z log2 e, clamped at -126 by a select that keeps a NaN), beta = 1 / (1 + e) and
/// 1 - beta = e beta (sigmoid(-z) directly, never 1 - beta; a few ulp at any z, no cancellation), and the weights come
/// from a running PRODUCT of 1 - beta from the nearest key of the thread's 32-key snapshot tile down, started at 2^acc
/// of that tile's snapshot: no softplus, no logarithm, no exp per weight (the forward needs log2(1 - beta) for its
/// sums; here acc is read). A product of at most 31 factors of fp32 relative error about 1e-7 each is as exact as the
/// sum of their logarithms; a weight that underflows is below 2^-126 (a used-up stick), as it is in the forward.
/// The 32-key halves of a 64-key tile use their own snapshot (threads t = 0, 1 the lower, t = 2, 3 the upper half);
/// a thread's scale W' = 2^acc(half) times the product of the nearer thread of its half (t + 1, for even t: one
/// shuffle). A snapshot is read only where the row sees a key of that half (unwritten ones may hold anything).
/// P of a key = P before the tile (a register carried per row, the same bits in the quad) + the sums of a of the
/// farther threads (a two-shuffle quad scan) + the thread's own farther keys. Everything the thread sums is linear in
/// W', so one pass (nearest key first) computes a~ = beta W (dO.v), its suffix S~ and d~ = (1 - beta) a~ + beta S~
/// with W' = 1, and after the shuffles dz = W' d~ - beta (Pend + dRem rem), Pend = P after the thread's keys (P of a
/// key = Pend - S): 32 live values per row instead of 48, one pass instead of three.
/// </para>
/// <para>
/// Masks select, never multiply by zero. Only the diagonal tile (the last one walked) holds keys some rows see and
/// others do not; it runs the masked row code, every other tile the unmasked one. Rows and keys past T, and keys no
/// row of the block sees, are staged as zeros. A non-finite q, dO or v reaches only its own row or key column of S or
/// dOV, which the selection removes where the row does not see the key. In dq += dz K, dz = 0 still meets every k of
/// the tile (0 * Inf = NaN): so the diagonal tile's transposed K is staged with non-finite values replaced by 0, the
/// first key holding one noted (a shared atomic min), and a row that sees that key gets NaN for all of dq, as the
/// forward does with V.
/// </para>
/// <para>
/// Shared memory: 16 KB each of Q and dO fragments, 20 KB each of K and V (row stride 320 bytes: conflict-free 16-byte
/// fragment loads), 18 KB of K^T (row stride 144 bytes): 90 KB, so two groups fit on an SM (their register budget of
/// 255 per thread holds dq, S and dOV). One buffer and two barriers per tile: the tile's K and V rows are in (copied
/// during the previous tile's dq product), barrier, K^T is built from the K rows in shared memory (no second global
/// load of K; lane-rotated pieces, conflict-free both ways), S, dOV and the elementwise work, barrier (every warp is
/// past S and dOV, the last readers of the K and V rows), the next tile's K and V rows copied by <c>cp.async</c>
/// (no registers; on CUDA from the device addresses the launch layer sets, <see cref="BackwardArgs{T}.WithGrid"/>)
/// while dq += dz K runs. A register prefetch there made ptxas spill (64 more registers on top of dq and the dz
/// fragments); loading after the barrier and waiting cost 12 % of the pass.
/// </para>
/// <para>
/// Measured (H200, B=4 H=12 T=4096 D=128): 1.51-1.56 ms bf16 and fp16 with rounded dz (the register loads before
/// cp.async: 1.75), 5.77-5.88 ms at T = 8192; D = 64, H = 16: 1.42-1.45 ms. dq is at 1.3x to 1.6x the rounding
/// floor with rounded dz, 1.00x with split dz.
/// </para>
/// </summary>
internal static partial class TensorCoreBackwardQueryKernel
{
    /// <summary>Threads per group: 4 warps of 32 (the kernel needs 32-thread warps).</summary>
    public const int GroupSize = 128;
    /// <summary>Query rows per group: 16 per warp.</summary>
    public const int BlockRows = 64;
    /// <summary>Keys per tile (two 32-key snapshot tiles).</summary>
    public const int KeyTile = 64;
    /// <summary>The largest head dimension; <see cref="Supports"/> says which are served.</summary>
    public const int MaxHeadDim = 128;
    /// <summary>Launch bound: groups per SM the compiler must allow registers for (2 x 128 threads: up to 255 registers).</summary>
    public const int MinGroupsPerMultiprocessor = 2;

    /// <summary>Row stride of the row-major K and V tiles in 16-bit values (320 bytes: conflict-free 16-byte fragment loads).</summary>
    private const int RowStride = 160;
    private const int RowStrideU4 = RowStride / 8;
    /// <summary>Row stride of the transposed K tile [d][key] in 16-bit values (144 bytes: conflict-free fragment loads).</summary>
    private const int KtStride = 72;
    private const int KtStrideU4 = KtStride / 8;

    /// <summary>16-byte vectors per warp of the Q (or dO) fragments: 8 k-steps (D = 128) of 32 lanes.</summary>
    private const int WarpVectors = 8 * 32;

    private const int QOffset = 0;                                             // in 32-bit words
    private const int DOOffset = QOffset + (GroupSize / 32) * WarpVectors * 4;
    private const int KOffset = DOOffset + (GroupSize / 32) * WarpVectors * 4;
    private const int VOffset = KOffset + KeyTile * RowStride / 2;
    private const int KtOffset = VOffset + KeyTile * RowStride / 2;
    /// <summary>The diagonal tile's first key (relative) with a non-finite k; <see cref="KeyTile"/> when none.</summary>
    private const int FlagOffset = KtOffset + MaxHeadDim * KtStride / 2;
    private const int SharedUints = FlagOffset + 4;

    /// <summary>Dynamic shared memory per group on CUDA, in bytes (90 KB: the loader raises the 48 KB default; two groups per SM fit).</summary>
    public const int SharedBytes = 4 * SharedUints;
    /// <summary>Dynamic shared memory per group where the mma is emulated (CPU accelerator): adds the emulation's scratch.</summary>
    public const int EmulatedSharedBytes = SharedBytes + 4 * (GroupSize / 32) * Mma.ScratchUintsPerWarp;

    /// <summary>Whether the kernel serves this head dimension.</summary>
    public static bool Supports(int headDim) => headDim == 64 || headDim == 128;

    /// <summary>
    /// The kernel: grid (B * H, <see cref="BackwardArgs{T}.RowBlocks"/>), heaviest row block first.
    /// <typeparamref name="TWeights"/> says how dz enters the dq product: rounded to 16 bits, or split into two
    /// 16-bit parts (two mma per k-step).
    /// </summary>
    public static void Kernel<TStorage, TWeights>(BackwardArgs<ushort> a)
        where TStorage : struct, IStorage
        where TWeights : struct, IWeights
    {
        bool split = default(TWeights).Split;
        int tid = Group.IdxX;
        int warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
        int head = Grid.IdxX;
        int rowBlock = a.RowBlocks - 1 - Grid.IdxY;
        int T = a.Length, D = a.HeadDim;
        bool wide = D > 64;
        int row0 = rowBlock * BlockRows;
        // The key/value head this query head reads (grouped-query heads share one) as views at row 0, rows Rows.X.Token
        // elements apart (docs/math.md, "Layouts and grouped heads"), addressed by 32-bit offsets in 16-byte pieces.
        var rows = a.Rows;
        long kBase = rows.KeyBaseOfQuery(rows.K, head), vBase = rows.KeyBaseOfQuery(rows.V, head);
        var kHead = a.K.Cast<U4>().SubView(kBase >> 3);
        var vHead = a.V.Cast<U4>().SubView(vBase >> 3);
        int kToken = rows.K.TokenPieces, vToken = rows.V.TokenPieces;
        var shared = SharedMemory.GetDynamic<uint>();
        var vectors = shared.Cast<U4>();
        int emu = SharedUints + warp * Mma.ScratchUintsPerWarp;   // used only where the mma is emulated

        // Keys at or past stageLimit are seen by no row of this block (nor exist past T): staged as zeros.
        int stageLimit = Math.Min(T, row0 + BlockRows) - 1 + a.AttendCurrent;
        int rowLo = row0 + 16 * warp + g, rowHi = rowLo + 8;
        int qAt = QOffset / 4 + warp * WarpVectors + lane;
        int dOAt = DOOffset / 4 + warp * WarpVectors + lane;
        StageRowFragments(a.Q, vectors.SubView(qAt), rows.QueryBase(rows.Q, head), rows.Q.Token, rowLo, T, D, t);
        StageRowFragments(a.DO, vectors.SubView(dOAt), rows.QueryBase(rows.DO, head), rows.DO.Token, rowLo, T, D, t);
        if (tid == 0)
            shared[FlagOffset] = KeyTile;                // ordered before the diagonal tile's atomics by the barriers
        uint exponentMask = default(TStorage).IsBFloat16 ? 0x7F80_7F80u : 0x7C00_7C00u;

        // Row i sees keys j < i (j <= i when attending to the current token); a row past T sees none.
        int limitLo = rowLo < T ? rowLo + a.AttendCurrent : 0;
        int limitHi = rowHi < T ? rowHi + a.AttendCurrent : 0;
        long stat = (long)head * T;
        // dRem rem per row (rem = exp(LogRem)); P, the prefix of a over the farther keys, carried across tiles.
        float dRemRemLo = rowLo < T ? a.DRem[stat + rowLo] * MathF.Exp(a.LogRem[stat + rowLo]) : 0f;
        float dRemRemHi = rowHi < T ? a.DRem[stat + rowHi] * MathF.Exp(a.LogRem[stat + rowHi]) : 0f;
        float prefixLo = 0f, prefixHi = 0f;
        float scale2 = a.Scale * Log2E;
        int half = t >> 1;                               // this thread's 32-key snapshot tile within the 64-key tile
        var dq = new Tile16();

        // Fragment views ("sub-view + constant index"): K and V key 16 (g / 2) + g % 2.
        int kAt = KOffset / 4 + (16 * (g >> 1) + (g & 1)) * RowStrideU4 + t;
        int vAt = VOffset / 4 + (16 * (g >> 1) + (g & 1)) * RowStrideU4 + t;

        // This thread's rows of a key tile (r and on by 128 / (D / 8)) and its 16-byte piece c of them, as LoadTileRows takes them.
        int r = tid / (D >> 3), c = tid & ((D >> 3) - 1);

        int lastKey = Math.Min(T - 1, row0 + BlockRows - 1);
        int lastTile = lastKey / KeyTile;                 // = rowBlock: the diagonal tile
        // Tile 0's K and V rows on their way; each later tile's are copied during the previous tile's dq product. On
        // CUDA from the device addresses of this head's row 0 (once, not per tile), where the views go unused.
        long kAddress = a.KeyAddress + 2 * kBase, vAddress = a.ValueAddress + 2 * vBase;
        CopyRows(kAddress, vAddress, kHead, vHead, kToken, vToken, 0, r, c, stageLimit, D, vectors);
        for (int tile = 0; tile <= lastTile; tile++)
        {
            int key0 = tile * KeyTile;
            bool diagonal = tile == lastTile;
            // The acc snapshots of this thread's half, where the row sees a key of it (in every tile but the
            // diagonal one a row before T sees every key); issued before the staging so that the loads are in flight.
            int snapTile = 2 * tile + half;
            int halfKey = key0 + 32 * half;
            bool seesLo = diagonal ? limitLo > halfKey : rowLo < T;
            bool seesHi = diagonal ? limitHi > halfKey : rowHi < T;
            float accLo = seesLo ? a.AccSnapshots[Snapshots.Index(head, rowLo, snapTile, T, a.SnapshotTiles)] : 0f;
            float accHi = seesHi ? a.AccSnapshots[Snapshots.Index(head, rowHi, snapTile, T, a.SnapshotTiles)] : 0f;

            // This tile's K and V rows, copied since the previous tile's second barrier (cp.async on CUDA: no registers,
            // while the previous tile's dq product ran; a register prefetch there made ptxas spill): this thread's copies
            // are in, and the barrier makes every thread's visible.
            WaitCopies();
            Group.Barrier();
            // K^T from the K rows just stored (every warp is past the previous tile's dq product, which read K^T).
            Transpose(vectors, shared, D, tid, tile, diagonal, exponentMask);

            var s = new Tile8();
            var dov = new Tile8();
            // The head-dimension slices unrolled by hand (2 at D = 64, 4 at D = 128), as the forward's AllScores: a loop over a
            // runtime D kept each slice's loads behind the previous slice's mma.
            Products<TStorage>(ref s, vectors.SubView(qAt + 0), vectors.SubView(kAt + 0), shared, emu);
            Products<TStorage>(ref dov, vectors.SubView(dOAt + 0), vectors.SubView(vAt + 0), shared, emu);
            Products<TStorage>(ref s, vectors.SubView(qAt + 64), vectors.SubView(kAt + 4), shared, emu);
            Products<TStorage>(ref dov, vectors.SubView(dOAt + 64), vectors.SubView(vAt + 4), shared, emu);
            if (D > 64)
            {
                Products<TStorage>(ref s, vectors.SubView(qAt + 128), vectors.SubView(kAt + 8), shared, emu);
                Products<TStorage>(ref dov, vectors.SubView(dOAt + 128), vectors.SubView(vAt + 8), shared, emu);
                Products<TStorage>(ref s, vectors.SubView(qAt + 192), vectors.SubView(kAt + 12), shared, emu);
                Products<TStorage>(ref dov, vectors.SubView(dOAt + 192), vectors.SubView(vAt + 12), shared, emu);
            }

            float startLo = Exp2(accLo * Log2E), startHi = Exp2(accHi * Log2E);
            float pStartLo, pStartHi;
            float before0Lo = prefixLo, before0Hi = prefixHi;
            var p = new Frag16();
            var residuals = new Frag16();
            // (the dq product waits for every warp's K^T below, and so orders the next tile's K and V stores)
            if (diagonal)
            {
                int firstKey = key0 + 16 * t;
                prefixLo = RowLo(ref s, dov, scale2, limitLo - firstKey, startLo, prefixLo, dRemRemLo, t, out pStartLo);
                PackDz<TStorage>(s, false, split, ref p, ref residuals);
                prefixHi = RowHi(ref s, dov, scale2, limitHi - firstKey, startHi, prefixHi, dRemRemHi, t, out pStartHi);
                PackDz<TStorage>(s, true, split, ref p, ref residuals);
            }
            else
            {
                prefixLo = RowLoUnmasked(ref s, dov, scale2, startLo, prefixLo, dRemRemLo, t, out pStartLo);
                PackDz<TStorage>(s, false, split, ref p, ref residuals);
                prefixHi = RowHiUnmasked(ref s, dov, scale2, startHi, prefixHi, dRemRemHi, t, out pStartHi);
                PackDz<TStorage>(s, true, split, ref p, ref residuals);
            }
            // The P snapshots: before the lower 32 keys (P before the tile, lane t = 0) and before the upper 32
            // (lane t = 2's start). Written for every row before T whose snapshot exists (more than pass 2 reads).
            if ((t & 1) == 0 && snapTile < a.SnapshotTiles)
            {
                if (rowLo < T)
                    a.PrefixSnapshots[Snapshots.Index(head, rowLo, snapTile, T, a.SnapshotTiles)] = t == 0 ? before0Lo : pStartLo;
                if (rowHi < T)
                    a.PrefixSnapshots[Snapshots.Index(head, rowHi, snapTile, T, a.SnapshotTiles)] = t == 0 ? before0Hi : pStartHi;
            }

            Group.Barrier();
            // Every warp is past this tile's products, the last readers of its K and V rows: the next tile's are copied
            // while the dq product (which reads K^T) runs.
            if (tile < lastTile)
                CopyRows(kAddress, vAddress, kHead, vHead, kToken, vToken, key0 + KeyTile, r, c, stageLimit, D, vectors);
            // The K^T fragment view (row d = g, keys 16t ...) from the lane index read here: computed once before the
            // loop, ptxas kept it across the loop and spilled it at the 255-register bound.
            int laneNow = Warp.LaneIdx;
            var kt = vectors.SubView(KtOffset / 4 + (laneNow >> 2) * KtStrideU4 + 2 * (laneNow & 3));
            AccumulateDq<TStorage>(ref dq, p, split, residuals, kt, wide, shared, emu);
        }

        // A row that sees the diagonal tile's first key with a non-finite k gets NaN (the staging replaced it by 0).
        int firstBad = lastTile * KeyTile + (int)shared[FlagOffset];
        // dq in 4-byte words (its start and strides are even numbers of elements); its base computed here, after the
        // loop (one more 64-bit value live across the loop made ptxas spill).
        var words = a.DQ.Cast<uint>();
        long dqBase = rows.QueryBase(rows.DQ, head);
        if (rowLo < T)
            StoreRow<TStorage>(dq, false, firstBad < limitLo, a.Scale, words.SubView(((dqBase + rowLo * rows.DQ.Token) >> 1) + t), wide);
        if (rowHi < T)
            StoreRow<TStorage>(dq, true, firstBad < limitHi, a.Scale, words.SubView(((dqBase + rowHi * rows.DQ.Token) >> 1) + t), wide);
    }

    /// <summary>
    /// Stages this thread's A fragments of a [T, D] row block (rows <paramref name="rowLo"/> and rowLo + 8, zeros past
    /// T) in the order the mma takes them: vector <c>32 ks</c> of <paramref name="to"/> (the warp's area at this lane)
    /// holds {a0, a1, a2, a3} of k-step ks, with the head dimension permuted as for the row-major tiles (k-steps 2m and
    /// 2m+1 take dimensions 32m + 8t .. +3 and +4 .. +7), so that one 16-byte global load per row and m gives both
    /// k-steps. Only this thread reads them back (the loop's first barrier orders it). Row i of the head starts at
    /// element <paramref name="headBase"/> + i <paramref name="token"/> (both multiples of 8).
    /// </summary>
    private static void StageRowFragments(ArrayView<ushort> x, ArrayView<U4> to, long headBase, long token, int rowLo,
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
    /// The K and V rows of the key tile at <paramref name="key0"/> into their row-major buffers, this thread's pieces as
    /// <see cref="TensorCoreOps.LoadTileRows"/> and <see cref="TensorCoreOps.StoreTileRows"/> take them (rows at or past <paramref name="limit"/> zeros). On
    /// CUDA by <c>cp.async</c> into ILGPU's dynamic shared memory (<c>__dyn_shared_alloca</c>, ILGPU 1.5.3's name for it)
    /// from <paramref name="kAddress"/> and <paramref name="vAddress"/> (the device addresses of the head's row 0, from the
    /// addresses the host passes), one copy group that the next tile waits for; elsewhere loaded from the views and stored
    /// at once.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void CopyRows(long kAddress, long vAddress, ArrayView<U4> kHead, ArrayView<U4> vHead, int kToken, int vToken,
        int key0, int r, int c, int limit, int D, ArrayView<U4> vectors)
    {
        int tid = Group.IdxX;
        if (!CudaAsm.IsSupported)
        {
            StoreTileRows(LoadTileRows(kHead, kToken, key0, limit, D, tid, GroupSize), vectors, KOffset / 4, D, tid, GroupSize, RowStrideU4);
            StoreTileRows(LoadTileRows(vHead, vToken, key0, limit, D, tid, GroupSize), vectors, VOffset / 4, D, tid, GroupSize, RowStrideU4);
            return;
        }
        CopyTile(kAddress, kToken, key0 + r, c, limit, D, 16 * (KOffset / 4 + r * RowStrideU4 + c));
        CopyTile(vAddress, vToken, key0 + r, c, limit, D, 16 * (VOffset / 4 + r * RowStrideU4 + c));
        CommitCopies();
    }

    /// <summary>This thread's pieces of one tile (row <paramref name="row"/> and on by 128 / (D / 8), piece c), from the head at <paramref name="head"/>.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void CopyTile(long head, int token, int row, int c, int limit, int D, int to)
    {
        bool wide = D > 64;
        int step = wide ? 8 : 16;
        long at = head + 16L * (row * token + c), pass = 16L * step * token;
        int toPass = 16 * step * RowStrideU4;
        CopyPiece(at, row < limit, to);
        CopyPiece(at += pass, row + step < limit, to += toPass);
        CopyPiece(at += pass, row + 2 * step < limit, to += toPass);
        CopyPiece(at += pass, row + 3 * step < limit, to += toPass);
        if (wide)
        {
            CopyPiece(at += pass, row + 4 * step < limit, to += toPass);
            CopyPiece(at += pass, row + 5 * step < limit, to += toPass);
            CopyPiece(at += pass, row + 6 * step < limit, to += toPass);
            CopyPiece(at + pass, row + 7 * step < limit, to + toPass);
        }
    }

    /// <summary>
    /// Writes K^T [d][key] (row stride <see cref="KtStride"/>) from the row-major K tile in shared memory: lane j of
    /// warp c takes the key pair (2j, 2j+1) and the 16-byte pieces (8 dimensions) cc = (c + 4i + j) mod (D / 8), D / 32
    /// of them: rotated by the lane so that the 16-byte reads of 8 lanes fall in 8 different bank groups, and each
    /// word written (the pair of one dimension) lands in bank (4k + j) mod 32: no conflicts either way. In the
    /// <paramref name="diagonal"/> tile non-finite values become zeros and the first key holding one is noted at
    /// <see cref="FlagOffset"/> (a shared atomic min).
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void Transpose(ArrayView<U4> vectors, ArrayView<uint> shared, int D, int tid, int tile, bool diagonal,
        uint exponentMask)
    {
        bool wide = D > 64;
        int mask = (D >> 3) - 1;
        int j = tid & 31, c = tid >> 5;
        var rows = vectors.SubView(KOffset / 4 + 2 * j * RowStrideU4);
        int turn = c + j + 4 * tile;
        int c0 = turn & mask, c1 = (turn + 4) & mask, c2 = (turn + 8) & mask, c3 = (turn + 12) & mask;
        U4 lo0 = rows[c0], hi0 = rows[RowStrideU4 + c0];
        U4 lo1 = rows[c1], hi1 = rows[RowStrideU4 + c1];
        U4 lo2 = default, hi2 = default, lo3 = default, hi3 = default;
        if (wide)
        {
            lo2 = rows[c2];
            hi2 = rows[RowStrideU4 + c2];
            lo3 = rows[c3];
            hi3 = rows[RowStrideU4 + c3];
        }
        if (diagonal)
        {
            bool badLo = Sanitize(ref lo0, exponentMask) | Sanitize(ref lo1, exponentMask)
                | Sanitize(ref lo2, exponentMask) | Sanitize(ref lo3, exponentMask);
            bool badHi = Sanitize(ref hi0, exponentMask) | Sanitize(ref hi1, exponentMask)
                | Sanitize(ref hi2, exponentMask) | Sanitize(ref hi3, exponentMask);
            if (badLo || badHi)
                Atomic.Min(ref shared[FlagOffset], (uint)(badLo ? 2 * j : 2 * j + 1));
        }
        PutTransposed(shared, KtOffset, c0, j, lo0, hi0);
        PutTransposed(shared, KtOffset, c1, j, lo1, hi1);
        if (wide)
        {
            PutTransposed(shared, KtOffset, c2, j, lo2, hi2);
            PutTransposed(shared, KtOffset, c3, j, lo3, hi3);
        }
    }

    /// <summary>Writes dimensions 8c .. 8c+7 of keys 2j (<paramref name="lo"/>) and 2j+1 (<paramref name="hi"/>) into Kt, one word per dimension.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void PutTransposed(ArrayView<uint> shared, int kt, int c, int j, U4 lo, U4 hi)
    {
        // One sub-view and constant indices: ptxas folds them into the stores (32 separate indices would be
        // loop-invariant values that it keeps, and spills).
        var to = shared.SubView(kt + 8 * c * (KtStride / 2) + j);
        to[0] = (lo.X0 & 0xFFFFu) | (hi.X0 << 16);
        to[KtStride / 2] = (lo.X0 >> 16) | (hi.X0 & 0xFFFF0000u);
        to[2 * (KtStride / 2)] = (lo.X1 & 0xFFFFu) | (hi.X1 << 16);
        to[3 * (KtStride / 2)] = (lo.X1 >> 16) | (hi.X1 & 0xFFFF0000u);
        to[4 * (KtStride / 2)] = (lo.X2 & 0xFFFFu) | (hi.X2 << 16);
        to[5 * (KtStride / 2)] = (lo.X2 >> 16) | (hi.X2 & 0xFFFF0000u);
        to[6 * (KtStride / 2)] = (lo.X3 & 0xFFFFu) | (hi.X3 << 16);
        to[7 * (KtStride / 2)] = (lo.X3 >> 16) | (hi.X3 & 0xFFFF0000u);
    }
}
