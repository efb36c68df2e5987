using StickBreaking.ILGPU.Kernels.Common;
using static StickBreaking.ILGPU.Kernels.Cuda.CudaTiles;

namespace StickBreaking.ILGPU.Kernels.Cuda;

/// <summary>
/// The logs of one row's 4-key segment of a register tile (<see cref="StickMath.Logs"/> per visible key),
/// shared by the CUDA forward and both CUDA backward passes so that they compute the same log-weights.
/// </summary>
internal static class TileLogs
{
    /// <summary>lb = log(1 - beta) per key of one row's segment (0 where not visible), logBeta = log(beta) (-inf where not visible).</summary>
    public static F4 Logs(F4 dots, float scale, int row, int key, int length, int attendCurrent, out F4 logBeta)
    {
        var lb = new F4();
        logBeta = new F4();
        Element(dots.X0, scale, row, key, length, attendCurrent, out lb.X0, out logBeta.X0);
        Element(dots.X1, scale, row, key + 1, length, attendCurrent, out lb.X1, out logBeta.X1);
        Element(dots.X2, scale, row, key + 2, length, attendCurrent, out lb.X2, out logBeta.X2);
        Element(dots.X3, scale, row, key + 3, length, attendCurrent, out lb.X3, out logBeta.X3);
        return lb;
    }

    private static void Element(float dot, float scale, int row, int key, int length, int attendCurrent, out float lb, out float logBeta)
    {
        if (StickMath.Visible(row, key, length, attendCurrent))
        {
            StickMath.Logs(scale * dot, out lb, out logBeta);
        }
        else
        {
            lb = 0f;
            logBeta = float.NegativeInfinity;   // A = exp(-inf) = 0, beta = 0
        }
    }

    /// <summary>
    /// How many of the keys <paramref name="key"/> .. key + 3 the row sees: it sees the first n of them and none
    /// after (visibility is a prefix of the keys; 0 for a row outside the sequence).
    /// </summary>
    public static int VisibleKeys(int row, int key, int length, int attendCurrent) =>
        StickMath.VisibleKeys(row, key, 4, length, attendCurrent);

    /// <summary>Sum of lb over one segment (the forward's order: nearest key first).</summary>
    public static float SumNearestFirst(F4 x) => x.X3 + x.X2 + x.X1 + x.X0;
}
