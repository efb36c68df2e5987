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

/// <summary>The forward's outputs on the host for 16-bit storage: o in the storage type, rem and LogRem in fp32.</summary>
/// <typeparam name="T">The storage type: <see cref="System.Half"/> or <see cref="BFloat16"/>.</typeparam>
/// <param name="O">Attention output o, <c>[B, H, T, D]</c>, rounded to the storage type.</param>
/// <param name="Rem">The stick left over per query, rem = prod (1 - beta), <c>[B, H, T]</c>, fp32.</param>
/// <param name="LogRem">Natural log of <paramref name="Rem"/>, computed directly in log space, <c>[B, H, T]</c>, fp32.</param>
public sealed record StickBreakingOutput<T>(T[] O, float[] Rem, float[] LogRem)
    where T : unmanaged;

/// <summary>The backward's gradients on the host for 16-bit storage, each <c>[B, H, T, D]</c>, rounded once to the storage type.</summary>
/// <typeparam name="T">The storage type: <see cref="System.Half"/> or <see cref="BFloat16"/>.</typeparam>
/// <param name="DQ">dL/dq.</param>
/// <param name="DK">dL/dk.</param>
/// <param name="DV">dL/dv.</param>
public sealed record StickBreakingGradients<T>(T[] DQ, T[] DK, T[] DV)
    where T : unmanaged;
