using System;
using System.Collections.Generic;
using NUnit.Framework;

namespace StickBreaking.ILGPU.Tests.Reference;

/// <summary>
/// Checks of the float64 reference itself: the sequential definition against the log-space form,
/// rem = 1 - sum_j A_ij, hand-computed cases, the backward against finite differences of
/// L = sum dO.o + sum dRem.rem (through <see cref="Float64Reference.Forward"/>), and the input generators.
/// </summary>
[TestFixture]
public sealed class ReferenceSelfTests
{
    /// <summary>A problem shape [B, H, T, D].</summary>
    public readonly record struct Shape(int B, int H, int T, int D)
    {
        public int Count => B * H * T * D;

        public int Rows => B * H * T;

        public override string ToString() => $"B{B}H{H}T{T}D{D}";
    }

    private static readonly InputKind[] AllKinds = [InputKind.Standard, InputKind.LongRange, InputKind.Saturated, InputKind.UsedUp];

    private static IEnumerable<TestCaseData> ForwardCases()
    {
        var shapes = new List<Shape>();
        foreach (int t in new[] { 1, 2, 15, 40 })
        {
            foreach (int d in new[] { 1, 3, 16 })
            {
                shapes.Add(new Shape(1, 1, t, d));
            }
        }

        shapes.Add(new Shape(2, 3, 15, 3));
        foreach (InputKind kind in AllKinds)
        {
            foreach (Shape shape in shapes)
            {
                foreach (bool attendCurrent in new[] { false, true })
                {
                    yield return new TestCaseData(kind, shape, attendCurrent);
                }
            }
        }
    }

    [TestCaseSource(nameof(ForwardCases))]
    public void SequentialAndLogSpaceForwardsAgree(InputKind kind, Shape shape, bool attendCurrent)
    {
        AttentionInputs inputs = TestInputs.Create(kind, shape.B, shape.H, shape.T, shape.D, seed: 11 + shape.T * 7 + shape.D);
        double scale = 1.0 / Math.Sqrt(shape.D);
        (double[] q, double[] k, double[] v) = (TestInputs.ToDouble(inputs.Q), TestInputs.ToDouble(inputs.K), TestInputs.ToDouble(inputs.V));

        ReferenceForward sequential = Float64Reference.Forward(q, k, v, shape.B, shape.H, shape.T, shape.D, scale, attendCurrent);
        ReferenceForward logSpace = Float64Reference.ForwardLogSpace(q, k, v, shape.B, shape.H, shape.T, shape.D, scale, attendCurrent);

        for (int i = 0; i < shape.Count; i++)
        {
            // Weights sum to at most 1 and |v| < 2, so 1e-12 absolute (relative above 1) is tight.
            Assert.That(sequential.O[i], Is.EqualTo(logSpace.O[i]).Within(1e-12 * Math.Max(1.0, Math.Abs(logSpace.O[i]))), $"O[{i}]");
        }

        for (int i = 0; i < shape.Rows; i++)
        {
            double rem = logSpace.Rem[i];
            Assert.That(sequential.Rem[i], Is.EqualTo(rem).Within(1e-12 * rem + 1e-300), $"Rem[{i}]");
            Assert.That(sequential.LogRem[i], Is.EqualTo(logSpace.LogRem[i]).Within(1e-12 * Math.Max(1.0, Math.Abs(logSpace.LogRem[i]))), $"LogRem[{i}]");
            Assert.That(sequential.Rem[i], Is.InRange(0.0, 1.0), $"Rem[{i}]");
            Assert.That(sequential.LogRem[i], Is.LessThanOrEqualTo(0.0), $"LogRem[{i}]");
        }
    }

    [Test]
    public void RemIsOneMinusTheSumOfTheWeights([ValueSource(nameof(AllKinds))] InputKind kind, [Values] bool attendCurrent)
    {
        var shape = new Shape(2, 2, 40, 3);
        AttentionInputs inputs = TestInputs.Create(kind, shape.B, shape.H, shape.T, shape.D, seed: 5);
        double[] q = TestInputs.ToDouble(inputs.Q);
        double[] k = TestInputs.ToDouble(inputs.K);
        double[] ones = new double[shape.Count];
        Array.Fill(ones, 1.0); // with v = 1 every component of o_i is sum_j A_ij
        double scale = 1.0 / Math.Sqrt(shape.D);

        ReferenceForward sequential = Float64Reference.Forward(q, k, ones, shape.B, shape.H, shape.T, shape.D, scale, attendCurrent);
        ReferenceForward logSpace = Float64Reference.ForwardLogSpace(q, k, ones, shape.B, shape.H, shape.T, shape.D, scale, attendCurrent);

        for (int row = 0; row < shape.Rows; row++)
        {
            for (int e = 0; e < shape.D; e++)
            {
                Assert.That(sequential.O[row * shape.D + e], Is.EqualTo(1.0 - sequential.Rem[row]).Within(1e-14), $"sequential row {row}");
                Assert.That(logSpace.O[row * shape.D + e], Is.EqualTo(1.0 - logSpace.Rem[row]).Within(1e-14), $"log-space row {row}");
            }
        }
    }

