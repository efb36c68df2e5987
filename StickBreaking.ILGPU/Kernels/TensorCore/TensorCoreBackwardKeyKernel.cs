using System;
using System.Runtime.CompilerServices;
using ILGPU;
using ILGPU.Runtime.Cuda;
using StickBreaking.ILGPU.Kernels.Common;
using static StickBreaking.ILGPU.Kernels.TensorCore.TensorCoreOps;

namespace StickBreaking.ILGPU.Kernels.TensorCore;

/// <summary>
/// Backward pass 2 on tensor cores (docs/math.md, "Backward" and "Snapshots"): dk_j = s sum_i dz_ij q_i and
/// dv_j = sum_i A_ij dO_i for 16-bit storage (fp16 or bf16, <c>TStorage</c>), head dimensions 64 and 128
/// (<see cref="Supports"/>), every product on <c>mma.sync.m16n8k16</c> with fp32 accumulation (<see cref="Mma"/>), every
/// scan in fp32, dk and dv rounded to 16 bits once at the end.
/// <para>
/// One group of <see cref="GroupSize"/> threads (8 warps) owns a block of <see cref="KeyBlock"/> keys (grid y; block 0,
/// which has the most rows, first), with its K and V row-major in shared memory, loaded once. It walks the blocks of
/// <see cref="BlockRows"/> query rows from the diagonal one to T. Per row block:
/// </para>
/// <para>
/// Phase A (all 8 warps): warp w takes rows 16 (w % 4) .. +15 and the 32 keys of 32-key snapshot tile w / 4, so that
/// every scan stays inside one snapshot tile (one acc and one P snapshot per row). S = Q K^T and dOV = dO V^T on the
/// mma (rows as M, the head dimension as K); the key permutation (mma column n of n-tile nt is key 8 (n / 2) + 2 nt +
/// n % 2) gives thread t the 8 CONSECUTIVE keys 8t .. 8t+7 of each of its rows, so the reverse scan of lb (for A) and
/// the forward scan of a (for P) are each a sequential scan over the thread's keys plus a quad exchange. A and dz are
/// computed in fp32 on the accumulators, rounded to 16 bits (or split into rounded + residual with
/// <see cref="SplitWeights"/>) and stored TRANSPOSED (keys as the rows of phase B's A operand) into a shared scratch.
/// Only the diagonal row block and a last one reaching past T need the visibility selections; the others take an
/// unmasked copy of the elementwise code. The row permutation (mma row
/// m = g stands for row 2g of the warp's 16, m = g + 8 for row 2g + 1: the staged Q and dO fragments are built that
/// way) makes a thread hold the row pair (2g, 2g+1) of every key: one 32-bit store per key and matrix.
/// </para>
/// <para>
/// Phase B (after a barrier): warps 0-3 accumulate dv for keys 16w .. 16w+15 (A^T from the scratch as the A operand,
/// dO^T [d][row] as B), warps 4-7 dk for keys 16 (w - 4) .. (dz^T and Q^T): the keys are the mma's M, the 64 rows
/// its K (4 k-steps), the head dimension its N; 64 fp32 accumulators per thread at D = 128, held over the whole walk.
/// Phases A and B do the same number of mma per warp (64 at D = 128, rounded), so the warps stay balanced.
/// </para>
/// <para>
/// Layouts. The 64 rows are stored as 32 row pairs per 32-bit word; the K dimension of the phase-B mma is permuted so
/// that the eight words of Q^T or dO^T a thread needs for the four k-steps (pair 8 ks + 4 h + t at word 8t + 2ks + h)
/// are two consecutive 16-byte chunks (chunk ^ (d &amp; 1) swizzled: conflict-free loads), each feeding two mma. The
/// scratch is kept in phase B's fragment order (the four words of a lane's A fragment of one k-step, keys g and
/// g + 8, adjacent): one 16-byte load per k-step straight into the mma's operand registers (an [key][row] layout
/// needed four register moves per mma to assemble them); phase A's 32-bit stores into it are conflict-free (a lane
/// swizzle by bit 4 of the key). The
/// staging of a row block (Q and dO as phase-A fragments, Q^T and dO^T) is done by row pairs: lane P of each warp
/// loads rows 2P and 2P+1 of one 16-byte column piece and writes both layouts from them (conflict-free: the fragment
/// slot of thread (g, t) is permuted as 4g + ((t + g / 2) &amp; 3)). The next row block's pieces are copied from
/// global memory by cp.async during this block's phase B (into each thread's own raw slots: no registers held over
/// the products) and stored after it (Q^T and dO^T are double-buffered): two barriers per row block.
/// </para>
/// <para>
/// Masks select, never multiply by zero: a key a row does not see gets lb = A = a = dz = 0 by selection, and the
/// snapshots are read only for a (row, tile) where the row sees the tile's first key. Rows and keys past T are
/// staged as zeros. In the phase-B product a zero A or dz still meets the row's q and dO (0 * Inf = NaN), and only
/// the diagonal row block holds rows that do not see some of the block's keys (every later row sees every key). So
/// that block's Q^T and dO^T are staged with each non-finite value replaced by 0 and, per column, the last row
/// holding one noted (shared atomic max); a key seen by that row gets NaN in that column of dk (from q) or dv (from
/// dO). Phase A needs no screening: S and dOV pair one row with one key, and the selections remove what a row does
/// not see. A key no row sees gets dk = dv = 0 exactly (its A and dz are 0 for every row, every Q^T and dO^T value
/// it meets is finite).
/// </para>
/// <para>
/// Layouts and grouped heads (docs/math.md): every row of q, k, v, dO, dk and dv is found through
/// <see cref="AttentionRows"/> (a head's base plus t times the tensor's token stride, in 64 bits; 16-byte aligned rows
/// for q, k, v, dO, 4-byte for dk, dv). Grid x is the key/value head (<c>PerKeyValueHead</c>): the group walks the
/// query heads that read it (members 0 .. GroupSize - 1, in that order), each from its diagonal row block to T with
/// its own q, dO, snapshots, LogRem and dRem, into the same dk and dv accumulators, written once at the end. Per
/// head the diagonal block is staged (and screened) again; the flags carry over (a key is seen by the same rows of
/// every head, so the largest flagged row over all heads decides).
/// </para>
/// <para>
/// Shared memory: K and V 40 KB (padded rows), the Q and dO fragments 32 KB, Q^T and dO^T 64 KB (two buffers),
/// the scratch 32 KB (A^T, dz^T and their residuals), the flags and the group's end, the raw pieces 32 KB, 201 KB
/// in all: one group of
/// 256 threads per SM, up to 255 registers each (<see cref="MinGroupsPerMultiprocessor"/> = 1).
/// </para>
/// <para>
/// Measured (H200, eighth session; kernel alone, snapshots row-major then): B=4 H=12 T=4096 D=128 3.99 ms rounded
/// (bf16; fp16 3.98), 4.38 / 5.32 ms split (bf16 / fp16); B=4 H=16 T=4096 D=64 3.52 ms rounded, 3.96 / 5.17 ms split.
/// In the backward with tile-major snapshots: 3.83-3.89 ms at D = 128 (bf16 rounded); with the next row block's pieces
/// by cp.async and the products unrolled (ninth session) 3.63-3.68 ms. Before those, ptxas 11.8: 244
/// registers, no local memory, 3298 SASS instructions. That is about 9,500 cycles per (key block, row block) step per SM (756 steps
/// per SM at T = 4096) against about 3,600 issue cycles per scheduler (2 warps of about 1,800 instructions): the pass
/// is latency-bound, D = 64 costing two thirds of D = 128 per head.
/// Tried and slower (18-22 %): phase A of the next row block and phase B of this one in one barrier interval (two
/// scratch buffers, 201 KB), the dk and dv warps of a scheduler taking the phases in opposite order. The next steps
/// left: two groups per SM (128 registers: dk and dv accumulators split over more warps, or 16 warps per group), or
/// Hopper's wgmma (a warpgroup's B operand read once from shared memory, accumulators beside the elementwise warps).
/// </para>
/// </summary>
internal static partial class TensorCoreBackwardKeyKernel
{
    /// <summary>Threads per group: 8 warps of 32 (the kernel needs 32-thread warps).</summary>
    public const int GroupSize = 256;
    /// <summary>Keys per group (the launch's rows per group along T).</summary>
    public const int KeyBlock = 64;
    /// <summary>Query rows per step of the walk.</summary>
    public const int BlockRows = 64;
    /// <summary>The largest head dimension; <see cref="Supports"/> says which are served.</summary>
    public const int MaxHeadDim = 128;
    /// <summary>Launch bound: one group of 256 threads per SM (up to 255 registers per thread).</summary>
    public const int MinGroupsPerMultiprocessor = 1;

