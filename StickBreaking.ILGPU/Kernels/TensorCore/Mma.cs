using System.Runtime.CompilerServices;
using ILGPU;
using ILGPU.Runtime.Cuda;
using StickBreaking.ILGPU.Kernels.Common;

namespace StickBreaking.ILGPU.Kernels.TensorCore;

/// <summary>Four fp32 accumulators of one m16n8k16 mma: C[g][2t], C[g][2t+1], C[g+8][2t], C[g+8][2t+1] (lane = 4g + t).</summary>
internal struct Acc4
{
    public float C0, C1, C2, C3;
}

/// <summary>Four 32-bit words: a 16-byte shared or global load (ILGPU emits ld.v4.u32 for a view cast to it).</summary>
internal struct U4
{
    public uint X0, X1, X2, X3;
}

/// <summary>
/// One warp's <c>mma.sync.aligned.m16n8k16.row.col.f32.{bf16|f16}.{bf16|f16}.f32</c> (PTX ISA, "Matrix fragments for
/// mma.m16n8k16"): D = A B + C with A 16 x 16 and B 16 x 8 in 16-bit storage, C and D fp32. Fragments per lane
/// (lane = 4g + t), each uint two 16-bit values, the lower index in the low half:
/// a0 = A[g][2t, 2t+1], a1 = A[g+8][2t, 2t+1], a2 = A[g][2t+8, 2t+9], a3 = A[g+8][2t+8, 2t+9];
/// b0 = B[2t, 2t+1][g], b1 = B[2t+8, 2t+9][g]; c = <see cref="Acc4"/>.
/// On CUDA the instruction is inline PTX; elsewhere (the CPU accelerator) an emulation of the same fragment
/// layout through a per-warp scratch area of shared memory (<see cref="ScratchUintsPerWarp"/> words at
/// <c>emu</c>), so that the very same kernel code is tested without a GPU. Every lane of the warp must call it.
/// </summary>
internal static class Mma
{
    /// <summary>Shared words per warp the emulation needs: 6 fragment words per lane.</summary>
    public const int ScratchUintsPerWarp = 6 * 32;

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static void Run<TStorage>(ref Acc4 c, uint a0, uint a1, uint a2, uint a3, uint b0, uint b1,
        ArrayView<uint> shared, int emu) where TStorage : struct, IStorage
    {
        if (CudaAsm.IsSupported)
        {
            Ref<float> d0 = c.C0, d1 = c.C1, d2 = c.C2, d3 = c.C3;
            Input<uint> x0 = a0, x1 = a1, x2 = a2, x3 = a3, y0 = b0, y1 = b1;
            if (default(TStorage).IsBFloat16)
            {
                CudaAsm.EmitRef(
                    "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};",
                    ref d0, ref d1, ref d2, ref d3, ref x0, ref x1, ref x2, ref x3, ref y0, ref y1);
            }
            else
            {
                CudaAsm.EmitRef(
                    "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};",
                    ref d0, ref d1, ref d2, ref d3, ref x0, ref x1, ref x2, ref x3, ref y0, ref y1);
            }
            c.C0 = d0.Value;
            c.C1 = d1.Value;
            c.C2 = d2.Value;
            c.C3 = d3.Value;
        }
        else
        {
            Emulate<TStorage>(ref c, a0, a1, a2, a3, b0, b1, shared, emu);
        }
    }

    /// <summary>
    /// The mma on any accelerator: each lane publishes its 6 fragment words in the warp's scratch area, then
    /// gathers rows g and g+8 of A (from lanes 4g .. 4g+3) and columns 2t and 2t+1 of B (from lanes 8t .. 8t+7)
    /// and sums the 16 exact fp32 products per accumulator in key order.
    /// </summary>
    private static void Emulate<TStorage>(ref Acc4 c, uint a0, uint a1, uint a2, uint a3, uint b0, uint b1,
        ArrayView<uint> shared, int emu) where TStorage : struct, IStorage
    {
        int lane = Warp.LaneIdx;
        int g = lane >> 2, t = lane & 3;
        int mine = emu + 6 * lane;
        shared[mine] = a0;
        shared[mine + 1] = a1;
        shared[mine + 2] = a2;
        shared[mine + 3] = a3;
        shared[mine + 4] = b0;
        shared[mine + 5] = b1;
        Warp.Barrier();
        float c0 = c.C0, c1 = c.C1, c2 = c.C2, c3 = c.C3;
        for (int half = 0; half < 2; half++)              // k = 0..7 (a0, a1, b0), then k = 8..15 (a2, a3, b1)
        {
            for (int tp = 0; tp < 4; tp++)                // k = 8 half + 2 tp + e
            {
                int rowLane = emu + 6 * (4 * g + tp);
                uint rowG = shared[rowLane + 2 * half];
                uint rowG8 = shared[rowLane + 2 * half + 1];
                uint col0 = shared[emu + 6 * (8 * t + tp) + 4 + half];        // column n = 2t: lane 4 (2t) + tp
                uint col1 = shared[emu + 6 * (8 * t + 4 + tp) + 4 + half];    // column n = 2t + 1
                for (int e = 0; e < 2; e++)
                {
                    int shift = 16 * e;
                    float ag = default(TStorage).Load((ushort)(rowG >> shift));
                    float ag8 = default(TStorage).Load((ushort)(rowG8 >> shift));
                    float bn0 = default(TStorage).Load((ushort)(col0 >> shift));
                    float bn1 = default(TStorage).Load((ushort)(col1 >> shift));
                    c0 += ag * bn0;
                    c1 += ag * bn1;
                    c2 += ag8 * bn0;
                    c3 += ag8 * bn1;
                }
            }
        }
        Warp.Barrier();
        c.C0 = c0;
        c.C1 = c1;
        c.C2 = c2;
        c.C3 = c3;
    }
}
