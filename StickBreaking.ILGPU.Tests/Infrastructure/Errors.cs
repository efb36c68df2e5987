using System;

namespace StickBreaking.ILGPU.Tests.Infrastructure;

/// <summary>Error measures of fp32 results against float64 references.</summary>
internal static class Errors
{
    public static double MaxAbs(float[] actual, double[] expected)
    {
        if (actual.Length != expected.Length)
            throw new ArgumentException($"lengths differ: {actual.Length} vs {expected.Length}");
        double max = 0;
        for (int i = 0; i < actual.Length; i++)
        {
            double e = Math.Abs(actual[i] - expected[i]);
            if (double.IsNaN(e))
                return double.PositiveInfinity;
            max = Math.Max(max, e);
        }
        return max;
    }

    /// <summary>||actual - expected||_2 / ||expected||_2 (absolute when the reference is all zero); infinity for a NaN.</summary>
    public static double RelativeRms(float[] actual, double[] expected) => RelativeRms(Array.ConvertAll(actual, f => (double)f), expected);

    /// <inheritdoc cref="RelativeRms(float[], double[])"/>
    public static double RelativeRms(double[] actual, double[] expected)
    {
        if (actual.Length != expected.Length)
            throw new ArgumentException($"lengths differ: {actual.Length} vs {expected.Length}");
        double diff = 0, norm = 0;
        for (int i = 0; i < actual.Length; i++)
        {
            double e = actual[i] - expected[i];
            diff += e * e;
            norm += expected[i] * expected[i];
        }
        if (double.IsNaN(diff))
            return double.PositiveInfinity;
        return norm == 0 ? Math.Sqrt(diff) : Math.Sqrt(diff / norm);
    }
}
