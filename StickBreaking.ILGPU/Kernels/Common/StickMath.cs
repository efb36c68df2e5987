using System;
using System.Runtime.CompilerServices;

namespace StickBreaking.ILGPU.Kernels.Common;

/// <summary>
/// The scalar pieces of docs/math.md, "Definition", shared by every kernel so that the forward and both backward
/// passes compute bitwise the same log-weights.
/// </summary>
internal static class StickMath
{
    /// <summary>visible(i, j): key j &lt; i (or &lt;= i when attending to the current token), both inside the sequence.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static bool Visible(int query, int key, int length, int attendCurrent) =>
        query < length && (key < query || (attendCurrent != 0 && key == query));

    /// <summary>
    /// How many keys of the tile that starts at <paramref name="key0"/> the query sees: it sees keys
    /// key0 .. key0 + n - 1 of it and no other (n at most <paramref name="tileKeys"/>; 0 outside the sequence).
    /// The kernels bound their product loops by it, so that a key the query cannot see is never multiplied in
    /// (a weight of 0 times a NaN or infinite value is NaN).
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static int VisibleKeys(int query, int key0, int tileKeys, int length, int attendCurrent) =>
        query < length ? Math.Min(Math.Max(query + attendCurrent - key0, 0), tileKeys) : 0;

    /// <summary>
    /// Of the rows <paramref name="row0"/> .. row0 + <paramref name="blockRows"/> - 1, the first (as an offset
    /// into the block) that sees <paramref name="key"/>: the rows from it to the end of the sequence see it, the
    /// others do not (0 .. blockRows).
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static int FirstRowSeeing(int key, int row0, int blockRows, int attendCurrent) =>
        Math.Min(Math.Max(key + 1 - attendCurrent - row0, 0), blockRows);

    /// <summary>
    /// log1p(u) for u in [0, 1] without a log instruction: log1p(u) = 2 atanh(s) with s = u / (2 + u) in
    /// [0, 1/3], summed as 2 s (1 + s^2/3 + s^4/5 + ... + s^16/17) (truncation below 2e-10 relative).
    /// GPU log instructions (lg2.approx) have an absolute error near 1 that, relative to a small
    /// log1p, is 1e-4; summed over thousands of keys that moved LogRem by 1e-5. No division either:
    /// ptxas makes an IEEE division a subroutine with a slow path, which cost the CUDA backward registers.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static float Log1p(float u)
    {
        // s = u / (2 + u) without a division (IEEE division is a subroutine call on GPUs): 1 / x for
        // x = 2 + u in [2, 3] by Newton's method from the classic linear start on y = x / 4 in [1/2, 3/4]
        // (relative error at most 1/17, squared by each step: 1e-10 after three).
        float y = 0.25f * (2f + u);
        float r = 48f / 17f - 32f / 17f * y;
        r *= 2f - y * r;
        r *= 2f - y * r;
        r += r * (1f - y * r);   // the last step as a correction: rounds better
        float s = u * (0.25f * r);
        float t = s * s;
        float series = 1f / 17f;
        series = series * t + 1f / 15f;
        series = series * t + 1f / 13f;
        series = series * t + 1f / 11f;
        series = series * t + 1f / 9f;
        series = series * t + 1f / 7f;
        series = series * t + 1f / 5f;
        series = series * t + 1f / 3f;
        series = series * t + 1f;
        return 2f * s * series;
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
