using System;
using ILGPU;

namespace StickBreaking.ILGPU.Kernels.Common;

/// <summary>
/// docs/math.md, "Backward", for one query row against one key tile, shared by both backward passes so that they
/// agree bitwise. On entry z holds q.k and g holds dO.v for the row's <see cref="Snapshots.KeyTile"/>
/// keys. On exit z holds dz and g holds a = A (dO.v); weights holds A when storeWeights is set.
/// <see cref="Run"/> returns the prefix P after the tile.
/// </summary>
internal static class BackwardRowScan
{
    private const int KeyTile = Snapshots.KeyTile;

    // rowAcc: the forward's acc before this tile (its snapshot), the sum of log(1 - beta) over nearer tiles.
    // prefix: P before this tile, the sum of a over the farther tiles. dRemRem: dRem_i * rem_i.
    public static float Run(ArrayView<float> z, ArrayView<float> g, ArrayView<float> oneMinusBetaA,
        ArrayView<float> weights, bool storeWeights, int r, int row, int key0, int length, int attendCurrent,
        float scale, float rowAcc, float prefix, float dRemRem)
    {
        int at = r * KeyTile;
        // Nearest key first: the weights A, exactly as the forward computed them.
        float suffix = 0f;
        for (int j = KeyTile - 1; j >= 0; j--)
        {
            float beta = 0f, a = 0f, oneMinusBetaTimesA = 0f, weight = 0f;
            if (StickMath.Visible(row, key0 + j, length, attendCurrent))
            {
                StickMath.Logs(scale * z[at + j], out float lb, out float logBeta);
                weight = MathF.Exp(logBeta + rowAcc + suffix);
                suffix += lb;
                a = weight * g[at + j];
                beta = MathF.Exp(logBeta);
                oneMinusBetaTimesA = MathF.Exp(lb) * a;   // 1 - beta as sigmoid(-z), never 1 - beta
            }
            z[at + j] = beta;
            g[at + j] = a;
            oneMinusBetaA[at + j] = oneMinusBetaTimesA;
            if (storeWeights)
                weights[at + j] = weight;
        }
        // Farthest key first: dz = (1 - beta) a - beta (P + dRem rem), P the strict prefix of a. A key the row
        // cannot see gets dz = 0 by a select: beta = 0 there, but 0 times an infinite P + dRem rem would be NaN.
        float p = prefix;
        int visible = StickMath.VisibleKeys(row, key0, KeyTile, length, attendCurrent);
        for (int j = 0; j < KeyTile; j++)
        {
            z[at + j] = j < visible ? oneMinusBetaA[at + j] - z[at + j] * (p + dRemRem) : 0f;
            p += g[at + j];
        }
        return p;
    }

    /// <summary>Zeroes the row's slots: the row sees no key of this tile.</summary>
    public static void Clear(ArrayView<float> z, ArrayView<float> weights, bool storeWeights, int r)
    {
        for (int j = 0; j < KeyTile; j++)
        {
            z[r * KeyTile + j] = 0f;
            if (storeWeights)
                weights[r * KeyTile + j] = 0f;
        }
    }
}
