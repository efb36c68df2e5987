using System;
using MathNet.Numerics;

namespace StickBreaking.ILGPU.Tests.Reference;

/// <summary>
/// The float64 reference of docs/math.md, "Queries behind a cache", written from the Definition: for each sequence b,
/// query head h and query i, the query sits at position p = L_b + after_b - n + i, reads key/value head
/// h / (Hq / Hkv), and sees the cache slots j &lt; min(L_b, p) (j &lt;= p with AttendCurrent, still below L_b). Walking
/// from the nearest visible key back to slot 0: A_j = beta_j prod over nearer visible l of (1 - beta_l), o = sum A_j v_j,
/// rem = prod (1 - beta_j), LogRem = -sum softplus(z_j) (docs/math.md, Log space). Slots it does not see are never read.
/// Layouts: q, o [B, Hq, n, D]; caches [B, Hkv, capacity, D]; rem, LogRem [B, Hq, n].
/// </summary>
internal static class DecodeReference
{
    public static ReferenceForward Forward(double[] q, double[] kCache, double[] vCache, int[] cacheLengths, int[]? keysAfter,
        int batch, int queryHeads, int kvHeads, int queries, int capacity, int headDim, double scale, bool attendCurrent)
    {
        int perKv = queryHeads / kvHeads;
        var o = new double[(long)batch * queryHeads * queries * headDim];
        var rem = new double[batch * queryHeads * queries];
        var logRem = new double[rem.Length];
        for (int b = 0; b < batch; b++)
        {
            int length = cacheLengths[b];
            int end = length + (keysAfter?[b] ?? 0);
            for (int h = 0; h < queryHeads; h++)
            {
                int kv = h / perKv;
                for (int i = 0; i < queries; i++)
                {
                    int row = (b * queryHeads + h) * queries + i;
                    int position = end - queries + i;
                    int nearest = Math.Min(length - 1, attendCurrent ? position : position - 1);
                    double survive = 1.0, sumSoftplus = 0.0;
                    for (int j = nearest; j >= 0; j--)
                    {
                        long kAt = (((long)b * kvHeads + kv) * capacity + j) * headDim;
                        double z = 0;
                        for (int d = 0; d < headDim; d++)
                            z += q[(long)row * headDim + d] * kCache[kAt + d];
                        z *= scale;
                        double weight = SpecialFunctions.Logistic(z) * survive;
                        for (int d = 0; d < headDim; d++)
                            o[(long)row * headDim + d] += weight * vCache[kAt + d];
                        survive *= SpecialFunctions.Logistic(-z);
                        sumSoftplus += Float64Reference.Softplus(z);
                    }
                    rem[row] = Math.Exp(-sumSoftplus);
                    logRem[row] = -sumSoftplus;
                }
            }
        }
        return new ReferenceForward(o, rem, logRem);
    }
}
