using System;
using NUnit.Framework;
using StickBreaking.ILGPU.Kernels.Common;
using StickBreaking.ILGPU.Kernels.Portable;

namespace StickBreaking.ILGPU.Tests;

/// <summary>
/// The scalar math every kernel shares, run as plain C#: log1p without a log instruction or a division
/// must stay within a few fp32 ulps of the float64 value over all of [0, 1], tiny arguments included
/// (a log1p relative error there moves LogRem over thousands of keys).
/// </summary>
public sealed class StickMathTests
{
    [Test]
    public void Log1pIsWithinAFewUlpsOnTheWholeRange()
    {
        double worst = 0;
        float worstAt = 0;
        for (int i = 0; i <= 100_000; i++)
        {
            float u = i / 100_000f;
            Check(u, ref worst, ref worstAt);
        }
        for (int e = -40; e <= 0; e++)
        {
            Check(MathF.Pow(2f, e), ref worst, ref worstAt);
            Check(1.5f * MathF.Pow(2f, e - 1), ref worst, ref worstAt);
        }
        TestContext.Out.WriteLine($"max relative error {worst:E2} at u = {worstAt:R}");
        // 3 fp32 machine epsilons; the series with an IEEE division in place of Newton's reciprocal measured 2.2e-7.
        Assert.That(worst, Is.LessThanOrEqualTo(3 * 1.19e-7), "relative error against float64 log1p");
    }

    private static void Check(float u, ref double worst, ref float worstAt)
    {
        double expected = Math.Log(1 + (double)u);
        if (u < 1e-4f)
            expected = (double)u - (double)u * u / 2 + (double)u * u * u / 3;   // log(1 + u) loses digits in double too
        if (expected == 0)
            return;
        double error = Math.Abs(StickMath.Log1p(u) - expected) / expected;
        if (error > worst)
        {
            worst = error;
            worstAt = u;
        }
    }
}
