using System.Runtime.CompilerServices;
using ILGPU;
using ILGPU.Runtime.Cuda;

namespace StickBreaking.ILGPU.Kernels.Decode;

/// <summary>
/// The fp16/bf16 warp decode's staging ring (docs/design.md, "The warp decode"): <see cref="Stages"/> rounds of keys and
/// values in shared memory, each round copied by the warp's lanes <see cref="Stages"/> - 1 rounds before it is used, so
/// that a warp keeps that many rounds on their way from device memory without holding them in registers.
/// <para>
/// On CUDA the ring is a shared array declared in inline PTX (<c>sbDecodeRing</c>: ILGPU 1.5.3 gives a kernel no address
/// of its own shared memory) and filled by <c>cp.async</c>, 16 bytes a lane, at device addresses the host reads from the
/// views; a lane waits for its own copies (<c>cp.async.wait_group</c>) and the group barrier that follows makes every
/// lane's copies visible to the warp. Without PTX (the CPU accelerator) the ring is a shared view filled by plain loads
/// into the same slots, so that the tests run the ring's layout and its reads.
/// </para>
/// <para>
/// Slots, in 16-byte pieces: stage s holds a round's keys at s <see cref="StagePieces"/> and its values 128 pieces on.
/// Row r of a round is key roundEnd - Steps + r; its piece p (8 elements, D / 8 pieces a row) lies at r (D / 8) + (p xor r)
/// among the keys (the xor spreads the eight rows that one B-fragment read takes over all the banks) and at
/// r (D / 8) + p among the values (a value read takes whole rows).
/// </para>
/// </summary>
internal static class DecodeRing
{
    /// <summary>Rounds the ring holds: the one being used and two on their way.</summary>
    public const int Stages = 3;

    /// <summary>16-byte pieces per stage: a round's keys and values at D = 128 (8 rows of 16 pieces each).</summary>
    public const int StagePieces = 2 * DecodeWarpKernel.Steps * 16;

    /// <summary>16-byte pieces in the ring; the PTX declaration in <see cref="Allocate"/> is this many times 16 bytes.</summary>
    public const int Pieces = Stages * StagePieces;

    /// <summary>Bytes of dynamic shared memory the ring takes where there is no PTX (<see cref="Allocate"/>).</summary>
    public const int EmulatedBytes = 16 * Pieces;

    /// <summary>
    /// The ring: on CUDA declared in the kernel's PTX (the returned view is empty and unused); elsewhere the first
    /// <see cref="EmulatedBytes"/> of <paramref name="dynamic"/>, the group's dynamic shared memory, which only such a
    /// launch requests (a static allocation would take its 12 KB on CUDA too). Called once, at the top of the kernel, so
    /// that the PTX declaration appears once, before every use.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static ArrayView<Raw16> Allocate(ArrayView<Raw16> dynamic)
    {
        if (CudaAsm.IsSupported)
        {
            CudaAsm.Emit(".shared .align 16 .b8 sbDecodeRing[12288];");
            return default;
        }
        return dynamic.SubView(0, Pieces);
    }

    /// <summary>
    /// Copies the round that ends at <paramref name="roundEnd"/> into stage <paramref name="stage"/>: this lane's pieces
    /// lane + 32 j of its keys and of its values (rows of keys below <paramref name="lo"/> are not copied; their slots keep
    /// what they held and are never read). <paramref name="rowBase"/> is element 0 of slot 0 of the head in both caches,
    /// whose rows are D elements apart; <paramref name="keyAddress"/> and <paramref name="valueAddress"/> the caches'
    /// device addresses (CUDA).
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static void Fill(ArrayView<Raw16> ring, ArrayView<ushort> k, ArrayView<ushort> v, long keyAddress, long valueAddress,
        long rowBase, int roundEnd, int lo, int stage, int lane, int D)
    {
        int first = roundEnd - DecodeWarpKernel.Steps;
        int perRow = D >> 3, shift = D > 64 ? 4 : 3;
        int at = stage * StagePieces;
        FillPiece(ring, k, v, keyAddress, valueAddress, rowBase, first, lo, at, lane, perRow, shift);
        FillPiece(ring, k, v, keyAddress, valueAddress, rowBase, first, lo, at, lane + 32, perRow, shift);
        if (D > 64)
        {
            FillPiece(ring, k, v, keyAddress, valueAddress, rowBase, first, lo, at, lane + 64, perRow, shift);
            FillPiece(ring, k, v, keyAddress, valueAddress, rowBase, first, lo, at, lane + 96, perRow, shift);
        }
    }

