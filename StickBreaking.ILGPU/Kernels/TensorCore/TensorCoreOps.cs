using System;
using System.Runtime.CompilerServices;
using ILGPU;
using ILGPU.Runtime.Cuda;
using ILGPU.Util;
using StickBreaking.ILGPU.Kernels.Common;

namespace StickBreaking.ILGPU.Kernels.TensorCore;

/// <summary>
/// The building blocks the tensor-core kernels share (imported with <c>using static</c>): 16-byte pieces and
/// fragments, the base-2 log-stick math on the accumulator registers (<see cref="Lb2"/>, <see cref="Exp2"/>), the
/// quad exchange of a row's sums, packing fp32 pairs to 16-bit storage, and the non-finite screening of staged values.
/// </summary>
internal static class TensorCoreOps
{
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static U4 Fragment(uint a0, uint a1, uint a2, uint a3)
    {
        U4 f;
        f.X0 = a0;
        f.X1 = a1;
        f.X2 = a2;
        f.X3 = a3;
        return f;
    }

    /// <summary>The 16-byte piece at <paramref name="index"/> when <paramref name="active"/>, else zeros.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static U4 Piece(ArrayView<U4> source, int index, bool active)
    {
        U4 value = default;
        if (active)
            value = source[index];
        return value;
    }

    /// <summary>Replaces each non-finite 16-bit value of a 16-byte piece by 0 (by selection); true when there was one.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static bool Sanitize(ref U4 x, uint exponentMask)
    {
        uint bad0 = NonFinite(x.X0, exponentMask), bad1 = NonFinite(x.X1, exponentMask);
        uint bad2 = NonFinite(x.X2, exponentMask), bad3 = NonFinite(x.X3, exponentMask);
        x.X0 &= ~bad0;
        x.X1 &= ~bad1;
        x.X2 &= ~bad2;
        x.X3 &= ~bad3;
        return (bad0 | bad1 | bad2 | bad3) != 0;
    }

    /// <summary>0xFFFF over each half of <paramref name="pair"/> whose exponent bits are all set (Inf or NaN), else 0.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static uint NonFinite(uint pair, uint exponentMask)
    {
        uint lo = (pair & exponentMask & 0xFFFFu) == (exponentMask & 0xFFFFu) ? 0xFFFFu : 0u;
        uint hi = (pair & exponentMask & 0xFFFF_0000u) == (exponentMask & 0xFFFF_0000u) ? 0xFFFF_0000u : 0u;
        return lo | hi;
    }

    public const float Log2E = 1.44269504088896341f;
    public const float Ln2 = 0.693147180559945309f;

