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
/// The products accumulate in registers that only inline PTX names (<see cref="DeclareRegisters"/>): S is issued as one
/// block (8 or 4 k-slices, both operands by descriptor, advanced by 256 bytes a slice) and taken out by a wait
/// (<see cref="TakeScores"/>); P V is one block per tile (one wgmma per k-step of 16 keys, m64n128 at D = 128, A from the
/// weights' registers, V by descriptor) into O's registers, which are taken out once after the last tile
/// (<see cref="TakeOutput"/>). So no ILGPU register copy reads or writes an accumulator while the tensor cores run
/// (ptxas 12.4, sm_90a: no serialization warning, 168 registers, no spill). Tenth session, bf16 B=4 H=12 D=128: with
/// P V in blocks of two m64n64 wgmma, each waited for, and S and O copied through ILGPU's registers, 1.415 ms at
/// T = 4096; with one block and private accumulators, 1.332.
/// </para>
/// <para>
/// Staging: the diagonal (first) tile is loaded into registers, its V sanitized (non-finite values) and stored; every
/// later tile is full (all keys exist and are seen) and copied by <c>cp.async</c> while the tile before it is worked on:
/// its V into the second V buffer before this tile's S (<see cref="CoreValueOffset"/>: V alternates between two
/// buffers), its K into the one K buffer after the barrier that ends every warp's S, both waited for at the tile's end
/// (<see cref="StageCore"/>): 1.280 ms at T = 4096. Where the time goes (tenth session, T = 4096 / 8192, forward
/// alone): without the copies of the later tiles 0.616 / 2.31 ms against 1.301 / 5.01; without the off-diagonal
/// elementwise work 1.330 / 5.08; without the off-diagonal S 1.262 / 4.99. The staging of K and V (32 KB a tile for 64
/// query rows) decides the speed, not the per-score work.
/// </para>
/// <para>
/// Two warpgroups a group (<see cref="WgmmaTwoWarpgroupsPlan"/>, the library's choice at D = 128 from
/// <c>KernelSet.TwoWarpgroupsFromLength</c> on): warpgroup wg takes rows 64 wg .. 64 wg + 63 of a 128-row block and
/// walks the tiles from its own diagonal one down; both read every K / V tile the first stages, so a tile staged once
/// serves 128 rows (half the bytes a score). The block's top two tiles hold keys that some of its rows do not see: they
/// are loaded through registers and sanitized, and the first-bad-key flags are relative to the block's first row.
/// 256 threads, 246 registers (the driver; ptxas 12.4: 254, no spill), 87 KB, one group per SM. Eleventh session, bf16 B=4 H=12
/// D=128, forward alone, one call: 1.169 / 4.062 / 15.39 ms against one warpgroup's 1.303 / 4.697 / 18.14 at T = 4096 /
/// 8192 / 16384; at T = 1024 0.169 against 0.147, at D = 64 (H=16, T=4096) 1.147 against 0.958. Tried, not kept: three
/// warpgroups (384 threads, 168 registers, 128 bytes of spill: 1.538 / 4.937 / 18.23 ms), a second K buffer so that K
/// is copied with V before S (4.196 against 4.062 at T = 8192), launches in chunks of 2 or 8 heads
/// rather than 4 (with the second K buffer: 4.209 / 4.190 against 4.196 and 4.205 ms at T = 8192, 16.01 / 16.04 against
/// 15.85 and 15.89 at 16384).
/// </para>
/// <para>
/// Where there is no wgmma (the CPU accelerator) the same products run as m16n8k16 mma (<see cref="Mma"/>, emulated)
/// on fragments read from the same layouts, and the tiles are loaded and stored at once.
/// </para>
/// </summary>
internal static partial class TensorCoreForwardKernel
{
    /// <summary>
    /// The accumulators of both products, declared once at the kernel's top (<see cref="DeclareWgmmaRegisters"/>) and named
    /// only by inline PTX: the score registers sbS (S, 32 fp32 registers of the warpgroup's m64n64 tile), written by the
    /// wgmma of S and copied out by <see cref="TakeScores"/> after its wait, and the output registers sbO (O, 64 at
    /// D = 128), zeroed here, accumulated by the wgmma of P V over all tiles and copied out once by <see cref="TakeOutput"/>.
    /// So no other instruction touches them while the tensor cores run (ptxas serializes the wgmma of a stage whose
    /// accumulators are read before its wait, C7514), and the P V blocks need no accumulator operands (ILGPU's inline
    /// PTX takes at most 44), nor copies in and out.
    /// </summary>
    private const string DeclareRegisters = ".reg .f32 sbS<32>; .reg .f32 sbO<64>; mov.f32 sbO0, 0f00000000; mov.f32 sbO1, 0f00000000; mov.f32 sbO2, 0f00000000; mov.f32 sbO3, 0f00000000; mov.f32 sbO4, 0f00000000; mov.f32 sbO5, 0f00000000; mov.f32 sbO6, 0f00000000; mov.f32 sbO7, 0f00000000; mov.f32 sbO8, 0f00000000; mov.f32 sbO9, 0f00000000; mov.f32 sbO10, 0f00000000; mov.f32 sbO11, 0f00000000; mov.f32 sbO12, 0f00000000; mov.f32 sbO13, 0f00000000; mov.f32 sbO14, 0f00000000; mov.f32 sbO15, 0f00000000; mov.f32 sbO16, 0f00000000; mov.f32 sbO17, 0f00000000; mov.f32 sbO18, 0f00000000; mov.f32 sbO19, 0f00000000; mov.f32 sbO20, 0f00000000; mov.f32 sbO21, 0f00000000; mov.f32 sbO22, 0f00000000; mov.f32 sbO23, 0f00000000; mov.f32 sbO24, 0f00000000; mov.f32 sbO25, 0f00000000; mov.f32 sbO26, 0f00000000; mov.f32 sbO27, 0f00000000; mov.f32 sbO28, 0f00000000; mov.f32 sbO29, 0f00000000; mov.f32 sbO30, 0f00000000; mov.f32 sbO31, 0f00000000; mov.f32 sbO32, 0f00000000; mov.f32 sbO33, 0f00000000; mov.f32 sbO34, 0f00000000; mov.f32 sbO35, 0f00000000; mov.f32 sbO36, 0f00000000; mov.f32 sbO37, 0f00000000; mov.f32 sbO38, 0f00000000; mov.f32 sbO39, 0f00000000; mov.f32 sbO40, 0f00000000; mov.f32 sbO41, 0f00000000; mov.f32 sbO42, 0f00000000; mov.f32 sbO43, 0f00000000; mov.f32 sbO44, 0f00000000; mov.f32 sbO45, 0f00000000; mov.f32 sbO46, 0f00000000; mov.f32 sbO47, 0f00000000; mov.f32 sbO48, 0f00000000; mov.f32 sbO49, 0f00000000; mov.f32 sbO50, 0f00000000; mov.f32 sbO51, 0f00000000; mov.f32 sbO52, 0f00000000; mov.f32 sbO53, 0f00000000; mov.f32 sbO54, 0f00000000; mov.f32 sbO55, 0f00000000; mov.f32 sbO56, 0f00000000; mov.f32 sbO57, 0f00000000; mov.f32 sbO58, 0f00000000; mov.f32 sbO59, 0f00000000; mov.f32 sbO60, 0f00000000; mov.f32 sbO61, 0f00000000; mov.f32 sbO62, 0f00000000; mov.f32 sbO63, 0f00000000;";

