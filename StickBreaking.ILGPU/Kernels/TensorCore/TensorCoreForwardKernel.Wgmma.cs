using System.Runtime.CompilerServices;
using ILGPU;
using ILGPU.Runtime.Cuda;
using StickBreaking.ILGPU.Kernels.Common;
using static StickBreaking.ILGPU.Kernels.TensorCore.TensorCoreOps;

namespace StickBreaking.ILGPU.Kernels.TensorCore;

/// <summary>
/// The forward's Hopper plan (<see cref="WgmmaPlan"/>): S = Q K^T and O += P V on <c>wgmma.mma_async</c> (the group's
/// 4 warps are one warpgroup), Q, K and V read by the tensor cores straight from shared memory through descriptors.
/// <para>
/// Shared-memory layout (no swizzle; PTX ISA "Shared memory matrix layout"; measured on the H200 by WgmmaProbeTests):
/// 8 x 8 core matrices of 8 rows x 16 bytes, 128 contiguous bytes each. Q (M = query rows) and K (N = keys) are
/// K-major (the head dimension contiguous): piece c (dimensions 8c .. 8c+7) of row n lies at byte
/// (n / 8) <see cref="CoreRowGroupBytes"/> + 128 c + 16 (n % 8), so the descriptor's leading byte offset (between the
/// two core matrices of a 16-wide k-slice) is 128 and its stride byte offset (between 8-row groups) 16 D bytes; slice
/// s starts 256 s bytes in. V (K = keys, N = the head dimension) is N-major (trans-b): for k-step ks (16 key slots),
/// piece c of key slot kk lies at byte 256 (D / 8) ks + 256 c + 128 (kk / 8) + 16 (kk % 8): leading byte offset
/// 128, stride 256. In every layout piece p of a tile sits at byte 16 p, so thread tid stages pieces 128 i + tid:
/// each quarter-warp writes 128 contiguous bytes (no bank conflict).
/// </para>
/// <para>
/// The key permutation of the mma plans holds: accumulator column 8j + c (n8-block j, column c: thread t holds
/// c = 2t, 2t+1) stands for key 16 (c / 2) + 2j + c % 2, so a thread's 16 scores of a row are 16 consecutive keys and
/// the generated elementwise code is the same; K rows are staged in that order, and V's key slots in the order of
/// the weights' A fragments (k-step ks, slot kk: key 16 ((kk % 8) / 2) + 4 ks + kk % 2 + 2 (kk / 8)).
/// </para>
/// <para>
/// Each product is one inline-PTX block (fence, the wgmma, commit, wait): S in one block (8 or 4 k-slices, both
/// operands by descriptor, the descriptors advanced by 256 bytes a slice), P V in blocks of two wgmma (A from the
/// weights' registers, m64n64: half of D = 128 each). Where there is no wgmma (the CPU accelerator) the same
/// products run as m16n8k16 mma (<see cref="Mma"/>, emulated) on fragments read from the same layouts.
/// </para>
/// </summary>
internal static partial class TensorCoreForwardKernel
{
    private const string ScoresBf16Wide =
        "{ .reg .b64 sbQ, sbK; .reg .pred sbZ, sbA; mov.b64 sbQ, {%32, %34}; mov.b64 sbK, {%33, %34}; setp.eq.b32 sbZ, %34, 0; setp.ne.b32 sbA, %34, 0; wgmma.fence.sync.aligned; wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, sbQ, sbK, sbZ, 1, 1, 0, 0; add.s64 sbQ, sbQ, 16; add.s64 sbK, sbK, 16; wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, sbQ, sbK, sbA, 1, 1, 0, 0; add.s64 sbQ, sbQ, 16; add.s64 sbK, sbK, 16; wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, sbQ, sbK, sbA, 1, 1, 0, 0; add.s64 sbQ, sbQ, 16; add.s64 sbK, sbK, 16; wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, sbQ, sbK, sbA, 1, 1, 0, 0; add.s64 sbQ, sbQ, 16; add.s64 sbK, sbK, 16; wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, sbQ, sbK, sbA, 1, 1, 0, 0; add.s64 sbQ, sbQ, 16; add.s64 sbK, sbK, 16; wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, sbQ, sbK, sbA, 1, 1, 0, 0; add.s64 sbQ, sbQ, 16; add.s64 sbK, sbK, 16; wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, sbQ, sbK, sbA, 1, 1, 0, 0; add.s64 sbQ, sbQ, 16; add.s64 sbK, sbK, 16; wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, sbQ, sbK, sbA, 1, 1, 0, 0; wgmma.commit_group.sync.aligned; wgmma.wait_group.sync.aligned 0; }";