    /// <summary>Row stride of K and V in 16-bit values (320 bytes: conflict-free 16-byte fragment loads).</summary>
    private const int RowStride = 160;
    private const int RowStrideU4 = RowStride / 8;
    /// <summary>Words per row of Q^T, dO^T ([d][row pair]) and of the scratch ([key][row pair]): 64 rows.</summary>
    private const int TransposedStride = 32;
    private const int TransposedStrideU4 = TransposedStride / 4;
    /// <summary>Words between the scratch words of keys 8t + e and 8t + e + 1 of a thread (fragment lanes 4e + ..).</summary>
    private const int ScratchStride = 16;
    /// <summary>16-byte vectors per warp area of the staged fragments: 8 k-steps (D = 128) of 32 lanes.</summary>
    private const int FragmentVectors = 8 * 32;

    // Shared memory, in 32-bit words.
    private const int KOffset = 0;
    private const int VOffset = KOffset + KeyBlock * RowStride / 2;
    private const int QFragmentOffset = VOffset + KeyBlock * RowStride / 2;
    private const int DOFragmentOffset = QFragmentOffset + 4 * FragmentVectors * 4;
    /// <summary>Words of one Q^T or dO^T buffer; row block i uses buffer i % 2.</summary>
    private const int TransposedWords = MaxHeadDim * TransposedStride;
    private const int QtOffset = DOFragmentOffset + 4 * FragmentVectors * 4;
    private const int DOtOffset = QtOffset + 2 * TransposedWords;
    private const int ScratchOffset = DOtOffset + 2 * TransposedWords;
    /// <summary>dz^T after A^T in the scratch (words).</summary>
    private const int DzScratch = KeyBlock * TransposedStride;
    /// <summary>The residuals (split weights) after A^T and dz^T.</summary>
    private const int LowScratch = 2 * DzScratch;
    /// <summary>Per column of Q (then of dO): 1 + the last diagonal-block row holding a non-finite value there, 0 if none.</summary>
    private const int FlagOffset = ScratchOffset + 4 * DzScratch;
    /// <summary>One past the last query head of the group (one word; 4 keep what follows 16-byte aligned).</summary>
    private const int EndHeadOffset = FlagOffset + 2 * MaxHeadDim;
    /// <summary>
    /// The next row block's raw Q and dO pieces, each thread's own (piece j of thread tid at vector j * GroupSize + tid):
    /// copied there by cp.async during phase B, read back by the same thread after it (32 KB).
    /// </summary>
    private const int RawOffset = EndHeadOffset + 4;
    private const int SharedUints = RawOffset + 8 * GroupSize * 4;