    /// <summary>The score registers as a wgmma accumulator operand.</summary>
    private const string ScoreRegisters = "{sbS0,sbS1,sbS2,sbS3,sbS4,sbS5,sbS6,sbS7,sbS8,sbS9,sbS10,sbS11,sbS12,sbS13,sbS14,sbS15,sbS16,sbS17,sbS18,sbS19,sbS20,sbS21,sbS22,sbS23,sbS24,sbS25,sbS26,sbS27,sbS28,sbS29,sbS30,sbS31}";
    /// <summary>O's registers as a wgmma accumulator operand: columns 0 .. 63 (m64n64, D = 64), or all 128 (m64n128).</summary>
    private const string OutputRegisters = "{sbO0,sbO1,sbO2,sbO3,sbO4,sbO5,sbO6,sbO7,sbO8,sbO9,sbO10,sbO11,sbO12,sbO13,sbO14,sbO15,sbO16,sbO17,sbO18,sbO19,sbO20,sbO21,sbO22,sbO23,sbO24,sbO25,sbO26,sbO27,sbO28,sbO29,sbO30,sbO31}";
    private const string OutputRegistersWide = "{sbO0,sbO1,sbO2,sbO3,sbO4,sbO5,sbO6,sbO7,sbO8,sbO9,sbO10,sbO11,sbO12,sbO13,sbO14,sbO15,sbO16,sbO17,sbO18,sbO19,sbO20,sbO21,sbO22,sbO23,sbO24,sbO25,sbO26,sbO27,sbO28,sbO29,sbO30,sbO31,sbO32,sbO33,sbO34,sbO35,sbO36,sbO37,sbO38,sbO39,sbO40,sbO41,sbO42,sbO43,sbO44,sbO45,sbO46,sbO47,sbO48,sbO49,sbO50,sbO51,sbO52,sbO53,sbO54,sbO55,sbO56,sbO57,sbO58,sbO59,sbO60,sbO61,sbO62,sbO63}";

    // S = Q K^T into the score registers, issued and committed, not waited for: %0 and %1 the Q and K descriptors' low
    // words, %2 their high word (the stride byte offset). The first k-slice overwrites S (scale-d 0, an immediate: a
    // predicate known only at run time makes ptxas treat the registers as read before their first write, and
    // serialize, C7515), the others accumulate; the descriptors move 256 bytes (16 bytes once shifted) a k-slice.
    // 8 k-slices at D = 128, 4 at D = 64; bf16 or fp16 products.
    private const string IssueBegin = "{ .reg .b64 sbQ, sbK; mov.b64 sbQ, {%0, %2}; mov.b64 sbK, {%1, %2}; wgmma.fence.sync.aligned; ";
    private const string IssueEnd = "wgmma.commit_group.sync.aligned; }";
    private const string NextSlice = "add.s64 sbQ, sbQ, 16; add.s64 sbK, sbK, 16; ";
    private const string ScoresBf16 = "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " + ScoreRegisters + ", sbQ, sbK, ";
    private const string ScoresFp16 = "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 " + ScoreRegisters + ", sbQ, sbK, ";
    private const string Overwrite = "0, 1, 1, 0, 0; ", Accumulate = "1, 1, 1, 0, 0; ";
    private const string FourSlicesBf16 = ScoresBf16 + Overwrite + NextSlice + ScoresBf16 + Accumulate + NextSlice + ScoresBf16 + Accumulate
        + NextSlice + ScoresBf16 + Accumulate;
    private const string FourSlicesFp16 = ScoresFp16 + Overwrite + NextSlice + ScoresFp16 + Accumulate + NextSlice + ScoresFp16 + Accumulate
        + NextSlice + ScoresFp16 + Accumulate;
    private const string IssueScoresBf16 = IssueBegin + FourSlicesBf16 + IssueEnd;
    private const string IssueScoresFp16 = IssueBegin + FourSlicesFp16 + IssueEnd;
    private const string IssueScoresBf16Wide = IssueBegin + FourSlicesBf16 + NextSlice + ScoresBf16 + Accumulate + NextSlice + ScoresBf16
        + Accumulate + NextSlice + ScoresBf16 + Accumulate + NextSlice + ScoresBf16 + Accumulate + IssueEnd;
    private const string IssueScoresFp16Wide = IssueBegin + FourSlicesFp16 + NextSlice + ScoresFp16 + Accumulate + NextSlice + ScoresFp16
        + Accumulate + NextSlice + ScoresFp16 + Accumulate + NextSlice + ScoresFp16 + Accumulate + IssueEnd;