    private const string ScoresBf16 =
        "{ .reg .b64 sbQ, sbK; .reg .pred sbZ, sbA; mov.b64 sbQ, {%32, %34}; mov.b64 sbK, {%33, %34}; setp.eq.b32 sbZ, %34, 0; setp.ne.b32 sbA, %34, 0; wgmma.fence.sync.aligned; wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, sbQ, sbK, sbZ, 1, 1, 0, 0; add.s64 sbQ, sbQ, 16; add.s64 sbK, sbK, 16; wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, sbQ, sbK, sbA, 1, 1, 0, 0; add.s64 sbQ, sbQ, 16; add.s64 sbK, sbK, 16; wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, sbQ, sbK, sbA, 1, 1, 0, 0; add.s64 sbQ, sbQ, 16; add.s64 sbK, sbK, 16; wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, sbQ, sbK, sbA, 1, 1, 0, 0; wgmma.commit_group.sync.aligned; wgmma.wait_group.sync.aligned 0; }";

    private const string ScoresFp16Wide =
        "{ .reg .b64 sbQ, sbK; .reg .pred sbZ, sbA; mov.b64 sbQ, {%32, %34}; mov.b64 sbK, {%33, %34}; setp.eq.b32 sbZ, %34, 0; setp.ne.b32 sbA, %34, 0; wgmma.fence.sync.aligned; wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, sbQ, sbK, sbZ, 1, 1, 0, 0; add.s64 sbQ, sbQ, 16; add.s64 sbK, sbK, 16; wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, sbQ, sbK, sbA, 1, 1, 0, 0; add.s64 sbQ, sbQ, 16; add.s64 sbK, sbK, 16; wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, sbQ, sbK, sbA, 1, 1, 0, 0; add.s64 sbQ, sbQ, 16; add.s64 sbK, sbK, 16; wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, sbQ, sbK, sbA, 1, 1, 0, 0; add.s64 sbQ, sbQ, 16; add.s64 sbK, sbK, 16; wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, sbQ, sbK, sbA, 1, 1, 0, 0; add.s64 sbQ, sbQ, 16; add.s64 sbK, sbK, 16; wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, sbQ, sbK, sbA, 1, 1, 0, 0; add.s64 sbQ, sbQ, 16; add.s64 sbK, sbK, 16; wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, sbQ, sbK, sbA, 1, 1, 0, 0; add.s64 sbQ, sbQ, 16; add.s64 sbK, sbK, 16; wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, sbQ, sbK, sbA, 1, 1, 0, 0; wgmma.commit_group.sync.aligned; wgmma.wait_group.sync.aligned 0; }";

    private const string ScoresFp16 =
        "{ .reg .b64 sbQ, sbK; .reg .pred sbZ, sbA; mov.b64 sbQ, {%32, %34}; mov.b64 sbK, {%33, %34}; setp.eq.b32 sbZ, %34, 0; setp.ne.b32 sbA, %34, 0; wgmma.fence.sync.aligned; wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, sbQ, sbK, sbZ, 1, 1, 0, 0; add.s64 sbQ, sbQ, 16; add.s64 sbK, sbK, 16; wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, sbQ, sbK, sbA, 1, 1, 0, 0; add.s64 sbQ, sbQ, 16; add.s64 sbK, sbK, 16; wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, sbQ, sbK, sbA, 1, 1, 0, 0; add.s64 sbQ, sbQ, 16; add.s64 sbK, sbK, 16; wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, sbQ, sbK, sbA, 1, 1, 0, 0; wgmma.commit_group.sync.aligned; wgmma.wait_group.sync.aligned 0; }";

    private const string OutputBf16 =
        "{ .reg .b64 sbV, sbW; .reg .pred sbA; mov.b64 sbV, {%40, %42}; mov.b64 sbW, {%41, %42}; setp.ne.b32 sbA, %42, 0; wgmma.fence.sync.aligned; wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, {%32,%33,%34,%35}, sbV, sbA, 1, 1, 1; wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, {%36,%37,%38,%39}, sbW, sbA, 1, 1, 1; wgmma.commit_group.sync.aligned; wgmma.wait_group.sync.aligned 0; }";

    private const string OutputFp16 =
        "{ .reg .b64 sbV, sbW; .reg .pred sbA; mov.b64 sbV, {%40, %42}; mov.b64 sbW, {%41, %42}; setp.ne.b32 sbA, %42, 0; wgmma.fence.sync.aligned; wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, {%32,%33,%34,%35}, sbV, sbA, 1, 1, 1; wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, {%36,%37,%38,%39}, sbW, sbA, 1, 1, 1; wgmma.commit_group.sync.aligned; wgmma.wait_group.sync.aligned 0; }";

