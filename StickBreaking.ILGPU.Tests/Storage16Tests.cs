using System;
using System.Collections.Generic;
using ILGPU;
using ILGPU.Runtime;
using ILGPU.Runtime.CPU;
using NUnit.Framework;
using StickBreaking.ILGPU.Kernels.Common;

namespace StickBreaking.ILGPU.Tests;

/// <summary>
/// <see cref="BFloat16"/> on the host, and the in-kernel 16-bit conversions of <c>Kernels/Common/Storage16.cs</c> on
/// the CPU accelerator against the host's <see cref="System.Half"/> and <see cref="BFloat16"/>: all 65536 bit patterns
/// widened, and a sweep of floats (every exponent, ties, subnormals, NaN, infinities) narrowed.
/// </summary>
[TestFixture]
public sealed class Storage16Tests
{
    [Test]
    public void BFloat16RoundTripsEveryBitPattern()
    {
        for (int bits = 0; bits < 65536; bits++)
        {
            var x = BFloat16.FromBits((ushort)bits);
            float f = (float)x;
            ushort back = ((BFloat16)f).Bits;
            if (float.IsNaN(f))
            {
                Assert.That(float.IsNaN((float)BFloat16.FromBits(back)), $"NaN {bits:X4} stays NaN");
                Assert.That(back & 0x8000, Is.EqualTo(bits & 0x8000), "NaN keeps its sign");
            }
            else if (back != bits)
            {
                Assert.Fail($"{bits:X4} -> {f} -> {back:X4}");
            }
        }
    }

    [Test]
    public void BFloat16RoundsToNearestEven()
    {
        Assert.Multiple(() =>
        {
            // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties to the even mantissa (1).
            Assert.That(((BFloat16)(1f + MathF.Pow(2, -8))).Bits, Is.EqualTo(0x3F80));
            // 1 + 3 * 2^-8 is halfway between 1 + 2^-7 (odd) and 1 + 2^-6 (even): up.
            Assert.That(((BFloat16)(1f + 3 * MathF.Pow(2, -8))).Bits, Is.EqualTo(0x3F82));
            // Just above a tie rounds up, just below rounds down.
            Assert.That(((BFloat16)BitConverter.UInt32BitsToSingle(0x3F808001)).Bits, Is.EqualTo(0x3F81));
            Assert.That(((BFloat16)BitConverter.UInt32BitsToSingle(0x3F807FFF)).Bits, Is.EqualTo(0x3F80));
            // Negative ties, and a tie in the subnormals.
            Assert.That(((BFloat16)BitConverter.UInt32BitsToSingle(0xBF818000)).Bits, Is.EqualTo(0xBF82));
            Assert.That(((BFloat16)BitConverter.UInt32BitsToSingle(0x00018000)).Bits, Is.EqualTo(0x0002));
            Assert.That(((BFloat16)BitConverter.UInt32BitsToSingle(0x00008000)).Bits, Is.EqualTo(0x0000));
            Assert.That((float)(BFloat16)1e-39f, Is.EqualTo(1e-39f).Within(4.6e-41f), "subnormals kept to half an ulp (2^-134)");
        });
    }

    [Test]
    public void BFloat16SpecialValues()
    {
        Assert.Multiple(() =>
        {
            Assert.That(float.IsNaN((float)(BFloat16)float.NaN));
            // A NaN whose payload lies only in the low 16 bits must not truncate or round to infinity.
            var lowPayloadNaN = BitConverter.UInt32BitsToSingle(0x7F80_0001);
            Assert.That(float.IsNaN((float)(BFloat16)lowPayloadNaN));
            Assert.That(float.IsNaN((float)(BFloat16)BitConverter.UInt32BitsToSingle(0xFFFF_FFFF)));
            Assert.That((float)(BFloat16)float.PositiveInfinity, Is.EqualTo(float.PositiveInfinity));
            Assert.That((float)(BFloat16)float.NegativeInfinity, Is.EqualTo(float.NegativeInfinity));
            // The largest finite float is beyond bf16's max + half an ulp: infinity (round to nearest).
            Assert.That((float)(BFloat16)float.MaxValue, Is.EqualTo(float.PositiveInfinity));
            Assert.That((float)(BFloat16)(-float.MaxValue), Is.EqualTo(float.NegativeInfinity));
            // Below the halfway point to 2^128 it stays finite: the largest bf16, 0x7F7F.
            Assert.That(((BFloat16)BitConverter.UInt32BitsToSingle(0x7F7F_7FFF)).Bits, Is.EqualTo(0x7F7F));
            Assert.That(((BFloat16)BitConverter.UInt32BitsToSingle(0x7F7F_8000)).Bits, Is.EqualTo(0x7F80));
            Assert.That(((BFloat16)(-0f)).Bits, Is.EqualTo(0x8000));
            Assert.That(BFloat16.FromBits(0x0000) == BFloat16.FromBits(0x8000), "+0 == -0");
            Assert.That(BFloat16.FromBits(0x7FC0) != BFloat16.FromBits(0x7FC0), "NaN != NaN");
            Assert.That(BFloat16.FromBits(0x7FC0).Equals(BFloat16.FromBits(0x7FC1)), "NaN.Equals(NaN)");
            Assert.That(BFloat16.FromBits(0x0000).GetHashCode(), Is.EqualTo(BFloat16.FromBits(0x8000).GetHashCode()));
            Assert.That(((BFloat16)1.5f).ToString(), Is.EqualTo("1.5"));
        });
    }

