using System;
using System.Globalization;

namespace StickBreaking.ILGPU;

/// <summary>
/// A bfloat16 value: the upper 16 bits of an IEEE fp32 number (1 sign bit, 8 exponent bits, 7 mantissa bits),
/// the storage type of the 16-bit kernels. Narrowing from <see cref="float"/> rounds to nearest, ties to even;
/// a NaN stays a NaN (never rounded into an infinity); widening to <see cref="float"/> is exact.
/// </summary>
public readonly struct BFloat16 : IEquatable<BFloat16>
{
    /// <summary>The 16 bits of the value (the upper half of the fp32 number it stands for).</summary>
    public readonly ushort Bits;

    private BFloat16(ushort bits) => Bits = bits;

    /// <summary>The value with the given bit pattern.</summary>
    /// <param name="bits">Sign, exponent and mantissa, as the upper half of an fp32 number.</param>
    /// <returns>The bfloat16 value of those bits.</returns>
    public static BFloat16 FromBits(ushort bits) => new(bits);

    /// <summary>
    /// Rounds a float to the nearest bfloat16, ties to even. Finite values beyond the largest bfloat16 by at
    /// least half a unit in the last place become infinities; a NaN becomes a quiet NaN of the same sign.
    /// </summary>
    /// <param name="value">The value to round.</param>
    public static explicit operator BFloat16(float value) => new(RoundToBits(value));

    /// <summary>The exact float value of a bfloat16.</summary>
    /// <param name="value">The value to widen.</param>
    public static explicit operator float(BFloat16 value) => BitConverter.UInt32BitsToSingle((uint)value.Bits << 16);

    /// <summary>IEEE equality: NaN equals nothing, +0 equals -0.</summary>
    /// <param name="left">The left operand.</param>
    /// <param name="right">The right operand.</param>
    /// <returns>Whether the two values compare equal as numbers.</returns>
    public static bool operator ==(BFloat16 left, BFloat16 right) => (float)left == (float)right;

    /// <summary>IEEE inequality: true when either operand is NaN.</summary>
    /// <param name="left">The left operand.</param>
    /// <param name="right">The right operand.</param>
    /// <returns>Whether the two values do not compare equal as numbers.</returns>
    public static bool operator !=(BFloat16 left, BFloat16 right) => !(left == right);

    /// <summary>
    /// Equality as <see cref="float.Equals(float)"/> defines it: equal numbers (+0 and -0 included), and any NaN
    /// equals any NaN.
    /// </summary>
    /// <param name="other">The value to compare with.</param>
    /// <returns>Whether the two values are equal in that sense.</returns>
    public bool Equals(BFloat16 other) => ((float)this).Equals((float)other);

    /// <summary>Equality with a boxed <see cref="BFloat16"/> (see <see cref="Equals(BFloat16)"/>).</summary>
    /// <param name="obj">The object to compare with.</param>
    /// <returns>Whether <paramref name="obj"/> is an equal <see cref="BFloat16"/>.</returns>
    public override bool Equals(object? obj) => obj is BFloat16 other && Equals(other);

    /// <summary>A hash code consistent with <see cref="Equals(BFloat16)"/> (the float value's).</summary>
    /// <returns>The hash code.</returns>
    public override int GetHashCode() => ((float)this).GetHashCode();

    /// <summary>The float value, formatted with the invariant culture.</summary>
    /// <returns>The value as text.</returns>
    public override string ToString() => ((float)this).ToString(CultureInfo.InvariantCulture);

    /// <summary>fp32 bits to bfloat16 bits, round to nearest even; NaN to a quiet NaN with the sign and top payload bits.</summary>
    internal static ushort RoundToBits(float value)
    {
        uint u = BitConverter.SingleToUInt32Bits(value);
        if ((u & 0x7FFF_FFFFu) > 0x7F80_0000u)
            return (ushort)((u >> 16) | 0x0040u);
        return (ushort)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    }
}