    /// <summary>Bytes of one 8-row group of a K-major tile (Q or K): 16 D (the stride byte offset).</summary>
    private static int CoreRowGroupBytes(int D) => 2 * 8 * D;

    /// <summary>The base address of dynamic shared memory in the shared window (0 where there is none: emulation).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static uint SharedWindowBase()
    {
        if (!CudaAsm.IsSupported)
            return 0u;
        Ref<uint> sharedBase = 0u;
        CudaAsm.EmitRef("mov.u32 %0, __dyn_shared_alloca;", ref sharedBase);
        return sharedBase.Value;
    }

    /// <summary>The low word of a no-swizzle descriptor: start address / 16 (bits 0-13), leading byte offset 128 / 16 (bits 16-29).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static uint DescriptorLow(uint windowBase, int bytes) => (((windowBase + (uint)bytes) & 0x3FFFFu) >> 4) | ((128u >> 4) << 16);

    /// <summary>Orders this thread's shared-memory stores before the tensor cores' reads (the async proxy), ahead of the barrier.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void AsyncProxyFence()
    {
        if (CudaAsm.IsSupported)
            CudaAsm.Emit("fence.proxy.async.shared::cta;");
    }

    /// <summary>How a tile's pieces map to the core-matrix layouts (see <see cref="LoadCore"/>).</summary>
    private const int QueryRows = 0, KeyRows = 1, ValueSlots = 2;

