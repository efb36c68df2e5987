using System;

namespace StickBreaking.ILGPU;

/// <summary>Options of a stick-breaking attention call. The defaults are the paper's.</summary>
public sealed record StickBreakingOptions
{
    /// <summary>The default options: scale 1/sqrt(D), keys strictly before the query.</summary>
    public static StickBreakingOptions Default { get; } = new();

    /// <summary>
    /// The scale s in z = s (q . k). <c>null</c> means 1 / sqrt(HeadDim). Must be finite.
    /// </summary>
    public float? InvTemperature { get; init; }

    /// <summary>
    /// <c>false</c> (default): query i sees keys j &lt; i, so query 0 sees nothing (o = 0, rem = 1).
    /// <c>true</c>: query i also sees its own key (j &lt;= i).
    /// </summary>
    public bool AttendCurrent { get; init; }

    /// <summary>
    /// fp16 and bf16 on tensor cores: <c>false</c> (default) rounds the fp32 weights (the forward's P, the backward's
    /// A and dz) once to the storage type before they enter the 16-bit products, which puts o and the gradients
    /// within about 1.1-1.9x of the error of rounding the exact result to the storage type (always within 2x).
    /// <c>true</c> feeds them as two 16-bit parts (a second product on the same operands): o and the gradients at
    /// that rounding floor, for about 5-10 % more time in bf16 and 25-35 % in fp16 on an H200. No effect on fp32 or on
    /// the portable kernels, whose products are fp32. A backward uses its training forward's choice.
    /// </summary>
    public bool ExactProducts { get; init; }

    /// <summary>
    /// Where the call's tensors lie in their arrays or views (strides per tensor, e.g. <c>[B, T, H, D]</c> or slices of a
    /// fused QKV buffer); <c>null</c> (default) for contiguous <c>[B, heads, T, D]</c> everywhere. A training forward records
    /// it in its workspace, and the device-level backward follows it for dO, dq, dk and dv too.
    /// </summary>
    public AttentionLayout? Layout { get; init; }

    /// <summary>The scale this call uses for the given head dimension.</summary>
    /// <param name="headDim">The head dimension D.</param>
    public float ScaleFor(int headDim) => InvTemperature ?? 1f / MathF.Sqrt(headDim);

    internal void Validate(string paramName)
    {
        if (InvTemperature is float s && !float.IsFinite(s))
            throw new ArgumentOutOfRangeException(paramName, s,
                $"{paramName}.{nameof(InvTemperature)} must be finite (got {s}).");
    }
}