    /// <summary>Dynamic shared memory per group on CUDA, in bytes (201 KB: the loader raises the limit).</summary>
    public const int SharedBytes = 4 * SharedUints;
    /// <summary>Dynamic shared memory per group where the mma is emulated (CPU accelerator): adds the emulation's scratch.</summary>
    public const int EmulatedSharedBytes = SharedBytes + 4 * (GroupSize / 32) * Mma.ScratchUintsPerWarp;

    /// <summary>Whether the kernel serves this head dimension.</summary>
    public static bool Supports(int headDim) => headDim == 64 || headDim == 128;

    public static void Kernel<TStorage, TWeights>(BackwardArgs<ushort> a)
        where TStorage : struct, IStorage
        where TWeights : struct, IWeights
    {
        bool split = default(TWeights).Split;
        int tid = Group.IdxX;
        int warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
        int keyHead = Grid.IdxX;                          // key/value head b * Hkv + g
        int block = Grid.IdxY;                            // key block 0 has the most rows: launched first
        int T = a.Length, D = a.HeadDim, attendCurrent = a.AttendCurrent;
        bool wide = D > 64;
        int key0 = block * KeyBlock;
        var shared = SharedMemory.GetDynamic<uint>();
        var vectors = shared.Cast<U4>();
        int emu = SharedUints + warp * Mma.ScratchUintsPerWarp;   // used only where the mma is emulated
        uint exponentMask = default(TStorage).IsBFloat16 ? 0x7F80_7F80u : 0x7C00_7C00u;
        int rowBlocks = (T + BlockRows - 1) / BlockRows;

        if (tid < 2 * MaxHeadDim)
            shared[FlagOffset + tid] = 0;
        StageKeys(a.K, vectors, KOffset / 4, a.Rows.KeyBase(a.Rows.K, keyHead), a.Rows.K.Token, key0, T, D, tid);
        StageKeys(a.V, vectors, VOffset / 4, a.Rows.KeyBase(a.Rows.V, keyHead), a.Rows.V.Token, key0, T, D, tid);

        // Phase A: warp rows 16 ws .. +15, keys 32 st .. +31 of the block (snapshot tile 2 block + st).
        int ws = warp & 3, st = warp >> 2;
        int fragment = ws * FragmentVectors + 4 * g + ((t + (g >> 1)) & 3);
        int qAt = QFragmentOffset / 4 + fragment, doAt = DOFragmentOffset / 4 + fragment;
        int keyRow = 32 * st + 8 * (g >> 1) + (g & 1);
        int kAt = KOffset / 4 + keyRow * RowStrideU4 + t, vAt = VOffset / 4 + keyRow * RowStrideU4 + t;
        int tileFirst = key0 + 32 * st, firstKey = tileFirst + 8 * t, snapshotTile = 2 * block + st;
        // The scratch holds A^T and dz^T in the phase-B fragment layout: key k (of 64), row pair L (of 32) at word
        // 512 (k / 16) + 128 (L / 8) + 4 lane' + (k / 8) % 2 + 2 ((L / 4) % 2), lane' = (4 (k % 8) + L % 4) ^ (4 ((k / 16) % 2))
        // (the swizzle spreads phase A's stores over all 32 banks). This thread's pair L = 8 ws + g, keys 32 st + 8t + e.
        int keyGroup = 2 * st + (t >> 1), laneSwizzle = 16 * (t >> 1);
        int scratchAt = ScratchOffset + 512 * keyGroup + 128 * ws + 4 * (g & 3) + (t & 1) + 2 * (g >> 2);
        var evenKeys = shared.SubView(scratchAt + laneSwizzle);
        var oddKeys = shared.SubView(scratchAt - laneSwizzle);
        float scale2 = a.Scale * Log2E;

        // Phase B: dv (warps 0-3) or dk (warps 4-7) of keys 16 (w % 4) + g and + 8.
        bool dvWarp = warp < 4;
        int fragmentAt = (ScratchOffset + (dvWarp ? 0 : DzScratch)) / 4 + 128 * ws + (lane ^ (4 * (ws & 1)));
        int columnAt = (dvWarp ? DOtOffset : QtOffset) / 4 + g * TransposedStrideU4;
        int columnAt0 = columnAt + ((2 * t) ^ (g & 1)), columnAt1 = columnAt + ((2 * t + 1) ^ (g & 1));
        var acc = new Tile16();

        // The query heads that read this key/value head, in a fixed order, all into the same dk and dv accumulators.
        // Per head: its q and dO rows, statistics and snapshots; the staging of its diagonal row block starts over
        // (buffer block % 2). The flags carry over: a column's flag is the last diagonal-block row, of any head,
        // holding a non-finite value there (the rows that see a key are the same for every head). The end of the
        // group is kept in shared memory, read once per head: a register held over the row-block loop costs that
        // loop moves at the 255-register bound.
        int head = a.Rows.QueryHeadOf(keyHead, 0);
        if (tid == 0)
            shared[EndHeadOffset] = (uint)(head + a.Rows.GroupSize);
        do
        {
            // The head's q and dO as views at 16-byte piece `warp` of row 0 (16-byte aligned rows), their rows addressed by
            // 32-bit offsets from there.
            var qHead = a.Q.Cast<U4>().SubView((a.Rows.QueryBase(a.Rows.Q, head) >> 3) + warp);
            var dOHead = a.DO.Cast<U4>().SubView((a.Rows.QueryBase(a.Rows.DO, head) >> 3) + warp);
            // The same on CUDA as device addresses (bytes), for the cp.async copies.
            long qAddress = a.QueryAddress + 2 * a.Rows.QueryBase(a.Rows.Q, head) + 16 * warp;
            long dOAddress = a.OutputGradientAddress + 2 * a.Rows.QueryBase(a.Rows.DO, head) + 16 * warp;
            Group.Barrier();                              // the flags are zero, the last head's phase B is done
            StageDiagonal(a, qHead, dOHead, key0, shared, block & 1, D, warp, lane, exponentMask);
            Group.Barrier();
            // The snapshots and statistics of the thread's two rows, loaded one row block ahead (during phase B).
            var inputsLo = LoadRow(a, head, key0 + 16 * ws + 2 * g, tileFirst, snapshotTile);
            var inputsHi = LoadRow(a, head, key0 + 16 * ws + 2 * g + 1, tileFirst, snapshotTile);

            for (int rowBlock = block; rowBlock < rowBlocks; rowBlock++)
            {
                int row0 = rowBlock * BlockRows;
                var s = new Tile4();
                var d = new Tile4();
                // The head-dimension slices unrolled by hand (2 at D = 64, 4 at D = 128), as the forward's AllScores: a loop over a
                // runtime D kept each slice's loads behind the previous slice's mma.
                Products<TStorage>(ref s, vectors.SubView(qAt + 0), vectors.SubView(kAt + 0), shared, emu);
                Products<TStorage>(ref d, vectors.SubView(doAt + 0), vectors.SubView(vAt + 0), shared, emu);
                Products<TStorage>(ref s, vectors.SubView(qAt + 64), vectors.SubView(kAt + 4), shared, emu);
                Products<TStorage>(ref d, vectors.SubView(doAt + 64), vectors.SubView(vAt + 4), shared, emu);
                if (D > 64)
                {
                    Products<TStorage>(ref s, vectors.SubView(qAt + 128), vectors.SubView(kAt + 8), shared, emu);
                    Products<TStorage>(ref d, vectors.SubView(doAt + 128), vectors.SubView(vAt + 8), shared, emu);
                    Products<TStorage>(ref s, vectors.SubView(qAt + 192), vectors.SubView(kAt + 12), shared, emu);
                    Products<TStorage>(ref d, vectors.SubView(doAt + 192), vectors.SubView(vAt + 12), shared, emu);
                }
                float accLo = inputsLo.Acc * Log2E, accHi = inputsHi.Acc * Log2E;
                float dRemRemLo = inputsLo.DRem * MathF.Exp(inputsLo.LogRem), dRemRemHi = inputsHi.DRem * MathF.Exp(inputsHi.LogRem);
                // Only the diagonal row block and a last one that reaches past T have keys some of their rows do not see.
                if (rowBlock == block || row0 + BlockRows > T)
                {
                    int rowLo = row0 + 16 * ws + 2 * g, rowHi = rowLo + 1;
                    int visibleLo = (rowLo < T ? rowLo + attendCurrent : 0) - firstKey;
                    int visibleHi = (rowHi < T ? rowHi + attendCurrent : 0) - firstKey;
                    RowLo(ref s, ref d, scale2, visibleLo, accLo, inputsLo.Prefix, dRemRemLo, lane, t);
                    RowHi(ref s, ref d, scale2, visibleHi, accHi, inputsHi.Prefix, dRemRemHi, lane, t);
                }
                else
                {
                    RowLoUnmasked(ref s, ref d, scale2, accLo, inputsLo.Prefix, dRemRemLo, lane, t);
                    RowHiUnmasked(ref s, ref d, scale2, accHi, inputsHi.Prefix, dRemRemHi, lane, t);
                }
                StoreScratch<TStorage>(s, d, split, evenKeys, oddKeys);
                Group.Barrier();

                // The next row block's pieces, copied during phase B (cp.async: no registers held over the products) and
                // stored after it (into the other Q^T / dO^T buffer).
                int next = rowBlock + 1;
                CopyRowPairs(a, qAddress, dOAddress, qHead, dOHead, next * BlockRows, next < rowBlocks ? T : 0, D, lane, tid, vectors);
                inputsLo = LoadRow(a, head, next * BlockRows + 16 * ws + 2 * g, tileFirst, snapshotTile);
                inputsHi = LoadRow(a, head, next * BlockRows + 16 * ws + 2 * g + 1, tileFirst, snapshotTile);
                int buffer = (rowBlock & 1) * (TransposedWords / 4);
                U4 f0 = vectors[fragmentAt], f1 = vectors[fragmentAt + 32], f2 = vectors[fragmentAt + 64], f3 = vectors[fragmentAt + 96];
                U4 l0 = default, l1 = default, l2 = default, l3 = default;
                if (split)
                {
                    l0 = vectors[fragmentAt + LowScratch / 4];
                    l1 = vectors[fragmentAt + LowScratch / 4 + 32];
                    l2 = vectors[fragmentAt + LowScratch / 4 + 64];
                    l3 = vectors[fragmentAt + LowScratch / 4 + 96];
                }
                Accumulate<TStorage>(ref acc, f0, f1, f2, f3, split, l0, l1, l2, l3,
                    vectors.SubView(columnAt0 + buffer), vectors.SubView(columnAt1 + buffer), wide, shared, emu);
                if (next < rowBlocks)
                {
                    var pieces = ReadRowPairs(vectors, D, tid);
                    StorePieces(ref pieces, shared, next & 1, false, D, warp, lane, exponentMask);
                }
                Group.Barrier();
            }
            head++;
        }
        while (head < (int)shared[EndHeadOffset]);        // written before the first head's barriers

        // Key g and g + 8 of the warp's 16: NaN in a column where a diagonal-block row that sees the key held a
        // non-finite q (dk) or dO (dv) value; keys past T are not written.
        var flags = shared.SubView(FlagOffset + (dvWarp ? MaxHeadDim : 0) + 2 * t);
        int relativeG = 16 * ws + g;
        int keyLo = key0 + relativeG, keyHi = keyLo + 8;
        var output = dvWarp ? a.DV : a.DK;
        var rows = dvWarp ? a.Rows.DV : a.Rows.DK;
        var words = output.Cast<uint>().SubView((a.Rows.KeyBase(rows, keyHead) >> 1) + t);
        float factor = dvWarp ? 1f : a.Scale;
        if (keyLo < T)
            StoreKey<TStorage>(acc, false, factor, words.SubView(((long)keyLo * rows.Token) >> 1), flags,
                relativeG + 1 - attendCurrent, wide);
        if (keyHi < T)
            StoreKey<TStorage>(acc, true, factor, words.SubView(((long)keyHi * rows.Token) >> 1), flags,
                relativeG + 9 - attendCurrent, wide);
    }