    /// <summary>
    /// Loads this thread's pieces of a 64-row tile in a core-matrix layout: pass i (8 at D = 128, 4 at D = 64) takes piece
    /// p = 128 i + tid (stored at byte 16 p by <see cref="StoreCore"/>). K-major (<paramref name="layout"/> QueryRows or
    /// KeyRows): row slot n = 8 (p / D) + p % 8, dimensions 8c .. 8c+7 with c = (p / 8) % (D / 8); slot n holds row
    /// <paramref name="first"/> + n, or for KeyRows key first + 16 ((n % 8) / 2) + 2 (n / 8) + n % 2 (the key permutation).
    /// N-major (ValueSlots): key slot kk = p % 16 of k-step ks = p / (2 D), dimensions 8c .. 8c+7 with c = (p / 16) % (D / 8),
    /// holding key first + <see cref="CoreValueKey"/>. Rows at or past <paramref name="limit"/> are zeros.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Pieces8 LoadCore(ArrayView<U4> head, int token, int first, int limit, int D, int tid, int layout)
    {
        bool wide = D > 64;
        int chunkShift = wide ? 4 : 3;
        Pieces8 p;
        p.P0 = CorePiece(head, token, first, limit, 0 * 128 + tid, chunkShift, layout);
        p.P1 = CorePiece(head, token, first, limit, 1 * 128 + tid, chunkShift, layout);
        p.P2 = CorePiece(head, token, first, limit, 2 * 128 + tid, chunkShift, layout);
        p.P3 = CorePiece(head, token, first, limit, 3 * 128 + tid, chunkShift, layout);
        p.P4 = default; p.P5 = default; p.P6 = default; p.P7 = default;
        if (wide)
        {
            p.P4 = CorePiece(head, token, first, limit, 4 * 128 + tid, chunkShift, layout);
            p.P5 = CorePiece(head, token, first, limit, 5 * 128 + tid, chunkShift, layout);
            p.P6 = CorePiece(head, token, first, limit, 6 * 128 + tid, chunkShift, layout);
            p.P7 = CorePiece(head, token, first, limit, 7 * 128 + tid, chunkShift, layout);
        }
        return p;
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static U4 CorePiece(ArrayView<U4> head, int token, int first, int limit, int piece, int chunkShift, int layout)
    {
        int c, row;
        if (layout == ValueSlots)
        {
            c = (piece >> 4) & ((1 << chunkShift) - 1);
            row = first + CoreValueKey(piece, chunkShift);
        }
        else
        {
            int n = ((piece >> (3 + chunkShift)) << 3) + (piece & 7);
            c = (piece >> 3) & ((1 << chunkShift) - 1);
            row = first + (layout == KeyRows ? 16 * ((n & 7) >> 1) + 2 * (n >> 3) + (n & 1) : n);
        }
        bool active = row < limit;
        return Piece(head, c + (active ? row : 0) * token, active);
    }

    /// <summary>The key of V piece <paramref name="piece"/> of a tile starting at key 0 (see <see cref="LoadCore"/>).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static int CoreValueKey(int piece, int chunkShift)
    {
        int kk = piece & 15, ks = piece >> (4 + chunkShift);
        return 16 * ((kk & 7) >> 1) + 4 * ks + (kk & 1) + 2 * (kk >> 3);
    }

    /// <summary>Stores the pieces of <see cref="LoadCore"/>: piece 128 i + tid at vector <paramref name="at"/> + 128 i + tid.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void StoreCore(in Pieces8 p, ArrayView<U4> vectors, int at, int D, int tid) =>
        StoreStrided(p, vectors.SubView(at + tid), 128, D > 64);

    /// <summary>
    /// In the diagonal tile, V's non-finite values become zeros and the first key holding one (relative
    /// to the tile) is noted at <paramref name="flag"/>, with each column's first bad key (as <see cref="StoreTransposed"/>).
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void SanitizeCoreValues(ref Pieces8 p, ArrayView<uint> shared, int D, int tid, uint exponentMask, int flag)
    {
        int chunkShift = D > 64 ? 4 : 3;
        SanitizeCoreValue(ref p.P0, shared, 0 * 128 + tid, chunkShift, exponentMask, flag);
        SanitizeCoreValue(ref p.P1, shared, 1 * 128 + tid, chunkShift, exponentMask, flag);
        SanitizeCoreValue(ref p.P2, shared, 2 * 128 + tid, chunkShift, exponentMask, flag);
        SanitizeCoreValue(ref p.P3, shared, 3 * 128 + tid, chunkShift, exponentMask, flag);
        if (D > 64)
        {
            SanitizeCoreValue(ref p.P4, shared, 4 * 128 + tid, chunkShift, exponentMask, flag);
            SanitizeCoreValue(ref p.P5, shared, 5 * 128 + tid, chunkShift, exponentMask, flag);
            SanitizeCoreValue(ref p.P6, shared, 6 * 128 + tid, chunkShift, exponentMask, flag);
            SanitizeCoreValue(ref p.P7, shared, 7 * 128 + tid, chunkShift, exponentMask, flag);
        }
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void SanitizeCoreValue(ref U4 piece, ArrayView<uint> shared, int index, int chunkShift, uint exponentMask, int flag)
    {
        var original = piece;
        if (Sanitize(ref piece, exponentMask))
        {
            int key = CoreValueKey(index, chunkShift);
            Atomic.Min(ref shared[flag], (uint)key);
            NotePiece(shared, flag + 4, original, key, (index >> 4) & ((1 << chunkShift) - 1), exponentMask);
        }
    }

    /// <summary>
    /// S = Q K^T on the whole head dimension (<paramref name="qBytes"/>, <paramref name="kBytes"/>: the K-major Q and K
    /// tiles' byte offsets in dynamic shared memory): one wgmma per 16-wide k-slice, or the emulated m16n8k16 mma.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void WgmmaScores<TStorage>(ref Tile8 s, uint windowBase, int qBytes, int kBytes, int D, ArrayView<uint> shared, int emu)
        where TStorage : struct, IStorage
    {
        if (!CudaAsm.IsSupported)
        {
            EmulatedScores<TStorage>(ref s, qBytes, kBytes, D, shared, emu);
            return;
        }
        Ref<float> d0 = s.N0.C0, d1 = s.N0.C1, d2 = s.N0.C2, d3 = s.N0.C3;
        Ref<float> d4 = s.N1.C0, d5 = s.N1.C1, d6 = s.N1.C2, d7 = s.N1.C3;
        Ref<float> d8 = s.N2.C0, d9 = s.N2.C1, d10 = s.N2.C2, d11 = s.N2.C3;
        Ref<float> d12 = s.N3.C0, d13 = s.N3.C1, d14 = s.N3.C2, d15 = s.N3.C3;
        Ref<float> d16 = s.N4.C0, d17 = s.N4.C1, d18 = s.N4.C2, d19 = s.N4.C3;
        Ref<float> d20 = s.N5.C0, d21 = s.N5.C1, d22 = s.N5.C2, d23 = s.N5.C3;
        Ref<float> d24 = s.N6.C0, d25 = s.N6.C1, d26 = s.N6.C2, d27 = s.N6.C3;
        Ref<float> d28 = s.N7.C0, d29 = s.N7.C1, d30 = s.N7.C2, d31 = s.N7.C3;
        Input<uint> q = DescriptorLow(windowBase, qBytes), k = DescriptorLow(windowBase, kBytes), high = (uint)(CoreRowGroupBytes(D) >> 4);
        bool bf16 = default(TStorage).IsBFloat16;
        if (D > 64)
        {
            if (bf16)
                CudaAsm.EmitRef(ScoresBf16Wide, ref d0, ref d1, ref d2, ref d3, ref d4, ref d5, ref d6, ref d7, ref d8, ref d9, ref d10, ref d11, ref d12, ref d13, ref d14, ref d15, ref d16, ref d17, ref d18, ref d19, ref d20, ref d21, ref d22, ref d23, ref d24, ref d25, ref d26, ref d27, ref d28, ref d29, ref d30, ref d31, ref q, ref k, ref high);
            else
                CudaAsm.EmitRef(ScoresFp16Wide, ref d0, ref d1, ref d2, ref d3, ref d4, ref d5, ref d6, ref d7, ref d8, ref d9, ref d10, ref d11, ref d12, ref d13, ref d14, ref d15, ref d16, ref d17, ref d18, ref d19, ref d20, ref d21, ref d22, ref d23, ref d24, ref d25, ref d26, ref d27, ref d28, ref d29, ref d30, ref d31, ref q, ref k, ref high);
        }
        else
        {
            if (bf16)
                CudaAsm.EmitRef(ScoresBf16, ref d0, ref d1, ref d2, ref d3, ref d4, ref d5, ref d6, ref d7, ref d8, ref d9, ref d10, ref d11, ref d12, ref d13, ref d14, ref d15, ref d16, ref d17, ref d18, ref d19, ref d20, ref d21, ref d22, ref d23, ref d24, ref d25, ref d26, ref d27, ref d28, ref d29, ref d30, ref d31, ref q, ref k, ref high);
            else
                CudaAsm.EmitRef(ScoresFp16, ref d0, ref d1, ref d2, ref d3, ref d4, ref d5, ref d6, ref d7, ref d8, ref d9, ref d10, ref d11, ref d12, ref d13, ref d14, ref d15, ref d16, ref d17, ref d18, ref d19, ref d20, ref d21, ref d22, ref d23, ref d24, ref d25, ref d26, ref d27, ref d28, ref d29, ref d30, ref d31, ref q, ref k, ref high);
        }
        s.N0.C0 = d0.Value; s.N0.C1 = d1.Value; s.N0.C2 = d2.Value; s.N0.C3 = d3.Value;
        s.N1.C0 = d4.Value; s.N1.C1 = d5.Value; s.N1.C2 = d6.Value; s.N1.C3 = d7.Value;
        s.N2.C0 = d8.Value; s.N2.C1 = d9.Value; s.N2.C2 = d10.Value; s.N2.C3 = d11.Value;
        s.N3.C0 = d12.Value; s.N3.C1 = d13.Value; s.N3.C2 = d14.Value; s.N3.C3 = d15.Value;
        s.N4.C0 = d16.Value; s.N4.C1 = d17.Value; s.N4.C2 = d18.Value; s.N4.C3 = d19.Value;
        s.N5.C0 = d20.Value; s.N5.C1 = d21.Value; s.N5.C2 = d22.Value; s.N5.C3 = d23.Value;
        s.N6.C0 = d24.Value; s.N6.C1 = d25.Value; s.N6.C2 = d26.Value; s.N6.C3 = d27.Value;
        s.N7.C0 = d28.Value; s.N7.C1 = d29.Value; s.N7.C2 = d30.Value; s.N7.C3 = d31.Value;
    }

    /// <summary>
    /// O[:, 64 h .. 64 h + 63] (n-tiles <paramref name="n0"/> .. n7) += A1 V1 + A2 V2: two m64n64k16 wgmma, A from registers
    /// (<see cref="Frag16"/> k-steps), V by descriptor at bytes <paramref name="v1Bytes"/> and <paramref name="v2Bytes"/>.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void WgmmaOutputPair<TStorage>(ref Acc4 n0, ref Acc4 n1, ref Acc4 n2, ref Acc4 n3, ref Acc4 n4, ref Acc4 n5,
        ref Acc4 n6, ref Acc4 n7, uint a0, uint a1, uint a2, uint a3, uint b0, uint b1, uint b2, uint b3, uint windowBase,
        int v1Bytes, int v2Bytes, ArrayView<uint> shared, int emu) where TStorage : struct, IStorage
    {
        if (!CudaAsm.IsSupported)
        {
            EmulatedOutput<TStorage>(ref n0, ref n1, ref n2, ref n3, ref n4, ref n5, ref n6, ref n7, a0, a1, a2, a3, v1Bytes, shared, emu);
            EmulatedOutput<TStorage>(ref n0, ref n1, ref n2, ref n3, ref n4, ref n5, ref n6, ref n7, b0, b1, b2, b3, v2Bytes, shared, emu);
            return;
        }
        Ref<float> d0 = n0.C0, d1 = n0.C1, d2 = n0.C2, d3 = n0.C3;
        Ref<float> d4 = n1.C0, d5 = n1.C1, d6 = n1.C2, d7 = n1.C3;
        Ref<float> d8 = n2.C0, d9 = n2.C1, d10 = n2.C2, d11 = n2.C3;
        Ref<float> d12 = n3.C0, d13 = n3.C1, d14 = n3.C2, d15 = n3.C3;
        Ref<float> d16 = n4.C0, d17 = n4.C1, d18 = n4.C2, d19 = n4.C3;
        Ref<float> d20 = n5.C0, d21 = n5.C1, d22 = n5.C2, d23 = n5.C3;
        Ref<float> d24 = n6.C0, d25 = n6.C1, d26 = n6.C2, d27 = n6.C3;
        Ref<float> d28 = n7.C0, d29 = n7.C1, d30 = n7.C2, d31 = n7.C3;
        Input<uint> x0 = a0, x1 = a1, x2 = a2, x3 = a3, y0 = b0, y1 = b1, y2 = b2, y3 = b3;
        Input<uint> v1 = DescriptorLow(windowBase, v1Bytes), v2 = DescriptorLow(windowBase, v2Bytes), high = 256u >> 4;
        if (default(TStorage).IsBFloat16)
            CudaAsm.EmitRef(OutputBf16, ref d0, ref d1, ref d2, ref d3, ref d4, ref d5, ref d6, ref d7, ref d8, ref d9, ref d10, ref d11, ref d12, ref d13, ref d14, ref d15, ref d16, ref d17, ref d18, ref d19, ref d20, ref d21, ref d22, ref d23, ref d24, ref d25, ref d26, ref d27, ref d28, ref d29, ref d30, ref d31, ref x0, ref x1, ref x2, ref x3, ref y0, ref y1, ref y2, ref y3, ref v1, ref v2, ref high);
        else
            CudaAsm.EmitRef(OutputFp16, ref d0, ref d1, ref d2, ref d3, ref d4, ref d5, ref d6, ref d7, ref d8, ref d9, ref d10, ref d11, ref d12, ref d13, ref d14, ref d15, ref d16, ref d17, ref d18, ref d19, ref d20, ref d21, ref d22, ref d23, ref d24, ref d25, ref d26, ref d27, ref d28, ref d29, ref d30, ref d31, ref x0, ref x1, ref x2, ref x3, ref y0, ref y1, ref y2, ref y3, ref v1, ref v2, ref high);
        n0.C0 = d0.Value; n0.C1 = d1.Value; n0.C2 = d2.Value; n0.C3 = d3.Value;
        n1.C0 = d4.Value; n1.C1 = d5.Value; n1.C2 = d6.Value; n1.C3 = d7.Value;
        n2.C0 = d8.Value; n2.C1 = d9.Value; n2.C2 = d10.Value; n2.C3 = d11.Value;
        n3.C0 = d12.Value; n3.C1 = d13.Value; n3.C2 = d14.Value; n3.C3 = d15.Value;
        n4.C0 = d16.Value; n4.C1 = d17.Value; n4.C2 = d18.Value; n4.C3 = d19.Value;
        n5.C0 = d20.Value; n5.C1 = d21.Value; n5.C2 = d22.Value; n5.C3 = d23.Value;
        n6.C0 = d24.Value; n6.C1 = d25.Value; n6.C2 = d26.Value; n6.C3 = d27.Value;
        n7.C0 = d28.Value; n7.C1 = d29.Value; n7.C2 = d30.Value; n7.C3 = d31.Value;
    }

    /// <summary>
    /// O += P V for the whole tile (V in the N-major layout at <paramref name="vBytes"/>): <see cref="WgmmaOutputHalf"/>
    /// for columns 0 .. 63 and, at D = 128, 64 .. 127 (2048 bytes further in each k-step).
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void WgmmaOutput<TStorage>(ref Tile16 o, in Frag16 p, bool split, in Frag16 r, uint windowBase, int vBytes,
        bool wide, ArrayView<uint> shared, int emu) where TStorage : struct, IStorage
    {
        int step = wide ? 4096 : 2048;        // bytes per k-step (16 keys x D)
        WgmmaOutputHalf<TStorage>(ref o.N0, ref o.N1, ref o.N2, ref o.N3, ref o.N4, ref o.N5, ref o.N6, ref o.N7,
            p, split, r, windowBase, vBytes, step, shared, emu);
        if (wide)
        {
            WgmmaOutputHalf<TStorage>(ref o.N8, ref o.N9, ref o.N10, ref o.N11, ref o.N12, ref o.N13, ref o.N14, ref o.N15,
                p, split, r, windowBase, vBytes + 2048, step, shared, emu);
        }
    }

    /// <summary>
    /// One half of O += P V (n-tiles <paramref name="n0"/> .. n7, V's k-step ks at <paramref name="vBytes"/> + ks
    /// <paramref name="step"/>): rounded weights take k-steps (0, 1) and (2, 3) in pairs, split ones each k-step's high
    /// and low parts as a pair.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void WgmmaOutputHalf<TStorage>(ref Acc4 n0, ref Acc4 n1, ref Acc4 n2, ref Acc4 n3, ref Acc4 n4, ref Acc4 n5,
        ref Acc4 n6, ref Acc4 n7, in Frag16 p, bool split, in Frag16 r, uint windowBase, int vBytes, int step,
        ArrayView<uint> shared, int emu) where TStorage : struct, IStorage
    {
        if (split)
        {
            WgmmaOutputPair<TStorage>(ref n0, ref n1, ref n2, ref n3, ref n4, ref n5, ref n6, ref n7,
                p.K0A0, p.K0A1, p.K0A2, p.K0A3, r.K0A0, r.K0A1, r.K0A2, r.K0A3, windowBase, vBytes, vBytes, shared, emu);
            WgmmaOutputPair<TStorage>(ref n0, ref n1, ref n2, ref n3, ref n4, ref n5, ref n6, ref n7,
                p.K1A0, p.K1A1, p.K1A2, p.K1A3, r.K1A0, r.K1A1, r.K1A2, r.K1A3, windowBase, vBytes + step, vBytes + step, shared, emu);
            WgmmaOutputPair<TStorage>(ref n0, ref n1, ref n2, ref n3, ref n4, ref n5, ref n6, ref n7,
                p.K2A0, p.K2A1, p.K2A2, p.K2A3, r.K2A0, r.K2A1, r.K2A2, r.K2A3, windowBase, vBytes + 2 * step, vBytes + 2 * step, shared, emu);
            WgmmaOutputPair<TStorage>(ref n0, ref n1, ref n2, ref n3, ref n4, ref n5, ref n6, ref n7,
                p.K3A0, p.K3A1, p.K3A2, p.K3A3, r.K3A0, r.K3A1, r.K3A2, r.K3A3, windowBase, vBytes + 3 * step, vBytes + 3 * step, shared, emu);
        }
        else
        {
            WgmmaOutputPair<TStorage>(ref n0, ref n1, ref n2, ref n3, ref n4, ref n5, ref n6, ref n7,
                p.K0A0, p.K0A1, p.K0A2, p.K0A3, p.K1A0, p.K1A1, p.K1A2, p.K1A3, windowBase, vBytes, vBytes + step, shared, emu);
            WgmmaOutputPair<TStorage>(ref n0, ref n1, ref n2, ref n3, ref n4, ref n5, ref n6, ref n7,
                p.K2A0, p.K2A1, p.K2A2, p.K2A3, p.K3A0, p.K3A1, p.K3A2, p.K3A3, windowBase, vBytes + 2 * step, vBytes + 3 * step, shared, emu);
        }
    }

