using System;
using StickBreaking.ILGPU.Kernels.Common;

namespace StickBreaking.ILGPU;

/// <summary>
/// How the tensors of a call lie in their arrays or views (<see cref="StickBreakingOptions.Layout"/>), one
/// <see cref="TensorLayout"/> each, so that <c>[B, T, H, D]</c> tensors and slices of a fused QKV buffer run without a
/// copy (docs/api.md, "Layouts"). A <c>null</c> entry is the default: for q, k, v and o contiguous
/// <c>[B, heads, T, D]</c>; for a gradient, the layout of the tensor it is the gradient of (dq like q, dk like k, dv like
/// v, dO like o). q, o, dO and dq have <see cref="AttentionShape.Heads"/> heads; k, v, dk and dv
/// <see cref="AttentionShape.KeyValueHeads"/>. rem, LogRem and dRem are always contiguous <c>[B, Heads, T]</c>.
/// A training forward records its layout in the workspace; the device-level backward follows it.
/// </summary>
public sealed record AttentionLayout
{
    /// <summary>Layout of q (default <c>[B, H, T, D]</c>).</summary>
    public TensorLayout? Query { get; init; }

    /// <summary>Layout of k (default <c>[B, Hkv, T, D]</c>).</summary>
    public TensorLayout? Key { get; init; }

    /// <summary>Layout of v (default <c>[B, Hkv, T, D]</c>).</summary>
    public TensorLayout? Value { get; init; }

    /// <summary>Layout of o (default <c>[B, H, T, D]</c>).</summary>
    public TensorLayout? Output { get; init; }

    /// <summary>Layout of dO (default: that of o).</summary>
    public TensorLayout? OutputGradient { get; init; }

    /// <summary>Layout of dq (default: that of q).</summary>
    public TensorLayout? QueryGradient { get; init; }

    /// <summary>Layout of dk (default: that of k).</summary>
    public TensorLayout? KeyGradient { get; init; }

    /// <summary>Layout of dv (default: that of v).</summary>
    public TensorLayout? ValueGradient { get; init; }

    /// <summary>Every tensor <c>[B, T, heads, D]</c>: what q, k, v projections give when viewed per head.</summary>
    /// <param name="shape">The call's shape (its T and head counts set the strides).</param>
    public static AttentionLayout TokenMajor(AttentionShape shape)
    {
        var query = TensorLayout.TokenMajor(shape.Heads, shape.Length, shape.HeadDim);
        var key = TensorLayout.TokenMajor(shape.KeyValueHeads, shape.Length, shape.HeadDim);
        return new AttentionLayout { Query = query, Key = key, Value = key, Output = query };
    }

    /// <summary>
    /// q, k and v as slices of one fused projection output <c>[B, T, Hq + 2 Hkv, D]</c> (the heads of q, then those of k,
    /// then those of v; with Hq = Hkv that is <c>[B, T, 3, H, D]</c>): pass the buffer's view at element 0 as q, at
    /// <c>Hq D</c> as k and at <c>(Hq + Hkv) D</c> as v. o and dO are <c>[B, T, Hq, D]</c>; dq, dk and dv follow q, k and v,
    /// so they may be slices of one fused gradient buffer of the same form.
    /// </summary>
    /// <param name="shape">The call's shape.</param>
    public static AttentionLayout FusedQkv(AttentionShape shape)
    {
        long token = (long)(shape.Heads + 2L * shape.KeyValueHeads) * shape.HeadDim;
        var fused = new TensorLayout(token * shape.Length, shape.HeadDim, token);
        return new AttentionLayout
        {
            Query = fused, Key = fused, Value = fused,
            Output = TensorLayout.TokenMajor(shape.Heads, shape.Length, shape.HeadDim),
        };
    }

    /// <summary>Every entry resolved for <paramref name="shape"/> (defaults filled in); <paramref name="layout"/> may be null.</summary>
    internal static Resolved Resolve(AttentionLayout? layout, AttentionShape shape)
    {
        var query = TensorLayout.HeadMajor(shape.Heads, shape.Length, shape.HeadDim);
        var key = TensorLayout.HeadMajor(shape.KeyValueHeads, shape.Length, shape.HeadDim);
        var q = layout?.Query ?? query;
        var k = layout?.Key ?? key;
        var v = layout?.Value ?? key;
        var o = layout?.Output ?? query;
        return new Resolved(shape, layout is not null, q, k, v, o,
            layout?.OutputGradient ?? o, layout?.QueryGradient ?? q, layout?.KeyGradient ?? k, layout?.ValueGradient ?? v);
    }

    /// <summary>The eight layouts of a call, defaults filled in, with the shape they describe.</summary>
    internal readonly record struct Resolved(AttentionShape Shape, bool Custom,
        TensorLayout Q, TensorLayout K, TensorLayout V, TensorLayout O,
        TensorLayout DO, TensorLayout DQ, TensorLayout DK, TensorLayout DV)
    {
        /// <summary>Elements a view of a query-side tensor (q, o, dO, dq) in <paramref name="layout"/> must hold.</summary>
        public long QuerySpan(TensorLayout layout) => layout.Span(Shape.Batch, Shape.Heads, Shape.Length, Shape.HeadDim);

        /// <summary>Elements a view of a key/value-side tensor (k, v, dk, dv) in <paramref name="layout"/> must hold.</summary>
        public long KeySpan(TensorLayout layout) => layout.Span(Shape.Batch, Shape.KeyValueHeads, Shape.Length, Shape.HeadDim);

        /// <summary>The kernels' form (<see cref="AttentionRows"/>).</summary>
        public AttentionRows Rows => new()
        {
            Q = Strides(Q), O = Strides(O), DO = Strides(DO), DQ = Strides(DQ),
            K = Strides(K), V = Strides(V), DK = Strides(DK), DV = Strides(DV),
            Heads = Shape.Heads, KeyValueHeads = Shape.KeyValueHeads,
        };

        private static RowStrides Strides(TensorLayout x) => new() { Batch = x.BatchStride, Head = x.HeadStride, Token = x.TokenStride };
    }
}