    /// <summary>
    /// What one row brings to a snapshot tile where it sees the tile's first key (else zeros, and nothing read; also
    /// past T): its acc before the tile (natural log, the forward's snapshot), its prefix P before the tile (pass 1's
    /// snapshot), dRem and LogRem.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static RowStatistics LoadRow(in BackwardArgs<ushort> a, int head, int row, int tileFirst, int tile)
    {
        int T = a.Length;
        RowStatistics r = default;
        if (row < T && tileFirst < row + a.AttendCurrent)
        {
            long at = Snapshots.Index(head, row, tile, T, a.SnapshotTiles);
            r.Acc = a.AccSnapshots[at];
            r.Prefix = a.PrefixSnapshots[at];
            long stat = (long)head * T + row;
            r.DRem = a.DRem[stat];
            r.LogRem = a.LogRem[stat];
        }
        return r;
    }

    /// <summary>
    /// lb = log2(1 - beta) exactly as <see cref="TensorCoreOps.Lb2"/> computes it (the same operations, so that the
    /// weights are the forward's), and beta and 1 - beta from the same u = 2^-|z|: 1 / (1 + u) for the larger,
    /// u / (1 + u) for the smaller (never 1 - beta).
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static float LogSigmoids(float z, out float beta, out float oneMinusBeta)
    {
        float u = Exp2(-MathF.Abs(z));
        float s = u * Reciprocal(2f + u);
        float t = s * s;
        const float C = 2f * Log2E;
        float series = C * 0.1407888918330113f;
        series = series * t + C * 0.13982578872278584f;
        series = series * t + C * 0.20012297615355937f;
        series = series * t + C * 0.33333160820690017f;
        series = series * t + C * 1.0000000038408794f;
        float large = Reciprocal(1f + u);
        float small = u * large;
        bool positive = z >= 0f;
        beta = positive ? large : small;
        oneMinusBeta = positive ? small : large;
        return -(MathF.Max(z, 0f) + s * series);
    }