    /// <summary>The 32-bit word holding elements k, k + 1 of row <paramref name="row"/> of a K-major tile at <paramref name="bytes"/>.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static uint CoreWord(ArrayView<uint> shared, int bytes, int D, int row, int k) =>
        shared[(bytes + (row >> 3) * CoreRowGroupBytes(D) + (k >> 3) * 128 + (row & 7) * 16 + (k & 7) * 2) >> 2];

    /// <summary>S = Q K^T as m16n8k16 mma on fragments read from the K-major layouts (where there is no wgmma).</summary>
    private static void EmulatedScores<TStorage>(ref Tile8 s, int qBytes, int kBytes, int D, ArrayView<uint> shared, int emu)
        where TStorage : struct, IStorage
    {
        int lane = Warp.LaneIdx, warp = Group.IdxX >> 5, g = lane >> 2, t = lane & 3;
        int m = 16 * warp + g;
        s = default;
        for (int k = 0; k < D; k += 16)
        {
            uint a0 = CoreWord(shared, qBytes, D, m, k + 2 * t), a1 = CoreWord(shared, qBytes, D, m + 8, k + 2 * t);
            uint a2 = CoreWord(shared, qBytes, D, m, k + 2 * t + 8), a3 = CoreWord(shared, qBytes, D, m + 8, k + 2 * t + 8);
            Mma.Run<TStorage>(ref s.N0, a0, a1, a2, a3, CoreWord(shared, kBytes, D, 0 + g, k + 2 * t), CoreWord(shared, kBytes, D, 0 + g, k + 2 * t + 8), shared, emu);
            Mma.Run<TStorage>(ref s.N1, a0, a1, a2, a3, CoreWord(shared, kBytes, D, 8 + g, k + 2 * t), CoreWord(shared, kBytes, D, 8 + g, k + 2 * t + 8), shared, emu);
            Mma.Run<TStorage>(ref s.N2, a0, a1, a2, a3, CoreWord(shared, kBytes, D, 16 + g, k + 2 * t), CoreWord(shared, kBytes, D, 16 + g, k + 2 * t + 8), shared, emu);
            Mma.Run<TStorage>(ref s.N3, a0, a1, a2, a3, CoreWord(shared, kBytes, D, 24 + g, k + 2 * t), CoreWord(shared, kBytes, D, 24 + g, k + 2 * t + 8), shared, emu);
            Mma.Run<TStorage>(ref s.N4, a0, a1, a2, a3, CoreWord(shared, kBytes, D, 32 + g, k + 2 * t), CoreWord(shared, kBytes, D, 32 + g, k + 2 * t + 8), shared, emu);
            Mma.Run<TStorage>(ref s.N5, a0, a1, a2, a3, CoreWord(shared, kBytes, D, 40 + g, k + 2 * t), CoreWord(shared, kBytes, D, 40 + g, k + 2 * t + 8), shared, emu);
            Mma.Run<TStorage>(ref s.N6, a0, a1, a2, a3, CoreWord(shared, kBytes, D, 48 + g, k + 2 * t), CoreWord(shared, kBytes, D, 48 + g, k + 2 * t + 8), shared, emu);
            Mma.Run<TStorage>(ref s.N7, a0, a1, a2, a3, CoreWord(shared, kBytes, D, 56 + g, k + 2 * t), CoreWord(shared, kBytes, D, 56 + g, k + 2 * t + 8), shared, emu);
        }
    }

