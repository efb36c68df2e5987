using System;

namespace StickBreaking.ILGPU;

/// <summary>
/// Where the elements of one attention tensor lie in its array or view, in elements (not bytes): element (b, h, t, d)
/// sits at <c>b * BatchStride + h * HeadStride + t * TokenStride + d</c>. The head dimension is always contiguous.
/// <see cref="HeadMajor"/> is the library's default <c>[B, H, T, D]</c>; <see cref="TokenMajor"/> is the
/// <c>[B, T, H, D]</c> that a projection produces; slices of a fused buffer have larger token and batch strides
/// (<see cref="AttentionLayout.FusedQkv"/>). Strides are checked against the shape of each call: non-negative, and no two
/// elements of the tensor at one index (docs/api.md, "Layouts").
/// </summary>
/// <param name="BatchStride">Elements from one sequence to the next.</param>
/// <param name="HeadStride">Elements from one head to the next.</param>
/// <param name="TokenStride">Elements from one token (row) to the next; at least the head dimension.</param>
public readonly record struct TensorLayout(long BatchStride, long HeadStride, long TokenStride)
{
    /// <summary>Contiguous <c>[B, heads, T, D]</c>: the default of every call.</summary>
    /// <param name="heads">Heads of this tensor (query heads for q, o, dO, dq; key/value heads for k, v, dk, dv).</param>
    /// <param name="length">Tokens per sequence, T.</param>
    /// <param name="headDim">Head dimension, D.</param>
    public static TensorLayout HeadMajor(int heads, int length, int headDim) =>
        new((long)heads * length * headDim, (long)length * headDim, headDim);

    /// <summary>Contiguous <c>[B, T, heads, D]</c>: a projection's output viewed per head, with no transpose.</summary>
    /// <param name="heads">Heads of this tensor.</param>
    /// <param name="length">Tokens per sequence, T.</param>
    /// <param name="headDim">Head dimension, D.</param>
    public static TensorLayout TokenMajor(int heads, int length, int headDim) =>
        new((long)length * heads * headDim, headDim, (long)heads * headDim);

    /// <summary>
    /// Elements a view must hold for a tensor of <paramref name="batch"/> x <paramref name="heads"/> x
    /// <paramref name="length"/> rows of <paramref name="headDim"/>: one past the last element this layout reaches.
    /// </summary>
    /// <param name="batch">Sequences, B.</param>
    /// <param name="heads">Heads of this tensor.</param>
    /// <param name="length">Tokens per sequence, T.</param>
    /// <param name="headDim">Head dimension, D.</param>
    /// <exception cref="OverflowException">The span does not fit in 64 bits.</exception>
    public long Span(int batch, int heads, int length, int headDim) =>
        checked((batch - 1) * BatchStride + (heads - 1) * HeadStride + (length - 1) * TokenStride + headDim);

    /// <summary>
    /// Why this layout cannot hold the tensor (a negative stride, or two indices at one element), or <c>null</c>.
    /// Strides of dimensions of extent 1 are ignored. Sorted by stride, each dimension must step past everything the
    /// dimensions below it cover (rows of D elements first), so that every element has one index.
    /// </summary>
    internal string? Problem(int batch, int heads, int length, int headDim)
    {
        if (BatchStride < 0 || HeadStride < 0 || TokenStride < 0)
            return $"its strides must be non-negative (got {this})";
        Span<long> stride = [TokenStride, HeadStride, BatchStride];
        Span<long> extent = [length, heads, batch];
        // Three dimensions: sort by stride (ties keep T, H, B order).
        for (int i = 1; i < 3; i++)
            for (int j = i; j > 0 && stride[j] < stride[j - 1]; j--)
            {
                (stride[j], stride[j - 1]) = (stride[j - 1], stride[j]);
                (extent[j], extent[j - 1]) = (extent[j - 1], extent[j]);
            }
        long covered = headDim;
        for (int i = 0; i < 3; i++)
        {
            if (extent[i] <= 1)
                continue;
            if (stride[i] < covered)
                return $"its strides {this} put two elements at one place: a stride of {stride[i]} steps inside the {covered} " +
                       "elements that the dimensions below it (and the D elements of a row) already cover";
            covered = checked(stride[i] * (extent[i] - 1) + covered);
        }
        return null;
    }

    /// <inheritdoc />
    public override string ToString() => $"strides (B {BatchStride}, H {HeadStride}, T {TokenStride})";
}
