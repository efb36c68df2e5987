using ILGPU;

namespace StickBreaking.ILGPU.Kernels.Common;

/// <summary>
/// A 16-bit storage type as kernels see it: values travel as <see cref="ushort"/> bits and every
/// computation is fp32. The implementations use integer operations and <see cref="Interop.IntAsFloat(uint)"/> /
/// <see cref="Interop.FloatAsInt(float)"/> only, so that they compile on every backend (ILGPU's OpenCL backend
/// has no Half support). Kernels are generic over the implementing struct: ILGPU specializes a generic kernel
/// per type argument, so the calls inline and <see cref="IsBFloat16"/> is a constant in each specialization.
/// </summary>
internal interface IStorage : IElement<ushort>
{
    /// <summary>True for bfloat16, false for IEEE fp16 (a compile-time constant in each specialization).</summary>
    bool IsBFloat16 { get; }

    /// <summary>The exact float value of 16 storage bits (the same method as <see cref="IElement{T}.Load"/>).</summary>
    new float Load(ushort bits);

    /// <summary>A float rounded to the storage type (nearest, ties to even), as bits; NaN stays NaN (the same method as <see cref="IElement{T}.Store"/>).</summary>
    new ushort Store(float x);
}

/// <summary>IEEE binary16 storage: bit for bit what <see cref="System.Half"/> gives on the host.</summary>
internal readonly struct Fp16Storage : IStorage
{
    public bool Wide => false;

    public ArrayView<float> Accumulator(ArrayView<ushort> output, ArrayView<float> scratch) => scratch;

    public bool IsBFloat16 => false;

    public float Load(ushort bits)
    {
        uint h = bits;
        uint sign = (h & 0x8000u) << 16;
        uint exponent = (h >> 10) & 0x1Fu;
        uint mantissa = h & 0x3FFu;
        // Subnormal or zero: mantissa * 2^-24, exact in fp32 (an integer below 2^10 times a power of two).
        float small = (int)mantissa * (1f / 16777216f);
        uint smallBits = Interop.FloatAsInt(small) | sign;
        // Inf and NaN: all-ones exponent; a NaN comes back quiet (as System.Half's conversion does).
        uint special = sign | 0x7F80_0000u | (mantissa << 13) | (mantissa != 0 ? 0x0040_0000u : 0u);
        uint normal = sign | ((exponent + 112u) << 23) | (mantissa << 13);
        uint result = exponent == 0 ? smallBits : exponent == 0x1F ? special : normal;
        return Interop.IntAsFloat(result);
    }

    public ushort Store(float x)
    {
        uint u = Interop.FloatAsInt(x);
        uint sign = (u >> 16) & 0x8000u;
        uint magnitude = u & 0x7FFF_FFFFu;
        // NaN: quiet, top 9 payload bits kept (System.Half's rule). At or above 65520 (and Inf): infinity.
        uint nan = sign | 0x7E00u | ((magnitude >> 13) & 0x3FFu);
        uint inf = sign | 0x7C00u;
        // Normal half (|x| >= 2^-14): re-bias the exponent, round the 13 dropped bits to nearest even.
        uint rebased = magnitude - 0x3800_0000u;
        uint normal = sign | ((rebased + 0xFFFu + ((rebased >> 13) & 1u)) >> 13);
        // Subnormal half: |x| + 0.5 rounds |x| to a multiple of 2^-24 (the fp32 add rounds to nearest even);
        // the bits above 0.5's are the half's mantissa (0x400 when it rounds up to the smallest normal).
        float shifted = Interop.IntAsFloat(magnitude) + 0.5f;
        uint subnormal = sign | (Interop.FloatAsInt(shifted) - 0x3F00_0000u);
        uint result = magnitude > 0x7F80_0000u ? nan
            : magnitude >= 0x477F_F000u ? inf
            : magnitude >= 0x3880_0000u ? normal
            : subnormal;
        return (ushort)result;
    }
}

/// <summary>bfloat16 storage (the upper half of an fp32 number): bit for bit what <see cref="BFloat16"/> gives on the host.</summary>
internal readonly struct Bf16Storage : IStorage
{
    public bool Wide => false;

    public ArrayView<float> Accumulator(ArrayView<ushort> output, ArrayView<float> scratch) => scratch;

    public bool IsBFloat16 => true;

    public float Load(ushort bits) => Interop.IntAsFloat((uint)bits << 16);

    public ushort Store(float x)
    {
        uint u = Interop.FloatAsInt(x);
        uint rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
        uint nan = (u >> 16) | 0x0040u;
        return (ushort)((u & 0x7FFF_FFFFu) > 0x7F80_0000u ? nan : rounded);
    }
}