    /// <summary>
    /// The 16-bit pair (k, k + 1) x column <paramref name="n"/> of an N-major V k-step at <paramref name="bytes"/> (slot k
    /// in the low half), as the mma's B fragment word.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static uint ValuePair(ArrayView<uint> shared, int bytes, int k, int n)
    {
        int at = bytes + (n >> 3) * 256 + (k >> 3) * 128 + (k & 7) * 16 + (n & 7) * 2;
        uint lo = (shared[at >> 2] >> (8 * (at & 2))) & 0xFFFFu;
        uint hi = (shared[(at + 16) >> 2] >> (8 * (at & 2))) & 0xFFFFu;
        return lo | (hi << 16);
    }

    /// <summary>n-tiles n0 .. n7 (columns 8j + 2t of the half whose k-step is at <paramref name="vBytes"/>) += A V for one k-step, as m16n8k16 mma.</summary>
    private static void EmulatedOutput<TStorage>(ref Acc4 n0, ref Acc4 n1, ref Acc4 n2, ref Acc4 n3, ref Acc4 n4, ref Acc4 n5,
        ref Acc4 n6, ref Acc4 n7, uint a0, uint a1, uint a2, uint a3, int vBytes, ArrayView<uint> shared, int emu)
        where TStorage : struct, IStorage
    {
        int lane = Warp.LaneIdx, g = lane >> 2, t = lane & 3;
        int n = g;
        Mma.Run<TStorage>(ref n0, a0, a1, a2, a3, ValuePair(shared, vBytes, 2 * t, n), ValuePair(shared, vBytes, 2 * t + 8, n), shared, emu);
        Mma.Run<TStorage>(ref n1, a0, a1, a2, a3, ValuePair(shared, vBytes, 2 * t, n + 8), ValuePair(shared, vBytes, 2 * t + 8, n + 8), shared, emu);
        Mma.Run<TStorage>(ref n2, a0, a1, a2, a3, ValuePair(shared, vBytes, 2 * t, n + 16), ValuePair(shared, vBytes, 2 * t + 8, n + 16), shared, emu);
        Mma.Run<TStorage>(ref n3, a0, a1, a2, a3, ValuePair(shared, vBytes, 2 * t, n + 24), ValuePair(shared, vBytes, 2 * t + 8, n + 24), shared, emu);
        Mma.Run<TStorage>(ref n4, a0, a1, a2, a3, ValuePair(shared, vBytes, 2 * t, n + 32), ValuePair(shared, vBytes, 2 * t + 8, n + 32), shared, emu);
        Mma.Run<TStorage>(ref n5, a0, a1, a2, a3, ValuePair(shared, vBytes, 2 * t, n + 40), ValuePair(shared, vBytes, 2 * t + 8, n + 40), shared, emu);
        Mma.Run<TStorage>(ref n6, a0, a1, a2, a3, ValuePair(shared, vBytes, 2 * t, n + 48), ValuePair(shared, vBytes, 2 * t + 8, n + 48), shared, emu);
        Mma.Run<TStorage>(ref n7, a0, a1, a2, a3, ValuePair(shared, vBytes, 2 * t, n + 56), ValuePair(shared, vBytes, 2 * t + 8, n + 56), shared, emu);
    }
}
