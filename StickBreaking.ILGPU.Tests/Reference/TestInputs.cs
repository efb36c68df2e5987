using System;

namespace StickBreaking.ILGPU.Tests.Reference;

/// <summary>Host fp32 inputs of one test case, contiguous row-major: q, k, v, dO are [B,H,T,D], dRem is [B,H,T].</summary>
internal sealed record AttentionInputs(float[] Q, float[] K, float[] V, float[] DO, float[] DRem)
{
    /// <summary>The same inputs with dRem all zero (new dRem array; the other arrays are shared).</summary>
    public AttentionInputs WithZeroDRem() => this with { DRem = new float[DRem.Length] };
}

/// <summary>The families of inputs of docs/math.md, Test cases.</summary>
public enum InputKind
{
    Standard,
    LongRange,
    Saturated,
    UsedUp,
}

/// <summary>
/// Deterministic fp32 test inputs (System.Random(seed) + Box-Muller). In every family
/// v = 0.25 N(0,1), dO = 0.5 N(0,1), dRem = 0.5 N(0,1).
/// <para>
/// LongRange, Saturated and UsedUp target the logits z_ij = s q_i.k_j for the DEFAULT scale
/// s = 1/sqrt(D), for any D &gt;= 1: per (batch, head) a random unit direction u, and
/// q_i = D^(1/4) x_i u + sigma n, k_j = D^(1/4) y_j u + sigma n' (n, n' standard normal vectors),
/// so that z_ij = x_i y_j + O(sigma (|x_i| + |y_j|) D^(-1/4) + sigma^2).
/// </para>
/// </summary>
internal static class TestInputs
{
    /// <summary>Standard inputs (docs/math.md, Test cases): q = 0.25 (N + 1), k = 0.25 (N - 1), v = 0.25 N.</summary>
    public static AttentionInputs Standard(int b, int h, int t, int d, int seed)
    {
        var normal = new Gaussian(seed);
        int n = Count(b, h, t, d);
        float[] q = Fill(n, () => 0.25 * (normal.Next() + 1.0));
        float[] k = Fill(n, () => 0.25 * (normal.Next() - 1.0));
        return WithGradientsAndValues(q, k, b * h * t, n, normal);
    }

    /// <summary>
    /// Long range: z ~ -6.4 (x_i = 1 + 0.05 N, y_j = -6.4 + 0.25 N, sigma = 0.02; measured mean -6.4,
    /// extremes about -8.2 and -4.7 over 300 x 300 pairs), so beta ~ 0.0017 and about exp(-0.0017 n) of the
    /// stick survives n keys (LogRem ~ -0.5 at n = 300): the stick lasts many tiles.
    /// </summary>
    public static AttentionInputs LongRange(int b, int h, int t, int d, int seed)
    {
        var normal = new Gaussian(seed);
        return Structured(b, h, t, d, normal,
            queryMagnitude: () => 1.0 + 0.05 * normal.Next(),
            keyMagnitude: () => -6.4 + 0.25 * normal.Next(),
            sigma: 0.02);
    }

    /// <summary>
    /// Saturated: z spread over about [-30, +30] (x_i uniform in [0.5, 1], y_j uniform in [-30, 30],
    /// sigma = 0.01). About a tenth of the pairs have z &gt; 17.3, where sigmoid(z) rounds to 1 in fp32.
    /// </summary>
    public static AttentionInputs Saturated(int b, int h, int t, int d, int seed)
    {
        var normal = new Gaussian(seed);
        return Structured(b, h, t, d, normal,
            queryMagnitude: () => 0.5 + 0.5 * normal.NextUniform(),
            keyMagnitude: () => -30.0 + 60.0 * normal.NextUniform(),
            sigma: 0.01);
    }

    /// <summary>
    /// Used-up stick: positive logits z in about [2, 4] (x_i uniform in [0.9, 1.1], y_j uniform in
    /// [2.2, 3.6], sigma = 0.02): each key takes softplus(z) ~ 3 off LogRem, so LogRem_i ~ -3 i
    /// (about -300 at i = 100, -900 at i = 300).
    /// </summary>
    public static AttentionInputs UsedUp(int b, int h, int t, int d, int seed)
    {
        var normal = new Gaussian(seed);
        return Structured(b, h, t, d, normal,
            queryMagnitude: () => 0.9 + 0.2 * normal.NextUniform(),
            keyMagnitude: () => 2.2 + 1.4 * normal.NextUniform(),
            sigma: 0.02);
    }