    /// <summary>
    /// The quad (4 lanes, one row) exchange of the thread sums y_t of a: the sum over the farther threads (t' &lt; t),
    /// farthest first.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static float QuadFarther(float y, int lane, int t)
    {
        int quad = lane & ~3;
        float y0 = Warp.Shuffle(y, quad);
        float y1 = Warp.Shuffle(y, quad + 1);
        float y2 = Warp.Shuffle(y, quad + 2);
        float farther2 = y0 + y1;
        float farther3 = farther2 + y2;
        return t == 0 ? 0f : t == 1 ? y0 : t == 2 ? farther2 : farther3;
    }

    /// <summary>A 16-bit pair with each half replaced by NaN whose column's flag exceeds <paramref name="threshold"/>.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static uint Poisoned<TStorage>(uint word, ArrayView<uint> flags, int column, int threshold)
        where TStorage : struct, IStorage
    {
        uint nan = default(TStorage).IsBFloat16 ? 0x7FC0u : 0x7E00u;
        if ((int)flags[column] > threshold)
            word = (word & 0xFFFF_0000u) | nan;
        if ((int)flags[column + 1] > threshold)
            word = (word & 0xFFFFu) | (nan << 16);
        return word;
    }

    /// <summary>
    /// Stores rows key0 .. key0+63 of the head at <paramref name="headBase"/> (rows <paramref name="token"/> elements
    /// apart, a multiple of 8) row-major in shared memory (row stride <see cref="RowStride"/>), zeros past T.
    /// </summary>
    private static void StageKeys(ArrayView<ushort> x, ArrayView<U4> vectors, int at, long headBase, long token, int key0,
        int T, int D, int tid)
    {
        int chunks = D >> 3;
        var source = x.Cast<U4>().SubView(headBase >> 3);
        long tokenU4 = token >> 3;
        for (int i = tid; i < KeyBlock * chunks; i += GroupSize)
        {
            int row = i / chunks, c = i - row * chunks;
            vectors[at + row * RowStrideU4 + c] = RowPiece(source, (key0 + row) * tokenU4 + c, key0 + row < T);
        }
    }