    // Waits for every committed wgmma of this warpgroup, then copies S out of the score registers.
    private const string TakeScoresPtx =
        "{ wgmma.wait_group.sync.aligned 0; mov.b32 %0, sbS0; mov.b32 %1, sbS1; mov.b32 %2, sbS2; mov.b32 %3, sbS3; mov.b32 %4, sbS4; mov.b32 %5, sbS5; mov.b32 %6, sbS6; mov.b32 %7, sbS7; mov.b32 %8, sbS8; mov.b32 %9, sbS9; mov.b32 %10, sbS10; mov.b32 %11, sbS11; mov.b32 %12, sbS12; mov.b32 %13, sbS13; mov.b32 %14, sbS14; mov.b32 %15, sbS15; mov.b32 %16, sbS16; mov.b32 %17, sbS17; mov.b32 %18, sbS18; mov.b32 %19, sbS19; mov.b32 %20, sbS20; mov.b32 %21, sbS21; mov.b32 %22, sbS22; mov.b32 %23, sbS23; mov.b32 %24, sbS24; mov.b32 %25, sbS25; mov.b32 %26, sbS26; mov.b32 %27, sbS27; mov.b32 %28, sbS28; mov.b32 %29, sbS29; mov.b32 %30, sbS30; mov.b32 %31, sbS31; }";

    // O += P V for a whole tile into the output registers sbO (zeroed where they are declared; only wgmma touch them
    // until TakeOutput): one wgmma per k-step of 16 keys (m64n128 at D = 128, m64n64 at D = 64), A from the weights'
    // registers (A0 .. A7: %0 ..: k-step ks at A(ks), or with split weights its high part at A(2 ks) and its low part at
    // A(2 ks + 1)), V by descriptor (the last two operands: low and high word), advanced by one k-step (16 D bytes:
    // 4096 or 2048 bytes, 256 or 128 once shifted) each; one wait.
    private const string OutputBegin = "{ .reg .b64 sbV; mov.b64 sbV, {%16, %17}; wgmma.fence.sync.aligned; ";
    private const string OutputBeginSplit = "{ .reg .b64 sbV; mov.b64 sbV, {%32, %33}; wgmma.fence.sync.aligned; ";
    private const string OutputEnd = "wgmma.commit_group.sync.aligned; wgmma.wait_group.sync.aligned 0; }";
    private const string FromV = ", sbV, 1, 1, 1, 1; ";
    private const string NextStep = "add.s64 sbV, sbV, 128; ", NextStepWide = "add.s64 sbV, sbV, 256; ";
    private const string A0 = "{%0,%1,%2,%3}", A1 = "{%4,%5,%6,%7}", A2 = "{%8,%9,%10,%11}", A3 = "{%12,%13,%14,%15}";
    private const string A4 = "{%16,%17,%18,%19}", A5 = "{%20,%21,%22,%23}", A6 = "{%24,%25,%26,%27}", A7 = "{%28,%29,%30,%31}";
    private const string PvBf16 = "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " + OutputRegisters + ", ";
    private const string PvBf16Wide = "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " + OutputRegistersWide + ", ";
    private const string PvFp16 = "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 " + OutputRegisters + ", ";
    private const string PvFp16Wide = "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 " + OutputRegistersWide + ", ";
    private const string OutputBf16 = OutputBegin + PvBf16 + A0 + FromV + NextStep + PvBf16 + A1 + FromV + NextStep + PvBf16 + A2 + FromV
        + NextStep + PvBf16 + A3 + FromV + OutputEnd;
    private const string OutputBf16Wide = OutputBegin + PvBf16Wide + A0 + FromV + NextStepWide + PvBf16Wide + A1 + FromV + NextStepWide
        + PvBf16Wide + A2 + FromV + NextStepWide + PvBf16Wide + A3 + FromV + OutputEnd;
    private const string OutputFp16 = OutputBegin + PvFp16 + A0 + FromV + NextStep + PvFp16 + A1 + FromV + NextStep + PvFp16 + A2 + FromV
        + NextStep + PvFp16 + A3 + FromV + OutputEnd;
    private const string OutputFp16Wide = OutputBegin + PvFp16Wide + A0 + FromV + NextStepWide + PvFp16Wide + A1 + FromV + NextStepWide
        + PvFp16Wide + A2 + FromV + NextStepWide + PvFp16Wide + A3 + FromV + OutputEnd;
    private const string OutputBf16Split = OutputBeginSplit + PvBf16 + A0 + FromV + PvBf16 + A1 + FromV + NextStep + PvBf16 + A2 + FromV
        + PvBf16 + A3 + FromV + NextStep + PvBf16 + A4 + FromV + PvBf16 + A5 + FromV + NextStep + PvBf16 + A6 + FromV + PvBf16 + A7 + FromV
        + OutputEnd;
    private const string OutputBf16WideSplit = OutputBeginSplit + PvBf16Wide + A0 + FromV + PvBf16Wide + A1 + FromV + NextStepWide
        + PvBf16Wide + A2 + FromV + PvBf16Wide + A3 + FromV + NextStepWide + PvBf16Wide + A4 + FromV + PvBf16Wide + A5 + FromV
        + NextStepWide + PvBf16Wide + A6 + FromV + PvBf16Wide + A7 + FromV + OutputEnd;
    private const string OutputFp16Split = OutputBeginSplit + PvFp16 + A0 + FromV + PvFp16 + A1 + FromV + NextStep + PvFp16 + A2 + FromV
        + PvFp16 + A3 + FromV + NextStep + PvFp16 + A4 + FromV + PvFp16 + A5 + FromV + NextStep + PvFp16 + A6 + FromV + PvFp16 + A7 + FromV
        + OutputEnd;
    private const string OutputFp16WideSplit = OutputBeginSplit + PvFp16Wide + A0 + FromV + PvFp16Wide + A1 + FromV + NextStepWide
        + PvFp16Wide + A2 + FromV + PvFp16Wide + A3 + FromV + NextStepWide + PvFp16Wide + A4 + FromV + PvFp16Wide + A5 + FromV
        + NextStepWide + PvFp16Wide + A6 + FromV + PvFp16Wide + A7 + FromV + OutputEnd;

