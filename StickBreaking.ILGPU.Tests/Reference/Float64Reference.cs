using System;
using MathNet.Numerics;
using MathNet.Numerics.LinearAlgebra;

namespace StickBreaking.ILGPU.Tests.Reference;

/// <summary>Float64 forward of stick-breaking attention: o [B,H,T,D], rem and LogRem [B,H,T].</summary>
/// <param name="O">o_i = sum_j A_ij v_j.</param>
/// <param name="Rem">rem_i = prod_{j visible} (1 - beta_ij), the stick left over.</param>
/// <param name="LogRem">Natural log of rem, = -sum_{j visible} softplus(z_ij).</param>
internal sealed record ReferenceForward(double[] O, double[] Rem, double[] LogRem);

/// <summary>Float64 gradients dq, dk, dv, each [B,H,T,D].</summary>
internal sealed record ReferenceGradients(double[] DQ, double[] DK, double[] DV);

/// <summary>
/// The float64 reference of docs/math.md: stick-breaking attention for contiguous row-major [B,H,T,D]
/// arrays (rem, LogRem, dRem are [B,H,T]), one (batch, head) at a time, O(B*H*T^2*D), with
/// MathNet.Numerics for the matrix products and the logistic function.
/// <para>
/// <see cref="Forward"/> follows the sequential definition of docs/math.md, Definition (products of
/// probabilities, walking from the nearest visible key back to key 0); <see cref="ForwardLogSpace"/>
/// is the log-space form (docs/math.md, Log space); <see cref="Backward"/> is the well-conditioned form of docs/math.md, Backward.
/// </para>
/// </summary>
internal static class Float64Reference
{
    /// <summary>The smallest positive normal double; below it a product has lost relative precision.</summary>
    private const double MinNormal = 2.2250738585072014E-308;

    /// <summary>
    /// Forward from the sequential definition:
    /// A_ij = beta_ij * prod_{l visible, l &gt; j} (1 - beta_il), o_i = sum_j A_ij v_j,
    /// rem_i = prod_{j visible} (1 - beta_ij), with beta = sigmoid(z) and 1 - beta = sigmoid(-z)
    /// (never 1 - beta).
    /// <para>
    /// LogRem_i is Math.Log(rem_i), except where the product rem_i underflows below the smallest
    /// normal double (subnormal or 0, e.g. saturated logits or a used-up stick over many tokens):
    /// there it is the log-space sum -sum_{j visible} softplus(z_ij), which stays exact.
    /// </para>
    /// </summary>
    public static ReferenceForward Forward(
        double[] q, double[] k, double[] v,
        int batch, int heads, int length, int headDim, double scale, bool attendCurrent)
    {
        CheckInputs(q, k, v, batch, heads, length, headDim);
        var result = NewForward(batch, heads, length, headDim);
        for (int bh = 0; bh < batch * heads; bh++)
        {
            HeadForward head = SequentialHead(q, k, bh, length, headDim, scale, attendCurrent);
            Matrix<double> o = head.A * Slice(v, bh, length, headDim);
            Store(o, result.O, bh);
            Array.Copy(head.Rem, 0, result.Rem, bh * length, length);
            Array.Copy(head.LogRem, 0, result.LogRem, bh * length, length);
        }

        return result;
    }

    /// <summary>
    /// Forward in log space: log A_ij = z_ij - sum_{l visible, l &gt;= j} softplus(z_il),
    /// LogRem_i = -sum_{j visible} softplus(z_ij), rem_i = exp(LogRem_i), A = exp(log A).
    /// </summary>
    public static ReferenceForward ForwardLogSpace(
        double[] q, double[] k, double[] v,
        int batch, int heads, int length, int headDim, double scale, bool attendCurrent)
    {
        CheckInputs(q, k, v, batch, heads, length, headDim);
        var result = NewForward(batch, heads, length, headDim);
        for (int bh = 0; bh < batch * heads; bh++)
        {
            Matrix<double> z = Logits(q, k, bh, length, headDim, scale);
            Matrix<double> a = Matrix<double>.Build.Dense(length, length);
            for (int i = 0; i < length; i++)
            {
                // Walk from the nearest visible key back to key 0; sumSoftplus is the inclusive
                // suffix sum_{l visible, l >= j} softplus(z_il).
                double sumSoftplus = 0.0;
                for (int j = LastVisible(i, attendCurrent); j >= 0; j--)
                {
                    sumSoftplus += Softplus(z[i, j]);
                    a[i, j] = Math.Exp(z[i, j] - sumSoftplus);
                }

                result.LogRem[bh * length + i] = -sumSoftplus;
                result.Rem[bh * length + i] = Math.Exp(-sumSoftplus);
            }

            Store(a * Slice(v, bh, length, headDim), result.O, bh);
        }

        return result;
    }