    /// <summary>Piece <paramref name="i"/> (row i / (D / 8), piece i % (D / 8)) of the round's keys and of its values.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void FillPiece(ArrayView<Raw16> ring, ArrayView<ushort> k, ArrayView<ushort> v, long keyAddress, long valueAddress,
        long rowBase, int first, int lo, int at, int i, int perRow, int shift)
    {
        int r = i >> shift, p = i & (perRow - 1);
        if (first + r < lo)
            return;
        long element = rowBase + (long)(first + r) * (perRow << 3) + (p << 3);
        int keySlot = at + r * perRow + (p ^ r), valueSlot = at + 128 + r * perRow + p;
        if (CudaAsm.IsSupported)
        {
            CudaAsm.Emit("{ .reg .b32 sbS; mov.u32 sbS, sbDecodeRing; add.u32 sbS, sbS, %0; cp.async.cg.shared.global [sbS], [%1], 16; }",
                keySlot << 4, keyAddress + 2 * element);
            CudaAsm.Emit("{ .reg .b32 sbS; mov.u32 sbS, sbDecodeRing; add.u32 sbS, sbS, %0; cp.async.cg.shared.global [sbS], [%1], 16; }",
                valueSlot << 4, valueAddress + 2 * element);
        }
        else
        {
            ring[keySlot] = k.Cast<Raw16>()[element >> 3];
            ring[valueSlot] = v.Cast<Raw16>()[element >> 3];
        }
    }

    /// <summary>Waits until at most <see cref="Stages"/> - 1 of this lane's newest groups are still on their way (CUDA).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static void WaitForOldest()
    {
        if (CudaAsm.IsSupported)
            CudaAsm.Emit("cp.async.wait_group 2;");
    }

    /// <summary>The 16-byte piece in slot <paramref name="slot"/>.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Raw16 Read(ArrayView<Raw16> ring, int slot)
    {
        if (CudaAsm.IsSupported)
        {
            Output<uint> x0 = default, x1 = default, x2 = default, x3 = default;
            Input<uint> at = (uint)(slot << 4);
            CudaAsm.EmitRef("{ .reg .b32 sbS; mov.u32 sbS, sbDecodeRing; add.u32 sbS, sbS, %4; ld.shared.v4.u32 {%0,%1,%2,%3}, [sbS]; }",
                ref x0, ref x1, ref x2, ref x3, ref at);
            return new Raw16 { Lo = x0.Value | ((ulong)x1.Value << 32), Hi = x2.Value | ((ulong)x3.Value << 32) };
        }
        return ring[slot];
    }

    /// <summary>
    /// The keys of the round in stage <paramref name="stage"/> as <see cref="DecodeWarpKernel"/>'s 16-bit lanes take them:
    /// K0 .. K3 of <paramref name="round"/> the pieces c, 4 + c, 8 + c, 12 + c (c = lane % 4) of the key of step lane / 4,
    /// the mma's B fragments; zeros for a key below <paramref name="lo"/>.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Round ReadKeys(Round round, ArrayView<Raw16> ring, int stage, int roundEnd, int lo, int lane, int D)
    {
        int step = lane >> 2, c = lane & 3;
        if (roundEnd - 1 - step < lo)
            return round;
        int r = DecodeWarpKernel.Steps - 1 - step, row = stage * StagePieces + r * (D >> 3);
        round.K0 = Read(ring, row + (c ^ r));
        round.K1 = Read(ring, row + ((4 + c) ^ r));
        if (D > 64)
        {
            round.K2 = Read(ring, row + ((8 + c) ^ r));
            round.K3 = Read(ring, row + ((12 + c) ^ r));
        }
        return round;
    }

    /// <summary>
    /// The values of the round in stage <paramref name="stage"/> as the 16-bit lanes take them: V0 .. V3 of
    /// <paramref name="round"/> the piece lane - part D / 8 of the values of steps j keysPerLoad + part; zeros for keys
    /// below <paramref name="lo"/>.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Round ReadValues(Round round, ArrayView<Raw16> ring, int stage, int roundEnd, int lo, int lane, int D,
        int keysPerLoad, int part)
    {
        int perRow = D >> 3, values = stage * StagePieces + 128 + lane - part * perRow;
        round.V0 = ValuePiece(ring, values, part, roundEnd, lo, perRow);
        round.V1 = ValuePiece(ring, values, keysPerLoad + part, roundEnd, lo, perRow);
        if (keysPerLoad == 2)
        {
            round.V2 = ValuePiece(ring, values, 2 * keysPerLoad + part, roundEnd, lo, perRow);
            round.V3 = ValuePiece(ring, values, 3 * keysPerLoad + part, roundEnd, lo, perRow);
        }
        return round;
    }

    /// <summary>This lane's piece of the value of step <paramref name="step"/>; zeros below <paramref name="lo"/>.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Raw16 ValuePiece(ArrayView<Raw16> ring, int values, int step, int roundEnd, int lo, int perRow)
    {
        Raw16 value = default;
        if (roundEnd - 1 - step >= lo)
            value = Read(ring, values + (DecodeWarpKernel.Steps - 1 - step) * perRow);
        return value;
    }
}