    // Waits for every committed wgmma, then copies columns 0 .. 63 of O out of the output registers.
    private const string TakeOutputLow =
        "{ wgmma.wait_group.sync.aligned 0; mov.b32 %0, sbO0; mov.b32 %1, sbO1; mov.b32 %2, sbO2; mov.b32 %3, sbO3; mov.b32 %4, sbO4; mov.b32 %5, sbO5; mov.b32 %6, sbO6; mov.b32 %7, sbO7; mov.b32 %8, sbO8; mov.b32 %9, sbO9; mov.b32 %10, sbO10; mov.b32 %11, sbO11; mov.b32 %12, sbO12; mov.b32 %13, sbO13; mov.b32 %14, sbO14; mov.b32 %15, sbO15; mov.b32 %16, sbO16; mov.b32 %17, sbO17; mov.b32 %18, sbO18; mov.b32 %19, sbO19; mov.b32 %20, sbO20; mov.b32 %21, sbO21; mov.b32 %22, sbO22; mov.b32 %23, sbO23; mov.b32 %24, sbO24; mov.b32 %25, sbO25; mov.b32 %26, sbO26; mov.b32 %27, sbO27; mov.b32 %28, sbO28; mov.b32 %29, sbO29; mov.b32 %30, sbO30; mov.b32 %31, sbO31; }";

    // Waits for every committed wgmma, then copies columns 64 .. 127 of O out of the output registers.
    private const string TakeOutputHigh =
        "{ wgmma.wait_group.sync.aligned 0; mov.b32 %0, sbO32; mov.b32 %1, sbO33; mov.b32 %2, sbO34; mov.b32 %3, sbO35; mov.b32 %4, sbO36; mov.b32 %5, sbO37; mov.b32 %6, sbO38; mov.b32 %7, sbO39; mov.b32 %8, sbO40; mov.b32 %9, sbO41; mov.b32 %10, sbO42; mov.b32 %11, sbO43; mov.b32 %12, sbO44; mov.b32 %13, sbO45; mov.b32 %14, sbO46; mov.b32 %15, sbO47; mov.b32 %16, sbO48; mov.b32 %17, sbO49; mov.b32 %18, sbO50; mov.b32 %19, sbO51; mov.b32 %20, sbO52; mov.b32 %21, sbO53; mov.b32 %22, sbO54; mov.b32 %23, sbO55; mov.b32 %24, sbO56; mov.b32 %25, sbO57; mov.b32 %26, sbO58; mov.b32 %27, sbO59; mov.b32 %28, sbO60; mov.b32 %29, sbO61; mov.b32 %30, sbO62; mov.b32 %31, sbO63; }";

