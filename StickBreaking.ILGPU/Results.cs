namespace StickBreaking.ILGPU;

/// <summary>The forward's outputs on the host.</summary>
/// <param name="O">Attention output o, <c>[B, H, T, D]</c>.</param>
/// <param name="Rem">The stick left over per query, rem = prod (1 - beta), <c>[B, H, T]</c>.</param>
/// <param name="LogRem">Natural log of <paramref name="Rem"/>, computed directly in log space, <c>[B, H, T]</c>.</param>
public sealed record StickBreakingOutput(float[] O, float[] Rem, float[] LogRem);

/// <summary>The backward's gradients on the host, each <c>[B, H, T, D]</c>.</summary>
/// <param name="DQ">dL/dq.</param>
/// <param name="DK">dL/dk.</param>
/// <param name="DV">dL/dv.</param>
public sealed record StickBreakingGradients(float[] DQ, float[] DK, float[] DV);