    [Test]
    public void FirstQuerySeesOnlyItselfOrNothing([Values] InputKind kind, [Values] bool attendCurrent)
    {
        var shape = new Shape(2, 3, 5, 4);
        AttentionInputs inputs = TestInputs.Create(kind, shape.B, shape.H, shape.T, shape.D, seed: 3);
        double[] q = TestInputs.ToDouble(inputs.Q);
        double[] k = TestInputs.ToDouble(inputs.K);
        double[] v = TestInputs.ToDouble(inputs.V);
        const double scale = 0.5;

        foreach (ReferenceForward forward in new[]
        {
            Float64Reference.Forward(q, k, v, shape.B, shape.H, shape.T, shape.D, scale, attendCurrent),
            Float64Reference.ForwardLogSpace(q, k, v, shape.B, shape.H, shape.T, shape.D, scale, attendCurrent),
        })
        {
            for (int bh = 0; bh < shape.B * shape.H; bh++)
            {
                int row0 = bh * shape.T;
                if (!attendCurrent)
                {
                    Assert.That(forward.Rem[row0], Is.EqualTo(1.0), "rem_0");
                    Assert.That(forward.LogRem[row0], Is.EqualTo(0.0), "LogRem_0");
                    for (int e = 0; e < shape.D; e++)
                    {
                        Assert.That(forward.O[row0 * shape.D + e], Is.EqualTo(0.0), "o_0");
                    }
                }
                else
                {
                    double z00 = 0.0;
                    for (int e = 0; e < shape.D; e++)
                    {
                        z00 += q[row0 * shape.D + e] * k[row0 * shape.D + e];
                    }

                    z00 *= scale;
                    double beta = 1.0 / (1.0 + Math.Exp(-z00));
                    Assert.That(forward.Rem[row0], Is.EqualTo(1.0 / (1.0 + Math.Exp(z00))).Within(1e-15), "rem_0");
                    Assert.That(forward.LogRem[row0], Is.EqualTo(-Math.Log(1.0 + Math.Exp(z00))).Within(1e-14), "LogRem_0");
                    for (int e = 0; e < shape.D; e++)
                    {
                        Assert.That(forward.O[row0 * shape.D + e], Is.EqualTo(beta * v[row0 * shape.D + e]).Within(1e-15), "o_0");
                    }
                }
            }
        }
    }

    [Test]
    public void HandComputedThreeTokens([Values] bool attendCurrent)
    {
        // D = 1, scale 0.7: z_ij = 0.7 q_i k_j.
        double[] q = [0.3, -1.2, 2.0];
        double[] k = [1.5, 0.4, -0.8];
        double[] v = [2.0, -3.0, 5.0];
        const double scale = 0.7;
        double Beta(int i, int j) => 1.0 / (1.0 + Math.Exp(-scale * q[i] * k[j]));

        ReferenceForward forward = Float64Reference.Forward(q, k, v, 1, 1, 3, 1, scale, attendCurrent);

        double[] expectedO;
        double[] expectedRem;
        if (!attendCurrent)
        {
            expectedO = [0.0, Beta(1, 0) * v[0], Beta(2, 1) * v[1] + Beta(2, 0) * (1 - Beta(2, 1)) * v[0]];
            expectedRem = [1.0, 1 - Beta(1, 0), (1 - Beta(2, 1)) * (1 - Beta(2, 0))];
        }
        else
        {
            expectedO =
            [
                Beta(0, 0) * v[0],
                Beta(1, 1) * v[1] + Beta(1, 0) * (1 - Beta(1, 1)) * v[0],
                Beta(2, 2) * v[2] + Beta(2, 1) * (1 - Beta(2, 2)) * v[1] + Beta(2, 0) * (1 - Beta(2, 1)) * (1 - Beta(2, 2)) * v[0],
            ];
            expectedRem = [1 - Beta(0, 0), (1 - Beta(1, 1)) * (1 - Beta(1, 0)), (1 - Beta(2, 2)) * (1 - Beta(2, 1)) * (1 - Beta(2, 0))];
        }

        for (int i = 0; i < 3; i++)
        {
            Assert.That(forward.O[i], Is.EqualTo(expectedO[i]).Within(1e-14), $"o_{i}");
            Assert.That(forward.Rem[i], Is.EqualTo(expectedRem[i]).Within(1e-14), $"rem_{i}");
            Assert.That(forward.LogRem[i], Is.EqualTo(Math.Log(expectedRem[i])).Within(1e-13), $"LogRem_{i}");
        }
    }

