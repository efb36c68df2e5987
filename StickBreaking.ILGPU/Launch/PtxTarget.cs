using System;

namespace StickBreaking.ILGPU.Launch;

/// <summary>
/// ILGPU 1.5.3 emits every PTX module for <c>.target sm_80</c> (whatever the device), so Hopper-only instructions
/// (<c>wgmma</c>, which needs the architecture-specific <c>sm_90a</c>) are refused by the driver's compiler.
/// <see cref="Hopper"/> rewrites the target line; the module's <c>.version</c> (8.8 for an SM 9.0 device) already allows
/// them. A module so retargeted loads only on an SM 9.0 device.
/// </summary>
internal static class PtxTarget
{
    /// <summary>The PTX with its <c>.target sm_80</c> line as <c>.target sm_90a</c>; throws when there is no such line.</summary>
    public static string Hopper(string ptx)
    {
        const string From = "\n.target sm_80\n", To = "\n.target sm_90a\n";
        string normalized = ptx.Replace("\r\n", "\n");
        int at = normalized.IndexOf(From, StringComparison.Ordinal);
        if (at < 0)
            throw new InvalidOperationException("The PTX has no '.target sm_80' line to retarget to sm_90a.");
        return string.Concat(normalized.AsSpan(0, at), To, normalized.AsSpan(at + From.Length));
    }
}