    /// <summary>
    /// lb = log2(1 - beta) = -(max(z, 0) + log2(1 + 2^-|z|)) for z = logit log2 e (never overflows): one ex2, and
    /// log2(1 + u) for u in (0, 1] as 2 atanh(s) log2 e with s = u / (2 + u) in [0, 1/3], atanh(s) / s as a
    /// degree-4 polynomial in t = s^2 on [0, 1/9] (Chebyshev-node fit, relative error 4e-9; the truncated series
    /// needs degree 7 for 1.5e-9), s from one approximate reciprocal (rcp.approx: 1 ulp).
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static float Lb2(float z)
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
        return -(MathF.Max(z, 0f) + s * series);
    }

    /// <summary>2^x: <c>ex2.approx.ftz.f32</c> on CUDA (relative error about 2^-22; results below 2^-126 flush to 0), exp(x ln 2) elsewhere.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static float Exp2(float x)
    {
        if (CudaAsm.IsSupported)
        {
            CudaAsm.Emit("ex2.approx.ftz.f32 %0, %1;", out float y, x);
            return y;
        }
        return MathF.Exp(x * Ln2);
    }

    /// <summary>1 / x: <c>rcp.approx.ftz.f32</c> on CUDA (1 ulp), the IEEE division elsewhere.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static float Reciprocal(float x)
    {
        if (CudaAsm.IsSupported)
        {
            CudaAsm.Emit("rcp.approx.ftz.f32 %0, %1;", out float y, x);
            return y;
        }
        return 1f / x;
    }

    /// <summary>
    /// The quad (4 lanes, one row) exchange of the thread sums x_t of lb: returns the sum over the nearer threads
    /// (t' &gt; t), and the row's total, the same bits in all four lanes (the same additions, nearest first).
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static float QuadNearer(float x, int lane, int t, out float total)
    {
        int quad = lane & ~3;
        float x0 = Warp.Shuffle(x, quad);
        float x1 = Warp.Shuffle(x, quad + 1);
        float x2 = Warp.Shuffle(x, quad + 2);
        float x3 = Warp.Shuffle(x, quad + 3);
        float nearer2 = x3 + x2;
        float nearer1 = nearer2 + x1;
        total = nearer1 + x0;
        return t == 0 ? nearer1 : t == 1 ? nearer2 : t == 2 ? x3 : 0f;
    }

    /// <summary>
    /// <see cref="QuadNearer"/> with the per-lane choice made by selects instead of a conditional chain (no branch, so
    /// that the surrounding straight-line code stays one block for the scheduler): the same additions in the same
    /// order, hence the same bits (adding the selected zeros is exact).
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static float QuadNearerSelected(float x, int lane, int t, out float total)
    {
        int quad = lane & ~3;
        float x0 = Warp.Shuffle(x, quad);
        float x1 = Warp.Shuffle(x, quad + 1);
        float x2 = Warp.Shuffle(x, quad + 2);
        float x3 = Warp.Shuffle(x, quad + 3);
        float nearer2 = x3 + x2;
        float nearer1 = nearer2 + x1;
        total = nearer1 + x0;
        float nearer = Utilities.Select(t == 2, x3, 0f);
        nearer = Utilities.Select(t == 1, nearer2, nearer);
        return Utilities.Select(t == 0, nearer1, nearer);
    }

    /// <summary>
    /// The residuals w - round(w) of a pair of weights (exact in fp32: w and round(w) are within a 16-bit ulp of each
    /// other), rounded to the storage type in turn; <paramref name="rounded"/> is the pair <see cref="Pack"/> made.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static uint Residuals<TStorage>(uint rounded, float lo, float hi) where TStorage : struct, IStorage
    {
        float roundedLo = default(TStorage).Load((ushort)rounded);
        float roundedHi = default(TStorage).Load((ushort)(rounded >> 16));
        return Pack<TStorage>(lo - roundedLo, hi - roundedHi);
    }

    /// <summary>
    /// Two floats rounded to the storage type (nearest, ties to even), as one word (low half first): on CUDA one
    /// <c>cvt.rn.{bf16x2|f16x2}.f32</c> (its first source goes to the upper half), elsewhere the integer rounding
    /// of <see cref="IStorage.Store"/> (the same bits for every non-NaN value).
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static uint Pack<TStorage>(float lo, float hi) where TStorage : struct, IStorage
    {
        if (CudaAsm.IsSupported)
        {
            uint packed;
            if (default(TStorage).IsBFloat16)
                CudaAsm.Emit("cvt.rn.bf16x2.f32 %0, %1, %2;", out packed, hi, lo);
            else
                CudaAsm.Emit("cvt.rn.f16x2.f32 %0, %1, %2;", out packed, hi, lo);
            return packed;
        }
        return default(TStorage).Store(lo) | ((uint)default(TStorage).Store(hi) << 16);
    }

    /// <summary>
    /// Loads this thread's share of 64 rows first .. first+63 of a head (<paramref name="head"/>: a view at row 0, rows
    /// <paramref name="token"/> 16-byte pieces apart) in 16-byte pieces, as the forward and the dq pass stage their K
    /// (and V) tiles: piece c = tid % (D / 8) of rows tid / (D / 8) + step i (step = <paramref name="groupSize"/> / (D / 8),
    /// D / 16 passes), for <see cref="StoreTileRows"/>. Rows at or past <paramref name="limit"/> are zeros (never read).
    /// The pieces are addressed by 32-bit offsets from the head's row 0, each the previous one plus the pass stride (step
    /// rows): ptxas keeps no per-piece offset across the loop (a sub-view per row, or the selects that keep it in bounds
    /// on the CPU accelerator, measured more instructions), and each address is one multiply-add from the head's.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Pieces8 LoadTileRows(ArrayView<U4> head, int token, int first, int limit, int D, int tid, int groupSize)
    {
        bool wide = D > 64;
        int chunks = D >> 3;
        int c = tid & (chunks - 1), r = tid / chunks, step = groupSize / chunks;
        int row = first + r;
        int pass = step * token;
        // Each piece's offset from the previous one's; only the pieces of rows before the limit are read.
        int at = c + row * token;
        Pieces8 p;
        p.P0 = Piece(head, at, row < limit);
        p.P1 = Piece(head, at += pass, row + step < limit);
        p.P2 = Piece(head, at += pass, row + 2 * step < limit);
        p.P3 = Piece(head, at += pass, row + 3 * step < limit);
        p.P4 = Piece(head, at += pass, wide && row + 4 * step < limit);
        p.P5 = Piece(head, at += pass, wide && row + 5 * step < limit);
        p.P6 = Piece(head, at += pass, wide && row + 6 * step < limit);
        p.P7 = Piece(head, at + pass, wide && row + 7 * step < limit);
        return p;
    }

    /// <summary>Stores the pieces of <see cref="LoadTileRows"/> row-major in shared memory from vector <paramref name="at"/> (row stride <paramref name="rowStrideU4"/> 16-byte vectors).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static void StoreTileRows(in Pieces8 p, ArrayView<U4> vectors, int at, int D, int tid, int groupSize, int rowStrideU4)
    {
        bool wide = D > 64;
        int chunks = D >> 3;
        int c = tid & (chunks - 1), r = tid / chunks, step = groupSize / chunks;
        StoreStrided(p, vectors.SubView(at + r * rowStrideU4 + c), step * rowStrideU4, wide);
    }

    /// <summary>Stores pieces P0 .. P3 (P0 .. P7 when <paramref name="wide"/>) at vectors 0, <paramref name="stride"/>, 2 stride, ... of <paramref name="to"/>.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static void StoreStrided(in Pieces8 p, ArrayView<U4> to, int stride, bool wide)
    {
        to[0] = p.P0;
        to[stride] = p.P1;
        to[2 * stride] = p.P2;
        to[3 * stride] = p.P3;
        if (wide)
        {
            to[4 * stride] = p.P4;
            to[5 * stride] = p.P5;
            to[6 * stride] = p.P6;
            to[7 * stride] = p.P7;
        }
    }

    /// <summary>The pieces <see cref="StoreStrided"/> stored (P4 .. P7 zeros unless <paramref name="wide"/>).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static Pieces8 LoadStrided(ArrayView<U4> from, int stride, bool wide)
    {
        Pieces8 p;
        p.P0 = from[0];
        p.P1 = from[stride];
        p.P2 = from[2 * stride];
        p.P3 = from[3 * stride];
        p.P4 = default;
        p.P5 = default;
        p.P6 = default;
        p.P7 = default;
        if (wide)
        {
            p.P4 = from[4 * stride];
            p.P5 = from[5 * stride];
            p.P6 = from[6 * stride];
            p.P7 = from[7 * stride];
        }
        return p;
    }

    /// <summary>Commits this thread's cp.async copies as one group (CUDA; nothing elsewhere).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static void CommitCopies()
    {
        if (CudaAsm.IsSupported)
            CudaAsm.Emit("cp.async.commit_group;");
    }

    /// <summary>Waits for this thread's committed cp.async copies (CUDA; nothing elsewhere).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static void WaitCopies()
    {
        if (CudaAsm.IsSupported)
            CudaAsm.Emit("cp.async.wait_group 0;");
    }

    /// <summary>16 bytes from device address <paramref name="at"/> to byte <paramref name="to"/> of dynamic shared memory; zeros where not <paramref name="active"/> (cp.async's ignore-src: nothing is read there).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static void CopyPiece(long at, bool active, int to) =>
        CudaAsm.Emit("{ .reg .b32 sbD; .reg .pred sbI; mov.u32 sbD, __dyn_shared_alloca; add.u32 sbD, sbD, %0; setp.eq.u32 sbI, %2, 0; cp.async.cg.shared.global [sbD], [%1], 16, sbI; }",
            to, at, active ? 1 : 0);
}