    [Test]
    public void LogRemStaysFiniteWhereRemUnderflows()
    {
        // D = 1, every logit 40: sigmoid(-40) ~ 4.2e-18, so rem underflows after ~18 keys; LogRem = -i softplus(40).
        const int t = 40;
        double[] q = new double[t];
        double[] k = new double[t];
        double[] v = new double[t];
        Array.Fill(q, 4.0);
        Array.Fill(k, 10.0);
        Array.Fill(v, 1.0);

        ReferenceForward forward = Float64Reference.Forward(q, k, v, 1, 1, t, 1, 1.0, attendCurrent: false);

        Assert.That(forward.Rem[t - 1], Is.EqualTo(0.0), "rem underflows in double");
        for (int i = 0; i < t; i++)
        {
            Assert.That(forward.LogRem[i], Is.EqualTo(-i * Float64Reference.Softplus(40.0)).Within(1e-12 * (1 + 40.0 * i)), $"LogRem_{i}");
            Assert.That(forward.O[i], Is.EqualTo(i == 0 ? 0.0 : 1.0).Within(1e-15), $"o_{i}");
        }
    }

    // ---------------------------------------------------------------- backward vs finite differences

    private static readonly Shape[] FiniteDifferenceShapes =
    [
        new(1, 1, 1, 2),
        new(1, 1, 2, 1),
        new(1, 1, 5, 3),
        new(1, 1, 12, 5),
        new(2, 2, 7, 3),
    ];

    [Test]
    public void BackwardMatchesFiniteDifferences(
        [ValueSource(nameof(FiniteDifferenceShapes))] Shape shape,
        [Values] bool attendCurrent,
        [Values] bool zeroDRem,
        [Values(1.0, 0.1)] double scale)
    {
        AttentionInputs inputs = TestInputs.Standard(shape.B, shape.H, shape.T, shape.D, seed: 100 + shape.T);
        if (zeroDRem)
        {
            inputs = inputs.WithZeroDRem();
        }

        CheckAgainstFiniteDifferences(inputs, shape, scale, attendCurrent, relativeTolerance: 1e-8);
    }

    [Test]
    public void BackwardMatchesFiniteDifferencesForEveryInputKind([ValueSource(nameof(AllKinds))] InputKind kind, [Values] bool attendCurrent)
    {
        var shape = new Shape(1, 2, 10, 3);
        AttentionInputs inputs = TestInputs.Create(kind, shape.B, shape.H, shape.T, shape.D, seed: 21);
        CheckAgainstFiniteDifferences(inputs, shape, 1.0 / Math.Sqrt(shape.D), attendCurrent, relativeTolerance: 1e-8);
    }

    [Test]
    public void SaturatedBackwardMatchesFiniteDifferences([Values] bool attendCurrent)
    {
        // D = 1, scale 1, every logit z_ij = q_i k_j in [11, 30], most near the low end:
        // 1 - beta is below 2e-5, and the gradients through z are of order exp(-z) (1e-5 down to 1e-13),
        // far below the O(1) gradients through v. Those above the rounding floor of the finite
        // difference must match it; the others must be below the floor.
        var shape = new Shape(1, 1, 8, 1);
        var random = new Random(7);
        var q = new float[shape.T];
        var k = new float[shape.T];
        for (int i = 0; i < shape.T; i++)
        {
            q[i] = (float)(4.0 + random.NextDouble());                        // [4, 5]
            k[i] = (float)(2.75 + 3.25 * Math.Pow(random.NextDouble(), 3.0)); // [2.75, 6], mostly near 2.75
        }

        AttentionInputs standard = TestInputs.Standard(shape.B, shape.H, shape.T, shape.D, seed: 8);
        var inputs = standard with { Q = q, K = k };
        double minZ = double.PositiveInfinity, maxZ = double.NegativeInfinity;
        for (int i = 0; i < shape.T; i++)
        {
            for (int j = 0; j < shape.T; j++)
            {
                minZ = Math.Min(minZ, (double)q[i] * k[j]);
                maxZ = Math.Max(maxZ, (double)q[i] * k[j]);
            }
        }

        Assert.That(minZ, Is.InRange(11.0, 12.5), "smallest logit");
        Assert.That(maxZ, Is.InRange(25.0, 30.0), "largest logit");

        int wellConditioned = CheckAgainstFiniteDifferences(inputs, shape, 1.0, attendCurrent, relativeTolerance: 1e-7);

        // The check must have covered gradients through z, not only those through v.
        Assert.That(wellConditioned, Is.GreaterThanOrEqualTo(6), "well-conditioned dq and dk elements");
    }