    private static void Convert<TStorage>(Index1D i, ArrayView<float> loaded, ArrayView<float> floats, ArrayView<ushort> stored)
        where TStorage : struct, IStorage
    {
        loaded[i] = default(TStorage).Load((ushort)i.X);
        for (long e = i; e < floats.Length; e += loaded.Length)
            stored[e] = default(TStorage).Store(floats[e]);
    }

    /// <summary>Every exponent with edge and random mantissas, ties at 16-bit precision, NaNs and infinities.</summary>
    private static float[] Sweep()
    {
        var values = new List<float>();
        var random = new Random(7);
        uint[] mantissas = [0, 1, 0x1000, 0x0FFF, 0x1FFF, 0x2000, 0x3000, 0x7FFF, 0x8000, 0x8001, 0x18000, 0x7FFFFF, 0x400000];
        for (uint exponent = 0; exponent < 256; exponent++)
        {
            foreach (uint sign in new[] { 0u, 0x8000_0000u })
            {
                foreach (uint m in mantissas)
                    values.Add(BitConverter.UInt32BitsToSingle(sign | (exponent << 23) | m));
                for (int r = 0; r < 8; r++)
                    values.Add(BitConverter.UInt32BitsToSingle(sign | (exponent << 23) | (uint)random.Next(0x800000)));
            }
        }
        // Every fp16 value and the midpoints between neighbours (the ties), subnormals included.
        for (int bits = 0; bits < 0x7C00; bits++)
        {
            float a = (float)BitConverter.UInt16BitsToHalf((ushort)bits), b = (float)BitConverter.UInt16BitsToHalf((ushort)(bits + 1));
            values.Add(a);
            values.Add(-(a + b) / 2);
            values.Add((a + b) / 2);
        }
        values.Add(65504f); values.Add(65519.99f); values.Add(65520f); values.Add(1e-8f); values.Add(2.98023224e-8f);
        return values.ToArray();
    }

    [TestCase(false)]
    [TestCase(true)]
    public void KernelConversionsMatchTheHost(bool bf16)
    {
        using var context = Context.Create(b => b.CPU(CPUDeviceKind.Nvidia).EnableAlgorithms());
        using var accelerator = context.GetCPUDevice(0).CreateAccelerator(context);
        float[] floats = Sweep();
        using var loaded = accelerator.Allocate1D<float>(65536);
        using var input = accelerator.Allocate1D(floats);
        using var stored = accelerator.Allocate1D<ushort>(floats.Length);
        var kernel = bf16
            ? accelerator.LoadAutoGroupedStreamKernel<Index1D, ArrayView<float>, ArrayView<float>, ArrayView<ushort>>(Convert<Bf16Storage>)
            : accelerator.LoadAutoGroupedStreamKernel<Index1D, ArrayView<float>, ArrayView<float>, ArrayView<ushort>>(Convert<Fp16Storage>);
        kernel(65536, loaded.View, input.View, stored.View);
        accelerator.Synchronize();
        float[] widened = loaded.GetAsArray1D();
        ushort[] narrowed = stored.GetAsArray1D();

        for (int bits = 0; bits < 65536; bits++)
        {
            float expected = bf16 ? (float)BFloat16.FromBits((ushort)bits) : (float)BitConverter.UInt16BitsToHalf((ushort)bits);
            if (BitConverter.SingleToUInt32Bits(widened[bits]) != BitConverter.SingleToUInt32Bits(expected))
                Assert.Fail($"load {bits:X4}: {widened[bits]} ({BitConverter.SingleToUInt32Bits(widened[bits]):X8}), host {expected} ({BitConverter.SingleToUInt32Bits(expected):X8})");
        }
        for (int e = 0; e < floats.Length; e++)
        {
            ushort expected = bf16 ? ((BFloat16)floats[e]).Bits : BitConverter.HalfToUInt16Bits((System.Half)floats[e]);
            if (narrowed[e] != expected)
                Assert.Fail($"store {floats[e]:R} ({BitConverter.SingleToUInt32Bits(floats[e]):X8}): {narrowed[e]:X4}, host {expected:X4}");
        }
    }
}
