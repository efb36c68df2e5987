using System;
using System.Linq;
using Half = System.Half;

namespace StickBreaking.ILGPU.Tests;

/// <summary>How a test's tensors are stored: fp32, or fp16 / bf16 through the library's 16-bit API.</summary>
public enum StorageType
{
    Fp32,
    Fp16,
    Bf16,
}

/// <summary>
/// The tests' one home for rounding to the storage types, on the host (System.Half, the library's BFloat16): what
/// the kernels read from 16-bit inputs, and the floor of a 16-bit output (the exact result rounded to its type).
/// </summary>
internal static class Rounding
{
    /// <summary><paramref name="x"/> rounded to <paramref name="type"/> (to fp32 for Fp32), as a double.</summary>
    public static double RoundTrip(double x, StorageType type) => type switch
    {
        StorageType.Fp16 => (double)(Half)x,
        StorageType.Bf16 => (float)(BFloat16)(float)x,
        _ => (float)x,
    };

    /// <summary><paramref name="x"/> rounded to bf16 or fp16, as a double.</summary>
    public static double RoundTrip(double x, bool bf16) => RoundTrip(x, bf16 ? StorageType.Bf16 : StorageType.Fp16);

    /// <summary>Each element rounded to <paramref name="type"/>, as floats.</summary>
    public static float[] Round(float[] x, StorageType type) => x.Select(f => (float)RoundTrip(f, type)).ToArray();

    /// <summary>Each element rounded to bf16 or fp16, as doubles (float64 reference inputs).</summary>
    public static double[] Rounded(float[] x, bool bf16) => x.Select(f => RoundTrip(f, bf16)).ToArray();

    public static Half[] ToHalf(float[] x) => x.Select(f => (Half)f).ToArray();

    public static BFloat16[] ToBf16(float[] x) => x.Select(f => (BFloat16)f).ToArray();

    public static float[] Widen(Half[] x) => x.Select(h => (float)h).ToArray();

    public static float[] Widen(BFloat16[] x) => x.Select(b => (float)b).ToArray();

    /// <summary>One unit in the last place of <paramref name="type"/> (fp16 or bf16) at <paramref name="magnitude"/>.</summary>
    public static double Ulp(double magnitude, StorageType type) =>
        Math.Pow(2, Math.Floor(Math.Log2(magnitude)) - (type == StorageType.Bf16 ? 7 : 10));

    /// <summary>The spacing of bf16 or fp16 values at magnitude <paramref name="x"/> (normal range; 0 at 0).</summary>
    public static double Ulp(double x, bool bf16) => x == 0 ? 0 : Ulp(x, bf16 ? StorageType.Bf16 : StorageType.Fp16);

    /// <summary>Each element rounded to bf16 or fp16: the storage bits a kernel reads, and their exact values.</summary>
    public static (ushort[] Bits, double[] Values) RoundBits(float[] x, bool bf16)
    {
        var bits = x.Select(f => FromDouble(f, bf16)).ToArray();
        return (bits, bits.Select(b => ToDouble(b, bf16)).ToArray());
    }

    /// <summary>The bits of <paramref name="x"/> rounded to bf16 or fp16 (nearest, ties to even).</summary>
    public static ushort FromDouble(double x, bool bf16) =>
        bf16 ? ((BFloat16)(float)x).Bits : BitConverter.HalfToUInt16Bits((Half)x);

    /// <summary>The exact value of bf16 or fp16 bits.</summary>
    public static double ToDouble(ushort bits, bool bf16) =>
        bf16 ? (float)BFloat16.FromBits(bits) : (double)BitConverter.UInt16BitsToHalf(bits);

    /// <summary>bf16 or fp16 bits as floats (exact).</summary>
    public static float[] Floats(ushort[] bits, bool bf16) => bits.Select(b => (float)ToDouble(b, bf16)).ToArray();
}
