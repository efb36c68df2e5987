using System;
using System.Runtime.CompilerServices;

namespace StickBreaking.ILGPU.Kernels;

/// <summary>
/// The scalar pieces of SPEC section 1, shared by every kernel so that the forward and both backward
/// passes compute bitwise the same log-weights.
/// </summary>
internal static class StickMath
{
    /// <summary>visible(i, j): key j &lt; i (or &lt;= i when attending to the current token), both inside the sequence.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static bool Visible(int query, int key, int length, int attendCurrent) =>
        query < length && (key < query || (attendCurrent != 0 && key == query));

    /// <summary>
    /// log1p(u) for u in [0, 1], accurate to a few ulp: log(1 + u) rounds 1 + u, which for small u costs
    /// most of the digits; the factor u / ((1 + u) - 1) puts them back (Goldberg's correction).
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static float Log1p(float u)
    {
        float w = 1f + u;
        return w == 1f ? u : MathF.Log(w) * (u / (w - 1f));
    }

    /// <summary>
    /// The two logs of a stick break, from one exp and one log:
    /// <c>lb = log(1 - beta) = -softplus(z)</c> and <c>logBeta = log(beta) = -softplus(-z)</c>, where
    /// softplus(x) = max(x, 0) + log1p(exp(-|x|)) never overflows.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static void Logs(float z, out float lb, out float logBeta)
    {
        float l = Log1p(MathF.Exp(-MathF.Abs(z)));
        lb = -(MathF.Max(z, 0f) + l);
        logBeta = MathF.Min(z, 0f) - l;
    }
}