    /// <summary>
    /// Compares <see cref="Float64Reference.Backward"/> with a 4-point central difference (step 1e-3,
    /// truncation error O(h^4)) of L, element by element: |fd - g| &lt;= relativeTolerance |g| + floor,
    /// where floor is 4 ulps of sum |terms of L| over the step (measured: the rounding noise of the
    /// difference stays below half of that). Returns how many elements of dq and dk were well
    /// conditioned (|g| at least 1000 floor).
    /// </summary>
    private static int CheckAgainstFiniteDifferences(AttentionInputs inputs, Shape shape, double scale, bool attendCurrent, double relativeTolerance)
    {
        double[] q = TestInputs.ToDouble(inputs.Q);
        double[] k = TestInputs.ToDouble(inputs.K);
        double[] v = TestInputs.ToDouble(inputs.V);
        double[] dO = TestInputs.ToDouble(inputs.DO);
        double[] dRem = TestInputs.ToDouble(inputs.DRem);

        ReferenceGradients gradients = Float64Reference.Backward(q, k, v, dO, dRem, shape.B, shape.H, shape.T, shape.D, scale, attendCurrent);

        double Loss()
        {
            ReferenceForward f = Float64Reference.Forward(q, k, v, shape.B, shape.H, shape.T, shape.D, scale, attendCurrent);
            double sum = 0.0;
            for (int i = 0; i < f.O.Length; i++)
            {
                sum += dO[i] * f.O[i];
            }

            for (int i = 0; i < f.Rem.Length; i++)
            {
                sum += dRem[i] * f.Rem[i];
            }

            return sum;
        }

        ReferenceForward forward = Float64Reference.Forward(q, k, v, shape.B, shape.H, shape.T, shape.D, scale, attendCurrent);
        double magnitude = 0.0;
        for (int i = 0; i < forward.O.Length; i++)
        {
            magnitude += Math.Abs(dO[i] * forward.O[i]);
        }

        for (int i = 0; i < forward.Rem.Length; i++)
        {
            magnitude += Math.Abs(dRem[i] * forward.Rem[i]);
        }

        const double step = 1e-3;
        double floor = 4.0 * Math.Pow(2, -52) * Math.Max(magnitude, 1e-300) / step;
        int wellConditioned = 0;
        foreach ((string name, double[] x, double[] g) in new[] { ("dq", q, gradients.DQ), ("dk", k, gradients.DK), ("dv", v, gradients.DV) })
        {
            for (int i = 0; i < x.Length; i++)
            {
                double original = x[i];
                x[i] = original + 2 * step;
                double plus2 = Loss();
                x[i] = original + step;
                double plus1 = Loss();
                x[i] = original - step;
                double minus1 = Loss();
                x[i] = original - 2 * step;
                double minus2 = Loss();
                x[i] = original;
                double fd = (-plus2 + 8 * plus1 - 8 * minus1 + minus2) / (12 * step);

                Assert.That(g[i], Is.EqualTo(fd).Within(relativeTolerance * Math.Abs(g[i]) + floor), $"{name}[{i}]");
                if (!ReferenceEquals(x, v) && Math.Abs(g[i]) >= 1000 * floor)
                {
                    wellConditioned++;
                }
            }
        }

        return wellConditioned;
    }

    // ---------------------------------------------------------------- the input generators