    /// <summary>
    /// 16-byte piece <paramref name="index"/> (64-bit: strided rows) of <paramref name="source"/> where
    /// <paramref name="active"/>, zeros elsewhere (nothing read).
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static U4 RowPiece(ArrayView<U4> source, long index, bool active)
    {
        U4 value = default;
        if (active)
            value = source[index];
        return value;
    }

    /// <summary>
    /// Loads this thread's share of a block of 64 rows of Q and dO: lane P takes rows 2P and 2P+1, warp w the 16-byte
    /// column pieces c = w (and w + 8 at D = 128) of Q, then of dO: P0, P1 (rows 2P, 2P+1 of Q piece w), P2, P3
    /// (Q piece w + 8, or dO piece w at D = 64), P4 .. P7 (dO pieces w, w + 8). <paramref name="qHead"/> and
    /// <paramref name="dOHead"/> are views at piece w of the head's row 0; rows are <c>Rows.Q.Token</c>,
    /// <c>Rows.DO.Token</c> elements apart (multiples of 8), addressed by 32-bit offsets. Rows at or past
    /// <paramref name="limit"/> are zeros.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Pieces8 LoadRowPairs(in BackwardArgs<ushort> a, ArrayView<U4> qHead, ArrayView<U4> dOHead, int row0, int limit,
        int D, int lane)
    {
        bool wide = D > 64;
        int qToken = a.Rows.Q.TokenPieces, dOToken = a.Rows.DO.TokenPieces;
        int row = row0 + 2 * lane;
        bool lo = row < limit, hi = row + 1 < limit;
        // Views of the two rows (of row 0 where a row is past the limit, never read: views stay inside the tensor),
        // so that the column offsets are constants of the loads.
        int rowLo = lo ? row : 0, rowHi = hi ? row + 1 : 0;
        var qLo = qHead.SubView(rowLo * qToken);
        var qHi = qHead.SubView(rowHi * qToken);
        var dOLo = dOHead.SubView(rowLo * dOToken);
        var dOHi = dOHead.SubView(rowHi * dOToken);
        Pieces8 p;
        p.P0 = Piece(qLo, 0, lo);
        p.P1 = Piece(qHi, 0, hi);
        if (wide)
        {
            p.P2 = Piece(qLo, 8, lo);
            p.P3 = Piece(qHi, 8, hi);
            p.P4 = Piece(dOLo, 0, lo);
            p.P5 = Piece(dOHi, 0, hi);
            p.P6 = Piece(dOLo, 8, lo);
            p.P7 = Piece(dOHi, 8, hi);
        }
        else
        {
            p.P2 = Piece(dOLo, 0, lo);
            p.P3 = Piece(dOHi, 0, hi);
            p.P4 = default;
            p.P5 = default;
            p.P6 = default;
            p.P7 = default;
        }
        return p;
    }

    /// <summary>
    /// <see cref="LoadRowPairs"/>'s pieces into this thread's raw slots (<see cref="RawOffset"/>): on CUDA by cp.async
    /// (16 bytes each, zeros past the limit: ignore-src) from <paramref name="qAddress"/> / <paramref name="dOAddress"/>
    /// (the device addresses of piece `warp` of the head's row 0), one copy group that <see cref="ReadRowPairs"/> waits
    /// for; elsewhere loaded and stored at once.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void CopyRowPairs(in BackwardArgs<ushort> a, long qAddress, long dOAddress, ArrayView<U4> qHead,
        ArrayView<U4> dOHead, int row0, int limit, int D, int lane, int tid, ArrayView<U4> vectors)
    {
        int slot = RawOffset / 4 + tid;
        if (!CudaAsm.IsSupported)
        {
            StoreStrided(LoadRowPairs(a, qHead, dOHead, row0, limit, D, lane), vectors.SubView(slot), GroupSize, D > 64);
            return;
        }
        int row = row0 + 2 * lane;
        bool lo = row < limit, hi = row + 1 < limit;
        long qLo = qAddress + 16L * row * a.Rows.Q.TokenPieces, qHi = qLo + 16L * a.Rows.Q.TokenPieces;
        long dOLo = dOAddress + 16L * row * a.Rows.DO.TokenPieces, dOHi = dOLo + 16L * a.Rows.DO.TokenPieces;
        int to = 16 * slot, step = 16 * GroupSize;
        CopyPiece(qLo, lo, to);
        CopyPiece(qHi, hi, to + step);
        if (D > 64)
        {
            CopyPiece(qLo + 128, lo, to + 2 * step);
            CopyPiece(qHi + 128, hi, to + 3 * step);
            CopyPiece(dOLo, lo, to + 4 * step);
            CopyPiece(dOHi, hi, to + 5 * step);
            CopyPiece(dOLo + 128, lo, to + 6 * step);
            CopyPiece(dOHi + 128, hi, to + 7 * step);
        }
        else
        {
            CopyPiece(dOLo, lo, to + 2 * step);
            CopyPiece(dOHi, hi, to + 3 * step);
        }
        CommitCopies();
    }

    /// <summary>This thread's pieces from its raw slots, once its copies (<see cref="CopyRowPairs"/>) are in.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Pieces8 ReadRowPairs(ArrayView<U4> vectors, int D, int tid)
    {
        WaitCopies();
        return LoadStrided(vectors.SubView(RawOffset / 4 + tid), GroupSize, D > 64);
    }

    /// <summary>
    /// Stages the diagonal row block (rows key0 .. key0+63) of Q and dO as <see cref="LoadRowPairs"/> and
    /// <see cref="StorePieces"/> do, screened (<see cref="StorePair"/>), one column piece at a time: once per query
    /// head, with dk and dv held in registers, so that it holds few values at once.
    /// </summary>
    private static void StageDiagonal(in BackwardArgs<ushort> a, ArrayView<U4> qHead, ArrayView<U4> dOHead, int key0, ArrayView<uint> shared,
        int buffer, int D, int warp, int lane, uint exponentMask)
    {
        int T = a.Length, pairs = D >> 5;                 // column pieces per thread: Q w (, w + 8), then dO
        int row = key0 + 2 * lane;
        bool lo = row < T, hi = row + 1 < T;
        int rowLo = lo ? row : 0, rowHi = hi ? row + 1 : 0;
        for (int j = 0; j < pairs; j++)
        {
            bool isDO = 2 * j >= pairs;
            int c = warp + 8 * (j & (pairs >> 2));        // + 8 for the second piece of each tensor at D = 128
            var x = isDO ? dOHead : qHead;
            int token = isDO ? a.Rows.DO.TokenPieces : a.Rows.Q.TokenPieces;
            U4 pieceLo = Piece(x, c - warp + rowLo * token, lo);
            U4 pieceHi = Piece(x, c - warp + rowHi * token, hi);
            StorePair(pieceLo, pieceHi, shared, isDO ? DOFragmentOffset : QFragmentOffset, isDO ? DOtOffset : QtOffset,
                buffer, c, lane, true, exponentMask, isDO ? MaxHeadDim : 0);
        }
    }

    /// <summary>Stores the pieces of <see cref="LoadRowPairs"/>: Q^T / dO^T into buffer <paramref name="buffer"/>, and the fragments.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void StorePieces(ref Pieces8 p, ArrayView<uint> shared, int buffer, bool diagonal, int D, int warp,
        int lane, uint exponentMask)
    {
        if (D > 64)
        {
            StorePair(p.P0, p.P1, shared, QFragmentOffset, QtOffset, buffer, warp, lane, diagonal, exponentMask, 0);
            StorePair(p.P2, p.P3, shared, QFragmentOffset, QtOffset, buffer, warp + 8, lane, diagonal, exponentMask, 0);
            StorePair(p.P4, p.P5, shared, DOFragmentOffset, DOtOffset, buffer, warp, lane, diagonal, exponentMask, MaxHeadDim);
            StorePair(p.P6, p.P7, shared, DOFragmentOffset, DOtOffset, buffer, warp + 8, lane, diagonal, exponentMask, MaxHeadDim);
        }
        else
        {
            StorePair(p.P0, p.P1, shared, QFragmentOffset, QtOffset, buffer, warp, lane, diagonal, exponentMask, 0);
            StorePair(p.P2, p.P3, shared, DOFragmentOffset, DOtOffset, buffer, warp, lane, diagonal, exponentMask, MaxHeadDim);
        }
    }

    /// <summary>
    /// Rows 2P (<paramref name="lo"/>) and 2P+1 (<paramref name="hi"/>) of column piece <paramref name="c"/> (dimensions
    /// 8c .. 8c+7), P = <paramref name="lane"/>, as (1) the A fragments of k-steps 2m and 2m+1 (m = c / 4) of thread
    /// (g = P % 8, t = c % 4) of the warps with rows 16 (P / 8) .. (mma row g = row 2g, g + 8 = row 2g + 1; head dimension
    /// permuted as in the forward: k-steps 2m, 2m+1 take dimensions 32m + 8t .. +3, +4 .. +7), at fragment slot
    /// 4g + ((t + g / 2) &amp; 3); (2) the transposed words (row 2P low, 2P+1 high) of the 8 dimensions at pair word
    /// 8 (P % 4) + 2 (P / 8) + (P / 4) % 2, chunk-swizzled by d &amp; 1. In the diagonal block the transposed words
    /// have non-finite values replaced by 0, and each such column's flag raised to 1 + the row.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void StorePair(U4 lo, U4 hi, ArrayView<uint> shared, int fragments, int transposed, int buffer, int c,
        int lane, bool diagonal, uint exponentMask, int flagColumn)
    {
        var vectors = shared.Cast<U4>();
        int rowsGroup = lane >> 3, g = lane & 7, t = c & 3, m = c >> 2;
        int slot = fragments / 4 + rowsGroup * FragmentVectors + 64 * m + 4 * g + ((t + (g >> 1)) & 3);
        vectors[slot] = Fragment(lo.X0, hi.X0, lo.X1, hi.X1);
        vectors[slot + 32] = Fragment(lo.X2, hi.X2, lo.X3, hi.X3);
        if (diagonal)
        {
            U4 badLo, badHi;
            badLo.X0 = NonFinite(lo.X0, exponentMask);
            badLo.X1 = NonFinite(lo.X1, exponentMask);
            badLo.X2 = NonFinite(lo.X2, exponentMask);
            badLo.X3 = NonFinite(lo.X3, exponentMask);
            badHi.X0 = NonFinite(hi.X0, exponentMask);
            badHi.X1 = NonFinite(hi.X1, exponentMask);
            badHi.X2 = NonFinite(hi.X2, exponentMask);
            badHi.X3 = NonFinite(hi.X3, exponentMask);
            if ((badLo.X0 | badLo.X1 | badLo.X2 | badLo.X3 | badHi.X0 | badHi.X1 | badHi.X2 | badHi.X3) != 0)
            {
                int flags = FlagOffset + flagColumn + 8 * c;
                NoteColumns(shared, flags, badLo, (uint)(2 * lane + 1));
                NoteColumns(shared, flags, badHi, (uint)(2 * lane + 2));
                lo.X0 &= ~badLo.X0;
                lo.X1 &= ~badLo.X1;
                lo.X2 &= ~badLo.X2;
                lo.X3 &= ~badLo.X3;
                hi.X0 &= ~badHi.X0;
                hi.X1 &= ~badHi.X1;
                hi.X2 &= ~badHi.X2;
                hi.X3 &= ~badHi.X3;
            }
        }
        int pair = 8 * (lane & 3) + 2 * (lane >> 3) + ((lane >> 2) & 1);
        int at = transposed + buffer * TransposedWords + 8 * c * TransposedStride;
        var even = shared.SubView(at + pair);
        var odd = shared.SubView(at + (pair ^ 4));
        even[0] = (lo.X0 & 0xFFFFu) | (hi.X0 << 16);
        odd[TransposedStride] = (lo.X0 >> 16) | (hi.X0 & 0xFFFF_0000u);
        even[2 * TransposedStride] = (lo.X1 & 0xFFFFu) | (hi.X1 << 16);
        odd[3 * TransposedStride] = (lo.X1 >> 16) | (hi.X1 & 0xFFFF_0000u);
        even[4 * TransposedStride] = (lo.X2 & 0xFFFFu) | (hi.X2 << 16);
        odd[5 * TransposedStride] = (lo.X2 >> 16) | (hi.X2 & 0xFFFF_0000u);
        even[6 * TransposedStride] = (lo.X3 & 0xFFFFu) | (hi.X3 << 16);
        odd[7 * TransposedStride] = (lo.X3 >> 16) | (hi.X3 & 0xFFFF_0000u);
    }

    /// <summary>Raises the flag of each column (of the 8 at <paramref name="flags"/>) whose half of <paramref name="bad"/> is set to at least <paramref name="rowPlusOne"/>.</summary>
    private static void NoteColumns(ArrayView<uint> shared, int flags, U4 bad, uint rowPlusOne)
    {
        if ((bad.X0 & 0xFFFFu) != 0) Atomic.Max(ref shared[flags], rowPlusOne);
        if ((bad.X0 >> 16) != 0) Atomic.Max(ref shared[flags + 1], rowPlusOne);
        if ((bad.X1 & 0xFFFFu) != 0) Atomic.Max(ref shared[flags + 2], rowPlusOne);
        if ((bad.X1 >> 16) != 0) Atomic.Max(ref shared[flags + 3], rowPlusOne);
        if ((bad.X2 & 0xFFFFu) != 0) Atomic.Max(ref shared[flags + 4], rowPlusOne);
        if ((bad.X2 >> 16) != 0) Atomic.Max(ref shared[flags + 5], rowPlusOne);
        if ((bad.X3 & 0xFFFFu) != 0) Atomic.Max(ref shared[flags + 6], rowPlusOne);
        if ((bad.X3 >> 16) != 0) Atomic.Max(ref shared[flags + 7], rowPlusOne);
    }
}

/// <summary>A row's snapshots and statistics for one snapshot tile (<c>LoadRow</c>).</summary>
internal struct RowStatistics
{
    public float Acc, Prefix, DRem, LogRem;
}

/// <summary>One warp's 16 rows x 32 keys of S or dO V^T: 4 n-tiles of 8 keys.</summary>
internal struct Tile4
{
    public Acc4 N0, N1, N2, N3;
}