    /// <summary>The inputs of the given family.</summary>
    public static AttentionInputs Create(InputKind kind, int b, int h, int t, int d, int seed) => kind switch
    {
        InputKind.Standard => Standard(b, h, t, d, seed),
        InputKind.LongRange => LongRange(b, h, t, d, seed),
        InputKind.Saturated => Saturated(b, h, t, d, seed),
        InputKind.UsedUp => UsedUp(b, h, t, d, seed),
        _ => throw new ArgumentOutOfRangeException(nameof(kind), kind, "Unknown input kind."),
    };

    /// <summary>Widens an fp32 array to float64 (exactly).</summary>
    public static double[] ToDouble(float[] x)
    {
        ArgumentNullException.ThrowIfNull(x);
        var result = new double[x.Length];
        for (int i = 0; i < x.Length; i++)
        {
            result[i] = x[i];
        }

        return result;
    }

    private static AttentionInputs Structured(
        int b, int h, int t, int d, Gaussian normal,
        Func<double> queryMagnitude, Func<double> keyMagnitude, double sigma)
    {
        int n = Count(b, h, t, d);
        var q = new float[n];
        var k = new float[n];
        double c = Math.Pow(d, 0.25); // c^2 * s = 1 for s = 1/sqrt(D)
        var u = new double[d];
        for (int bh = 0; bh < b * h; bh++)
        {
            // A random unit direction per (batch, head); for D = 1 it is +1 or -1.
            double norm = 0.0;
            while (norm < 1e-3)
            {
                norm = 0.0;
                for (int e = 0; e < d; e++)
                {
                    u[e] = normal.Next();
                    norm += u[e] * u[e];
                }

                norm = Math.Sqrt(norm);
            }

            for (int row = 0; row < t; row++)
            {
                double x = queryMagnitude();
                double y = keyMagnitude();
                int offset = (bh * t + row) * d;
                for (int e = 0; e < d; e++)
                {
                    q[offset + e] = (float)(c * x * u[e] / norm + sigma * normal.Next());
                    k[offset + e] = (float)(c * y * u[e] / norm + sigma * normal.Next());
                }
            }
        }

        return WithGradientsAndValues(q, k, b * h * t, n, normal);
    }

    private static AttentionInputs WithGradientsAndValues(float[] q, float[] k, int rows, int n, Gaussian normal)
    {
        float[] v = Fill(n, () => 0.25 * normal.Next());
        float[] dO = Fill(n, () => 0.5 * normal.Next());
        float[] dRem = Fill(rows, () => 0.5 * normal.Next());
        return new AttentionInputs(q, k, v, dO, dRem);
    }

    private static int Count(int b, int h, int t, int d)
    {
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(b);
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(h);
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(t);
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(d);
        long n = (long)b * h * t * d;
        if (n > int.MaxValue)
        {
            throw new ArgumentException($"B*H*T*D = {n} does not fit one array.", nameof(t));
        }

        return (int)n;
    }

    private static float[] Fill(int n, Func<double> next)
    {
        var x = new float[n];
        for (int i = 0; i < n; i++)
        {
            x[i] = (float)next();
        }

        return x;
    }

    /// <summary>Standard normal deviates by Box-Muller from a seeded System.Random (deterministic).</summary>
    private sealed class Gaussian(int seed)
    {
        private readonly Random random = new(seed);
        private double spare;
        private bool hasSpare;

        public double Next()
        {
            if (hasSpare)
            {
                hasSpare = false;
                return spare;
            }

            double u1 = 1.0 - random.NextDouble(); // in (0, 1], so the log is finite
            double u2 = random.NextDouble();
            double r = Math.Sqrt(-2.0 * Math.Log(u1));
            spare = r * Math.Sin(2.0 * Math.PI * u2);
            hasSpare = true;
            return r * Math.Cos(2.0 * Math.PI * u2);
        }

        /// <summary>A uniform deviate in [0, 1) from the same stream.</summary>
        public double NextUniform() => random.NextDouble();
    }
}
