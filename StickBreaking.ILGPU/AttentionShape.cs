using System;

namespace StickBreaking.ILGPU;

/// <summary>
/// The shape of one attention call: <see cref="Batch"/> sequences of <see cref="Heads"/> heads, each
/// <see cref="Length"/> tokens long with vectors of <see cref="HeadDim"/> floats. Tensors are contiguous
/// row-major <c>[Batch, Heads, Length, HeadDim]</c>; per-token statistics are <c>[Batch, Heads, Length]</c>.
/// Every count derived from it is computed in 64-bit arithmetic and checked: a count that a 64-bit integer
/// cannot hold throws rather than wraps (<see cref="Validate"/> refuses such shapes long before).
/// </summary>
/// <param name="Batch">Number of sequences, at least 1.</param>
/// <param name="Heads">Number of heads per sequence, at least 1.</param>
/// <param name="Length">Tokens per sequence (T), 1 to <see cref="MaxLength"/>; any length, not only multiples of a tile.</param>
/// <param name="HeadDim">Head dimension (D), 1 to <see cref="MaxHeadDim"/>.</param>
public readonly record struct AttentionShape(int Batch, int Heads, int Length, int HeadDim)
{
    /// <summary>The largest supported head dimension.</summary>
    public const int MaxHeadDim = 256;

    /// <summary>
    /// The most floats one <c>[B, H, T, D]</c> tensor may hold: the kernels index tensors with 32-bit integers.
    /// </summary>
    public const long MaxTensorLength = int.MaxValue;

    /// <summary>
    /// The longest sequence any accelerator is asked to run (2^30), so that the kernels' 32-bit row and tile
    /// arithmetic stays clear of overflow. The grid of each accelerator sets a lower limit (docs/limits.md:
    /// 4,194,240 for the CUDA kernels, 2,097,120 for the portable ones on a grid of 65535 groups along Y).
    /// </summary>
    public const int MaxLength = 1 << 30;

    /// <summary>Number of (batch, head) pairs.</summary>
    public long HeadCount => (long)Batch * Heads;   // two ints: always fits

    /// <summary>Number of floats in a <c>[Batch, Heads, Length, HeadDim]</c> tensor.</summary>
    /// <exception cref="OverflowException">The count does not fit in 64 bits (an invalid shape).</exception>
    public long TensorLength => Checked((Int128)Batch * Heads * Length * HeadDim, "floats per tensor");

    /// <summary>Number of floats in a <c>[Batch, Heads, Length]</c> tensor (Rem, LogRem, dRem).</summary>
    /// <exception cref="OverflowException">The count does not fit in 64 bits (an invalid shape).</exception>
    public long RowCount => Checked((Int128)Batch * Heads * Length, "rows");

    private long Checked(Int128 count, string what) =>
        count <= long.MaxValue && count >= long.MinValue
            ? (long)count
            : throw new OverflowException($"Shape {this} has {count} {what}, more than a 64-bit count holds; Validate refuses it.");

    /// <summary>
    /// Throws an <see cref="ArgumentOutOfRangeException"/> naming <paramref name="paramName"/> and the field
    /// or limit at fault when a size is zero or negative, the head dimension is above <see cref="MaxHeadDim"/>,
    /// the length above <see cref="MaxLength"/>, or a tensor would hold more than <see cref="MaxTensorLength"/> floats.
    /// </summary>
    /// <param name="paramName">The name of the argument that carries this shape.</param>
    public void Validate(string paramName)
    {
        if (Batch < 1)
            throw new ArgumentOutOfRangeException(paramName, Batch, $"{paramName}.{nameof(Batch)} must be at least 1 (got {Batch}).");
        if (Heads < 1)
            throw new ArgumentOutOfRangeException(paramName, Heads, $"{paramName}.{nameof(Heads)} must be at least 1 (got {Heads}).");
        if (Length < 1)
            throw new ArgumentOutOfRangeException(paramName, Length, $"{paramName}.{nameof(Length)} must be at least 1 (got {Length}).");
        if (HeadDim < 1 || HeadDim > MaxHeadDim)
            throw new ArgumentOutOfRangeException(paramName, HeadDim,
                $"{paramName}.{nameof(HeadDim)} must be between 1 and {MaxHeadDim} (got {HeadDim}).");
        if (Length > MaxLength)
            throw new ArgumentOutOfRangeException(paramName, Length,
                $"{paramName}.{nameof(Length)} is {Length}; at most {MaxLength} (2^30, AttentionShape.MaxLength) is supported, " +
                "and each accelerator's grid sets a lower limit (docs/limits.md).");
        Int128 floats = (Int128)Batch * Heads * Length * HeadDim;
        if (floats > MaxTensorLength)
            throw new ArgumentOutOfRangeException(paramName, this,
                $"{paramName} {this} describes {floats} floats per [B, H, T, D] tensor; at most {MaxTensorLength} (2^31 - 1, " +
                "AttentionShape.MaxTensorLength: the kernels index with 32-bit integers) are supported per call: " +
                "split the batch or the heads into several calls.");
    }

    /// <inheritdoc />
    public override string ToString() => $"B={Batch} H={Heads} T={Length} D={HeadDim}";
}