    [Test]
    public void GeneratorsAreDeterministic([Values] InputKind kind)
    {
        AttentionInputs a = TestInputs.Create(kind, 2, 2, 9, 5, seed: 42);
        AttentionInputs b = TestInputs.Create(kind, 2, 2, 9, 5, seed: 42);
        AttentionInputs c = TestInputs.Create(kind, 2, 2, 9, 5, seed: 43);
        Assert.That(a.Q, Is.EqualTo(b.Q).AsCollection);
        Assert.That(a.K, Is.EqualTo(b.K).AsCollection);
        Assert.That(a.V, Is.EqualTo(b.V).AsCollection);
        Assert.That(a.DO, Is.EqualTo(b.DO).AsCollection);
        Assert.That(a.DRem, Is.EqualTo(b.DRem).AsCollection);
        Assert.That(a.Q, Is.Not.EqualTo(c.Q).AsCollection);
        Assert.That(a.Q, Has.Length.EqualTo(2 * 2 * 9 * 5));
        Assert.That(a.DRem, Has.Length.EqualTo(2 * 2 * 9));
        AttentionInputs zero = a.WithZeroDRem();
        Assert.That(zero.DRem, Is.All.EqualTo(0.0f));
        Assert.That(zero.DRem, Has.Length.EqualTo(a.DRem.Length));
        Assert.That(zero.Q, Is.SameAs(a.Q));
        Assert.That(a.DRem, Has.Some.Not.EqualTo(0.0f), "the original is untouched");
    }

    [Test]
    public void LongRangeLogitsAreAroundMinus6Point4([Values(1, 16, 128)] int d)
    {
        (double min, double max, double mean, _) = LogitStatistics(TestInputs.LongRange(1, 2, 64, d, seed: 1), 2, 64, d);
        Assert.That(mean, Is.InRange(-6.6, -6.2));
        Assert.That(min, Is.GreaterThan(-8.5));
        Assert.That(max, Is.LessThan(-4.5));
    }

    [Test]
    public void SaturatedLogitsReachPlusAndMinus30([Values(1, 16, 128)] int d)
    {
        (double min, double max, _, double fp32One) = LogitStatistics(TestInputs.Saturated(1, 2, 64, d, seed: 1), 2, 64, d);
        Assert.That(max, Is.InRange(25.0, 32.0));
        Assert.That(min, Is.InRange(-32.0, -25.0));
        Assert.That(fp32One, Is.InRange(0.03, 0.25), "fraction of pairs whose beta rounds to 1 in fp32");
    }

    [Test]
    public void UsedUpStickReachesHundredsNegative([Values(1, 16, 128)] int d)
    {
        const int t = 300;
        AttentionInputs inputs = TestInputs.UsedUp(1, 1, t, d, seed: 1);
        (double min, double max, _, _) = LogitStatistics(inputs, 1, t, d);
        Assert.That(min, Is.GreaterThan(1.5));
        Assert.That(max, Is.LessThan(4.5));
        ReferenceForward forward = Float64Reference.ForwardLogSpace(
            TestInputs.ToDouble(inputs.Q), TestInputs.ToDouble(inputs.K), TestInputs.ToDouble(inputs.V), 1, 1, t, d, 1.0 / Math.Sqrt(d), attendCurrent: false);
        Assert.That(forward.LogRem[100], Is.LessThan(-200.0));
        Assert.That(forward.LogRem[t - 1], Is.LessThan(-600.0));
    }

    /// <summary>Min, max and mean of z_ij = q_i.k_j / sqrt(D) over all pairs, and the fraction with fp32 sigmoid(z) == 1.</summary>
    private static (double Min, double Max, double Mean, double Fp32One) LogitStatistics(AttentionInputs inputs, int heads, int t, int d)
    {
        double min = double.PositiveInfinity, max = double.NegativeInfinity, sum = 0.0;
        int ones = 0;
        for (int bh = 0; bh < heads; bh++)
        {
            for (int i = 0; i < t; i++)
            {
                for (int j = 0; j < t; j++)
                {
                    double z = 0.0;
                    for (int e = 0; e < d; e++)
                    {
                        z += (double)inputs.Q[(bh * t + i) * d + e] * inputs.K[(bh * t + j) * d + e];
                    }

                    z /= Math.Sqrt(d);
                    min = Math.Min(min, z);
                    max = Math.Max(max, z);
                    sum += z;
                    if (1.0f / (1.0f + MathF.Exp(-(float)z)) == 1.0f)
                    {
                        ones++;
                    }
                }
            }
        }

        double pairs = (double)heads * t * t;
        return (min, max, sum / pairs, ones / pairs);
    }
}