    /// <summary>
    /// Gradients of L = sum_i dO_i . o_i + sum_i dRem_i rem_i, in the well-conditioned form of docs/math.md, Backward:
    /// a_ij = A_ij (dO_i . v_j), P_ij = sum_{l visible, l &lt; j} a_il (strict prefix, the farther keys),
    /// dz_ij = (1 - beta_ij) a_ij - beta_ij (P_ij + dRem_i rem_i), 0 where not visible;
    /// dq = s dz k, dk = s dz^T q, dv = A^T dO. A, beta, rem are recomputed with <see cref="Forward"/>'s
    /// sequential definition.
    /// </summary>
    public static ReferenceGradients Backward(
        double[] q, double[] k, double[] v, double[] dO, double[] dRem,
        int batch, int heads, int length, int headDim, double scale, bool attendCurrent)
    {
        CheckInputs(q, k, v, batch, heads, length, headDim);
        CheckLength(dO, nameof(dO), (long)batch * heads * length * headDim);
        CheckLength(dRem, nameof(dRem), (long)batch * heads * length);

        int n = batch * heads * length * headDim;
        var gradients = new ReferenceGradients(new double[n], new double[n], new double[n]);
        for (int bh = 0; bh < batch * heads; bh++)
        {
            HeadForward head = SequentialHead(q, k, bh, length, headDim, scale, attendCurrent);
            Matrix<double> qh = Slice(q, bh, length, headDim);
            Matrix<double> kh = Slice(k, bh, length, headDim);
            Matrix<double> vh = Slice(v, bh, length, headDim);
            Matrix<double> dOh = Slice(dO, bh, length, headDim);

            // a_ij = A_ij * (dO_i . v_j); zero where A is (not visible).
            Matrix<double> a = head.A.PointwiseMultiply(dOh.TransposeAndMultiply(vh));
            Matrix<double> dz = Matrix<double>.Build.Dense(length, length);
            for (int i = 0; i < length; i++)
            {
                double stickTerm = dRem[bh * length + i] * head.Rem[i];
                double prefix = 0.0; // P_ij: sum of a_il over visible l < j
                for (int j = 0; j <= LastVisible(i, attendCurrent); j++)
                {
                    double zij = head.Z[i, j];
                    double beta = SpecialFunctions.Logistic(zij);
                    double oneMinusBeta = SpecialFunctions.Logistic(-zij);
                    dz[i, j] = oneMinusBeta * a[i, j] - beta * (prefix + stickTerm);
                    prefix += a[i, j];
                }
            }

            Store(scale * (dz * kh), gradients.DQ, bh);
            Store(scale * dz.TransposeThisAndMultiply(qh), gradients.DK, bh);
            Store(head.A.TransposeThisAndMultiply(dOh), gradients.DV, bh);
        }

        return gradients;
    }

    /// <summary>softplus(x) = log(1 + e^x) = max(x, 0) + log1p(exp(-|x|)): exact, never overflows.</summary>
    public static double Softplus(double x) => Math.Max(x, 0.0) + SpecialFunctions.Log1p(Math.Exp(-Math.Abs(x)));

    /// <summary>Index of the nearest visible key of query i (-1 when none is visible).</summary>
    private static int LastVisible(int i, bool attendCurrent) => attendCurrent ? i : i - 1;

    /// <summary>One (batch, head): logits z [T,T], weights A [T,T] (0 where not visible), rem, LogRem.</summary>
    private sealed record HeadForward(Matrix<double> Z, Matrix<double> A, double[] Rem, double[] LogRem);

    private static HeadForward SequentialHead(
        double[] q, double[] k, int bh, int length, int headDim, double scale, bool attendCurrent)
    {
        Matrix<double> z = Logits(q, k, bh, length, headDim, scale);
        Matrix<double> weights = Matrix<double>.Build.Dense(length, length);
        var rem = new double[length];
        var logRem = new double[length];
        for (int i = 0; i < length; i++)
        {
            double stick = 1.0;     // prod_{l visible, l > j} (1 - beta_il): what the nearer keys left
            double logStick = 0.0;  // the same in log space, -sum softplus(z_il), for underflow only
            for (int j = LastVisible(i, attendCurrent); j >= 0; j--)
            {
                double beta = SpecialFunctions.Logistic(z[i, j]);
                double oneMinusBeta = SpecialFunctions.Logistic(-z[i, j]);
                weights[i, j] = beta * stick;
                stick *= oneMinusBeta;
                logStick -= Softplus(z[i, j]);
            }

            rem[i] = stick;
            logRem[i] = stick >= MinNormal ? Math.Log(stick) : logStick;
        }

        return new HeadForward(z, weights, rem, logRem);
    }

    /// <summary>z = s q k^T for one (batch, head).</summary>
    private static Matrix<double> Logits(double[] q, double[] k, int bh, int length, int headDim, double scale) =>
        scale * Slice(q, bh, length, headDim).TransposeAndMultiply(Slice(k, bh, length, headDim));

    /// <summary>The [T,D] block of (batch, head) index bh of a row-major [B,H,T,D] array.</summary>
    private static Matrix<double> Slice(double[] x, int bh, int length, int headDim)
    {
        int offset = bh * length * headDim;
        return Matrix<double>.Build.Dense(length, headDim, (r, c) => x[offset + r * headDim + c]);
    }

    private static void Store(Matrix<double> block, double[] destination, int bh)
    {
        int offset = bh * block.RowCount * block.ColumnCount;
        for (int r = 0; r < block.RowCount; r++)
        {
            for (int c = 0; c < block.ColumnCount; c++)
            {
                destination[offset + r * block.ColumnCount + c] = block[r, c];
            }
        }
    }

    private static ReferenceForward NewForward(int batch, int heads, int length, int headDim) =>
        new(new double[batch * heads * length * headDim], new double[batch * heads * length], new double[batch * heads * length]);

    private static void CheckInputs(double[] q, double[] k, double[] v, int batch, int heads, int length, int headDim)
    {
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(batch);
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(heads);
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(length);
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(headDim);
        long n = (long)batch * heads * length * headDim;
        if (n > int.MaxValue)
        {
            throw new ArgumentException($"B*H*T*D = {n} is too large for the reference.", nameof(length));
        }

        CheckLength(q, nameof(q), n);
        CheckLength(k, nameof(k), n);
        CheckLength(v, nameof(v), n);
    }

    private static void CheckLength(double[] x, string name, long expected)
    {
        ArgumentNullException.ThrowIfNull(x, name);
        if (x.Length != expected)
        {
            throw new ArgumentException($"{name} has {x.Length} elements, expected {expected}.", name);
        }
    }
}