    // A full tile's pieces 128 i + tid (i < 8 at D = 128, 4 at D = 64) of this thread by cp.async, 16 bytes each, from the
    // device address {%1, %3} of piece 0 to byte %0 of dynamic shared memory and on by 2048 bytes a piece; %2 the row stride
    // in 16-byte pieces. From one piece to the next the source moves by sbA (after even pieces) or sbB (after odd ones):
    // K rows (the key permutation) 2 rows at D = 128, 4 at D = 64; V key slots at D = 128 alternately the next 8 columns
    // (128 bytes) and 4 keys on, 8 columns back; at D = 64, 4 keys on (see LoadCore).
    private const string CopyBegin = "{ .reg .b32 sbD; .reg .b64 sbG, sbA, sbB; mov.u32 sbD, __dyn_shared_alloca; add.u32 sbD, sbD, %0; mov.b64 sbG, {%1, %3}; ";
    private const string Copy = "cp.async.cg.shared.global [sbD], [sbG], 16; ";
    private const string StepA = "add.s64 sbG, sbG, sbA; add.u32 sbD, sbD, 2048; ", StepB = "add.s64 sbG, sbG, sbB; add.u32 sbD, sbD, 2048; ";
    private const string FourCopies = Copy + StepA + Copy + StepB + Copy + StepA + Copy;
    private const string EightCopies = FourCopies + StepB + FourCopies;
    private const string CopyKeyRowsWide = CopyBegin + "mul.wide.u32 sbA, %2, 32; mov.b64 sbB, sbA; " + EightCopies + "}";
    private const string CopyKeyRows = CopyBegin + "mul.wide.u32 sbA, %2, 64; mov.b64 sbB, sbA; " + FourCopies + "}";
    private const string CopyValueSlotsWide = CopyBegin + "mov.b64 sbA, 128; mul.wide.u32 sbB, %2, 64; sub.s64 sbB, sbB, 128; " + EightCopies + "}";
    private const string CopyValueSlots = CopyBegin + "mul.wide.u32 sbA, %2, 64; mov.b64 sbB, sbA; " + FourCopies + "}";

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
        CorePlace(first, piece, chunkShift, layout, out int row, out int c);
        bool active = row < limit;
        return Piece(head, c + (active ? row : 0) * token, active);
    }

    /// <summary>Where piece <paramref name="piece"/> of a tile at key <paramref name="first"/> comes from: its row and its 16-byte piece c of the row (see <see cref="LoadCore"/>).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void CorePlace(int first, int piece, int chunkShift, int layout, out int row, out int c)
    {
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
    /// Stages a full tile (every key before the diagonal tile: all exist and are seen) at key <paramref name="first"/> in
    /// a core-matrix layout at word <paramref name="words"/>: this thread's pieces as <see cref="LoadCore"/> takes them.
    /// On CUDA by <c>cp.async</c> from the head's device address <paramref name="address"/>, one inline-PTX block that walks
    /// the pieces from the first one's addresses (no registers held over the tile; committed by
    /// <see cref="CommitCopies"/>, waited for by <see cref="WaitCopies"/>); elsewhere loaded from
    /// <paramref name="head"/> and stored at once.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void StageCore(ArrayView<U4> head, long address, int token, int first, int D, int tid, int layout, int words,
        ArrayView<U4> vectors)
    {
        if (!CudaAsm.IsSupported)
        {
            StoreCore(LoadCore(head, token, first, int.MaxValue, D, tid, layout), vectors, words / 4, D, tid);
            return;
        }
        int chunkShift = D > 64 ? 4 : 3;
        CorePlace(first, tid, chunkShift, layout, out int row, out int c);
        Input<uint> to = (uint)(4 * words + 16 * tid), pieces = (uint)token;
        long at = address + 16L * (c + (long)row * token);
        // The address as two 32-bit operands: ILGPU passes each operand through a local slot, and the loader turns only
        // 4-byte slots into registers (PtxOperandSlots).
        Input<uint> atLow = (uint)at, atHigh = (uint)(at >> 32);
        if (layout == ValueSlots)
        {
            if (D > 64)
                CudaAsm.EmitRef(CopyValueSlotsWide, ref to, ref atLow, ref pieces, ref atHigh);
            else
                CudaAsm.EmitRef(CopyValueSlots, ref to, ref atLow, ref pieces, ref atHigh);
        }
        else
        {
            if (D > 64)
                CudaAsm.EmitRef(CopyKeyRowsWide, ref to, ref atLow, ref pieces, ref atHigh);
            else
                CudaAsm.EmitRef(CopyKeyRows, ref to, ref atLow, ref pieces, ref atHigh);
        }
    }

    /// <summary>
    /// A top tile of a block of several warpgroups (keys that some of its rows do not see) through registers one piece at a
    /// time (few registers: the group's O is live here), as <see cref="LoadCore"/> and <see cref="StoreCore"/> take them;
    /// V (<paramref name="layout"/> ValueSlots) sanitized as <see cref="SanitizeCoreValues"/> does.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void StagePieces(ArrayView<U4> head, int token, int first, int limit, int D, int tid, int layout, int words,
        ArrayView<U4> vectors, ArrayView<uint> shared, uint exponentMask, int flag, int keyBase)
    {
        int chunkShift = D > 64 ? 4 : 3;
        int pieces = D > 64 ? 8 : 4;
        for (int i = 0; i < pieces; i++)
        {
            var piece = CorePiece(head, token, first, limit, 128 * i + tid, chunkShift, layout);
            if (layout == ValueSlots)
                SanitizeCoreValue(ref piece, shared, 128 * i + tid, chunkShift, exponentMask, flag, keyBase);
            vectors[words / 4 + 128 * i + tid] = piece;
        }
    }

    /// <summary>
    /// In the block's top tiles (the diagonal one of each warpgroup), V's non-finite values become zeros and the first key
    /// holding one (relative to the block's first row: <paramref name="keyBase"/> is the tile's first key relative to it) is
    /// noted at <paramref name="flag"/>, with each column's first bad key (as <see cref="StoreTransposed"/>).
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void SanitizeCoreValues(ref Pieces8 p, ArrayView<uint> shared, int D, int tid, uint exponentMask, int flag, int keyBase)
    {
        int chunkShift = D > 64 ? 4 : 3;
        SanitizeCoreValue(ref p.P0, shared, 0 * 128 + tid, chunkShift, exponentMask, flag, keyBase);
        SanitizeCoreValue(ref p.P1, shared, 1 * 128 + tid, chunkShift, exponentMask, flag, keyBase);
        SanitizeCoreValue(ref p.P2, shared, 2 * 128 + tid, chunkShift, exponentMask, flag, keyBase);
        SanitizeCoreValue(ref p.P3, shared, 3 * 128 + tid, chunkShift, exponentMask, flag, keyBase);
        if (D > 64)
        {
            SanitizeCoreValue(ref p.P4, shared, 4 * 128 + tid, chunkShift, exponentMask, flag, keyBase);
            SanitizeCoreValue(ref p.P5, shared, 5 * 128 + tid, chunkShift, exponentMask, flag, keyBase);
            SanitizeCoreValue(ref p.P6, shared, 6 * 128 + tid, chunkShift, exponentMask, flag, keyBase);
            SanitizeCoreValue(ref p.P7, shared, 7 * 128 + tid, chunkShift, exponentMask, flag, keyBase);
        }
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void SanitizeCoreValue(ref U4 piece, ArrayView<uint> shared, int index, int chunkShift, uint exponentMask, int flag, int keyBase)
    {
        var original = piece;
        if (Sanitize(ref piece, exponentMask))
        {
            int key = keyBase + CoreValueKey(index, chunkShift);
            Atomic.Min(ref shared[flag], (uint)key);
            NotePiece(shared, flag + 4, original, key, (index >> 4) & ((1 << chunkShift) - 1), exponentMask);
        }
    }

    /// <summary>Declares the accumulator registers (<see cref="DeclareRegisters"/>) on CUDA; once, at the kernel's top.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void DeclareWgmmaRegisters()
    {
        if (CudaAsm.IsSupported)
            CudaAsm.Emit(DeclareRegisters);
    }

    /// <summary>
    /// Issues S = Q K^T on the whole head dimension (<paramref name="qBytes"/>, <paramref name="kBytes"/>: the K-major Q
    /// and K tiles' byte offsets in dynamic shared memory), one wgmma per 16-wide k-slice into the score registers,
    /// committed and not waited for: <see cref="TakeScores"/> completes it into <paramref name="s"/>. Where there is no
    /// wgmma (the CPU accelerator) the emulated m16n8k16 mma computes <paramref name="s"/> here.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void IssueScores<TStorage>(ref Tile8 s, uint windowBase, int qBytes, int kBytes, int D,
        ArrayView<uint> shared, int emu)
        where TStorage : struct, IStorage
    {
        if (!CudaAsm.IsSupported)
        {
            EmulatedScores<TStorage>(ref s, qBytes, kBytes, D, shared, emu);
            return;
        }
        Input<uint> q = DescriptorLow(windowBase, qBytes), k = DescriptorLow(windowBase, kBytes), high = (uint)(CoreRowGroupBytes(D) >> 4);
        if (default(TStorage).IsBFloat16)
        {
            if (D > 64)
                CudaAsm.EmitRef(IssueScoresBf16Wide, ref q, ref k, ref high);
            else
                CudaAsm.EmitRef(IssueScoresBf16, ref q, ref k, ref high);
        }
        else
        {
            if (D > 64)
                CudaAsm.EmitRef(IssueScoresFp16Wide, ref q, ref k, ref high);
            else
                CudaAsm.EmitRef(IssueScoresFp16, ref q, ref k, ref high);
        }
    }

    /// <summary>
    /// Waits for this warpgroup's committed wgmma (the issued S and any product issued after it) and copies S into
    /// <paramref name="s"/>; nothing to do where the products are emulated (<see cref="IssueScores"/> wrote it).
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void TakeScores(ref Tile8 s)
    {
        if (!CudaAsm.IsSupported)
            return;
        Ref<float> d0 = 0f, d1 = 0f, d2 = 0f, d3 = 0f;
        Ref<float> d4 = 0f, d5 = 0f, d6 = 0f, d7 = 0f;
        Ref<float> d8 = 0f, d9 = 0f, d10 = 0f, d11 = 0f;
        Ref<float> d12 = 0f, d13 = 0f, d14 = 0f, d15 = 0f;
        Ref<float> d16 = 0f, d17 = 0f, d18 = 0f, d19 = 0f;
        Ref<float> d20 = 0f, d21 = 0f, d22 = 0f, d23 = 0f;
        Ref<float> d24 = 0f, d25 = 0f, d26 = 0f, d27 = 0f;
        Ref<float> d28 = 0f, d29 = 0f, d30 = 0f, d31 = 0f;
        CudaAsm.EmitRef(TakeScoresPtx, ref d0, ref d1, ref d2, ref d3, ref d4, ref d5, ref d6, ref d7, ref d8, ref d9, ref d10, ref d11, ref d12, ref d13, ref d14, ref d15, ref d16, ref d17, ref d18, ref d19, ref d20, ref d21, ref d22, ref d23, ref d24, ref d25, ref d26, ref d27, ref d28, ref d29, ref d30, ref d31);
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
    /// O += P V for the whole tile (V in the N-major layout at <paramref name="vBytes"/>; with <paramref name="split"/> the
    /// weights' high parts <paramref name="p"/> and low parts <paramref name="r"/>): on CUDA one block of wgmma into the
    /// output registers (O stays there until <see cref="TakeOutput"/>; <paramref name="o"/> is not touched), waited for;
    /// where the products are emulated, m16n8k16 mma on <paramref name="o"/> for columns 0 .. 63 and, at D = 128,
    /// 64 .. 127 (2048 bytes further in each k-step).
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void WgmmaOutput<TStorage>(ref Tile16 o, in Frag16 p, bool split, in Frag16 r, uint windowBase, int vBytes,
        bool wide, ArrayView<uint> shared, int emu) where TStorage : struct, IStorage
    {
        int step = wide ? 4096 : 2048;        // bytes per k-step (16 keys x D)
        if (!CudaAsm.IsSupported)
        {
            EmulatedOutputHalf<TStorage>(ref o.N0, ref o.N1, ref o.N2, ref o.N3, ref o.N4, ref o.N5, ref o.N6, ref o.N7,
                p, split, r, vBytes, step, shared, emu);
            if (wide)
            {
                EmulatedOutputHalf<TStorage>(ref o.N8, ref o.N9, ref o.N10, ref o.N11, ref o.N12, ref o.N13, ref o.N14, ref o.N15,
                    p, split, r, vBytes + 2048, step, shared, emu);
            }
            return;
        }
        Input<uint> a0 = p.K0A0, a1 = p.K0A1, a2 = p.K0A2, a3 = p.K0A3, a4 = p.K1A0, a5 = p.K1A1, a6 = p.K1A2, a7 = p.K1A3;
        Input<uint> a8 = p.K2A0, a9 = p.K2A1, a10 = p.K2A2, a11 = p.K2A3, a12 = p.K3A0, a13 = p.K3A1, a14 = p.K3A2, a15 = p.K3A3;
        Input<uint> v = DescriptorLow(windowBase, vBytes), high = 256u >> 4;
        if (split)
        {
            // Operand order of the split blocks: k-step ks's high part, then its low part.
            a0 = p.K0A0; a1 = p.K0A1; a2 = p.K0A2; a3 = p.K0A3; a4 = r.K0A0; a5 = r.K0A1; a6 = r.K0A2; a7 = r.K0A3;
            a8 = p.K1A0; a9 = p.K1A1; a10 = p.K1A2; a11 = p.K1A3; a12 = r.K1A0; a13 = r.K1A1; a14 = r.K1A2; a15 = r.K1A3;
        }
        Input<uint> b0 = p.K2A0, b1 = p.K2A1, b2 = p.K2A2, b3 = p.K2A3, b4 = r.K2A0, b5 = r.K2A1, b6 = r.K2A2, b7 = r.K2A3;
        Input<uint> b8 = p.K3A0, b9 = p.K3A1, b10 = p.K3A2, b11 = p.K3A3, b12 = r.K3A0, b13 = r.K3A1, b14 = r.K3A2, b15 = r.K3A3;
        if (default(TStorage).IsBFloat16)
        {
            if (wide)
            {
                if (split)
                    CudaAsm.EmitRef(OutputBf16WideSplit, ref a0, ref a1, ref a2, ref a3, ref a4, ref a5, ref a6, ref a7, ref a8, ref a9, ref a10, ref a11, ref a12, ref a13, ref a14, ref a15, ref b0, ref b1, ref b2, ref b3, ref b4, ref b5, ref b6, ref b7, ref b8, ref b9, ref b10, ref b11, ref b12, ref b13, ref b14, ref b15, ref v, ref high);
                else
                    CudaAsm.EmitRef(OutputBf16Wide, ref a0, ref a1, ref a2, ref a3, ref a4, ref a5, ref a6, ref a7, ref a8, ref a9, ref a10, ref a11, ref a12, ref a13, ref a14, ref a15, ref v, ref high);
            }
            else
            {
                if (split)
                    CudaAsm.EmitRef(OutputBf16Split, ref a0, ref a1, ref a2, ref a3, ref a4, ref a5, ref a6, ref a7, ref a8, ref a9, ref a10, ref a11, ref a12, ref a13, ref a14, ref a15, ref b0, ref b1, ref b2, ref b3, ref b4, ref b5, ref b6, ref b7, ref b8, ref b9, ref b10, ref b11, ref b12, ref b13, ref b14, ref b15, ref v, ref high);
                else
                    CudaAsm.EmitRef(OutputBf16, ref a0, ref a1, ref a2, ref a3, ref a4, ref a5, ref a6, ref a7, ref a8, ref a9, ref a10, ref a11, ref a12, ref a13, ref a14, ref a15, ref v, ref high);
            }
        }
        else
        {
            if (wide)
            {
                if (split)
                    CudaAsm.EmitRef(OutputFp16WideSplit, ref a0, ref a1, ref a2, ref a3, ref a4, ref a5, ref a6, ref a7, ref a8, ref a9, ref a10, ref a11, ref a12, ref a13, ref a14, ref a15, ref b0, ref b1, ref b2, ref b3, ref b4, ref b5, ref b6, ref b7, ref b8, ref b9, ref b10, ref b11, ref b12, ref b13, ref b14, ref b15, ref v, ref high);
                else
                    CudaAsm.EmitRef(OutputFp16Wide, ref a0, ref a1, ref a2, ref a3, ref a4, ref a5, ref a6, ref a7, ref a8, ref a9, ref a10, ref a11, ref a12, ref a13, ref a14, ref a15, ref v, ref high);
            }
            else
            {
                if (split)
                    CudaAsm.EmitRef(OutputFp16Split, ref a0, ref a1, ref a2, ref a3, ref a4, ref a5, ref a6, ref a7, ref a8, ref a9, ref a10, ref a11, ref a12, ref a13, ref a14, ref a15, ref b0, ref b1, ref b2, ref b3, ref b4, ref b5, ref b6, ref b7, ref b8, ref b9, ref b10, ref b11, ref b12, ref b13, ref b14, ref b15, ref v, ref high);
                else
                    CudaAsm.EmitRef(OutputFp16, ref a0, ref a1, ref a2, ref a3, ref a4, ref a5, ref a6, ref a7, ref a8, ref a9, ref a10, ref a11, ref a12, ref a13, ref a14, ref a15, ref v, ref high);
            }
        }
    }

    /// <summary>
    /// After the last tile: waits for the products and copies O out of the output registers into <paramref name="o"/>
    /// (columns 0 .. 63, and 64 .. 127 when <paramref name="wide"/>); nothing to do where the products are emulated.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void TakeOutput(ref Tile16 o, bool wide)
    {
        if (!CudaAsm.IsSupported)
            return;
        TakeOutputHalf(ref o.N0, ref o.N1, ref o.N2, ref o.N3, ref o.N4, ref o.N5, ref o.N6, ref o.N7, false);
        if (wide)
            TakeOutputHalf(ref o.N8, ref o.N9, ref o.N10, ref o.N11, ref o.N12, ref o.N13, ref o.N14, ref o.N15, true);
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void TakeOutputHalf(ref Acc4 n0, ref Acc4 n1, ref Acc4 n2, ref Acc4 n3, ref Acc4 n4, ref Acc4 n5,
        ref Acc4 n6, ref Acc4 n7, bool upper)
    {
        Ref<float> d0 = 0f, d1 = 0f, d2 = 0f, d3 = 0f;
        Ref<float> d4 = 0f, d5 = 0f, d6 = 0f, d7 = 0f;
        Ref<float> d8 = 0f, d9 = 0f, d10 = 0f, d11 = 0f;
        Ref<float> d12 = 0f, d13 = 0f, d14 = 0f, d15 = 0f;
        Ref<float> d16 = 0f, d17 = 0f, d18 = 0f, d19 = 0f;
        Ref<float> d20 = 0f, d21 = 0f, d22 = 0f, d23 = 0f;
        Ref<float> d24 = 0f, d25 = 0f, d26 = 0f, d27 = 0f;
        Ref<float> d28 = 0f, d29 = 0f, d30 = 0f, d31 = 0f;
        if (upper)
            CudaAsm.EmitRef(TakeOutputHigh, ref d0, ref d1, ref d2, ref d3, ref d4, ref d5, ref d6, ref d7, ref d8, ref d9, ref d10, ref d11, ref d12, ref d13, ref d14, ref d15, ref d16, ref d17, ref d18, ref d19, ref d20, ref d21, ref d22, ref d23, ref d24, ref d25, ref d26, ref d27, ref d28, ref d29, ref d30, ref d31);
        else
            CudaAsm.EmitRef(TakeOutputLow, ref d0, ref d1, ref d2, ref d3, ref d4, ref d5, ref d6, ref d7, ref d8, ref d9, ref d10, ref d11, ref d12, ref d13, ref d14, ref d15, ref d16, ref d17, ref d18, ref d19, ref d20, ref d21, ref d22, ref d23, ref d24, ref d25, ref d26, ref d27, ref d28, ref d29, ref d30, ref d31);
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
    /// Emulated O[:, 64 h ..] += P V for one half of the head dimension (n-tiles <paramref name="n0"/> .. n7, V's k-step
    /// ks at <paramref name="vBytes"/> + ks <paramref name="step"/>), k-step by k-step (with split weights the high part,
    /// then the low part), as the wgmma block does it.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void EmulatedOutputHalf<TStorage>(ref Acc4 n0, ref Acc4 n1, ref Acc4 n2, ref Acc4 n3, ref Acc4 n4, ref Acc4 n5,
        ref Acc4 n6, ref Acc4 n7, in Frag16 p, bool split, in Frag16 r, int vBytes, int step, ArrayView<uint> shared, int emu)
        where TStorage : struct, IStorage
    {
        EmulatedOutput<TStorage>(ref n0, ref n1, ref n2, ref n3, ref n4, ref n5, ref n6, ref n7, p.K0A0, p.K0A1, p.K0A2, p.K0A3, vBytes, shared, emu);
        if (split)
            EmulatedOutput<TStorage>(ref n0, ref n1, ref n2, ref n3, ref n4, ref n5, ref n6, ref n7, r.K0A0, r.K0A1, r.K0A2, r.K0A3, vBytes, shared, emu);
        EmulatedOutput<TStorage>(ref n0, ref n1, ref n2, ref n3, ref n4, ref n5, ref n6, ref n7, p.K1A0, p.K1A1, p.K1A2, p.K1A3, vBytes + step, shared, emu);
        if (split)
            EmulatedOutput<TStorage>(ref n0, ref n1, ref n2, ref n3, ref n4, ref n5, ref n6, ref n7, r.K1A0, r.K1A1, r.K1A2, r.K1A3, vBytes + step, shared, emu);
        EmulatedOutput<TStorage>(ref n0, ref n1, ref n2, ref n3, ref n4, ref n5, ref n6, ref n7, p.K2A0, p.K2A1, p.K2A2, p.K2A3, vBytes + 2 * step, shared, emu);
        if (split)
            EmulatedOutput<TStorage>(ref n0, ref n1, ref n2, ref n3, ref n4, ref n5, ref n6, ref n7, r.K2A0, r.K2A1, r.K2A2, r.K2A3, vBytes + 2 * step, shared, emu);
        EmulatedOutput<TStorage>(ref n0, ref n1, ref n2, ref n3, ref n4, ref n5, ref n6, ref n7, p.K3A0, p.K3A1, p.K3A2, p.K3A3, vBytes + 3 * step, shared, emu);
        if (split)
            EmulatedOutput<TStorage>(ref n0, ref n1, ref n2, ref n3, ref n4, ref n5, ref n6, ref n7, r.K3A0, r.K3A1, r.K3A2, r.K3A3, vBytes + 3 * step, shared, emu);
    }

    /// <summary>The 32-bit word holding elements k, k + 1 of row <paramref name="row"/> of a K-major tile at <paramref name="bytes"/>.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static uint CoreWord(ArrayView<uint> shared, int bytes, int D, int row, int k) =>
        shared[(bytes + (row >> 3) * CoreRowGroupBytes(D) + (k >> 3) * 128 + (row & 7) * 16 + (k & 7) * 2) >> 2];

    /// <summary>S = Q K^T as m16n8k16 mma on fragments read from the K-major layouts (where there is no wgmma).</summary>
    private static void EmulatedScores<TStorage>(ref Tile8 s, int qBytes, int kBytes, int D, ArrayView<uint> shared, int emu)
        where TStorage : struct, IStorage
    {
        int lane = Warp.LaneIdx, warp = (Group.IdxX >> 5) & 3, g = lane >> 2, t = lane & 3;
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
