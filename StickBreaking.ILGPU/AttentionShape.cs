using System;

namespace StickBreaking.ILGPU;

/// <summary>
/// The shape of one attention call: <see cref="Batch"/> sequences of <see cref="Heads"/> heads, each
/// <see cref="Length"/> tokens long with vectors of <see cref="HeadDim"/> floats. Tensors are contiguous
/// row-major <c>[Batch, Heads, Length, HeadDim]</c>; per-token statistics are <c>[Batch, Heads, Length]</c>.
/// </summary>
/// <param name="Batch">Number of sequences, at least 1.</param>
/// <param name="Heads">Number of heads per sequence, at least 1.</param>
/// <param name="Length">Tokens per sequence (T), at least 1; any length, not only multiples of a tile.</param>
/// <param name="HeadDim">Head dimension (D), 1 to <see cref="MaxHeadDim"/>.</param>
public readonly record struct AttentionShape(int Batch, int Heads, int Length, int HeadDim)
{
    /// <summary>The largest supported head dimension.</summary>
    public const int MaxHeadDim = 256;

    /// <summary>Number of (batch, head) pairs.</summary>
    public long HeadCount => (long)Batch * Heads;

    /// <summary>Number of floats in a <c>[Batch, Heads, Length, HeadDim]</c> tensor.</summary>
    public long TensorLength => HeadCount * Length * HeadDim;

    /// <summary>Number of floats in a <c>[Batch, Heads, Length]</c> tensor (Rem, LogRem, dRem).</summary>
    public long RowCount => HeadCount * Length;

    /// <summary>
    /// Throws an <see cref="ArgumentOutOfRangeException"/> naming <paramref name="paramName"/> and the field
    /// at fault when a size is zero or negative, the head dimension is above <see cref="MaxHeadDim"/>, or the
    /// tensor would not be addressable.
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
        if (TensorLength > int.MaxValue)
            throw new ArgumentOutOfRangeException(paramName, TensorLength,
                $"{paramName} describes {TensorLength} floats per tensor; at most {int.MaxValue} are supported per call: split the batch.");
    }

    /// <inheritdoc />
    public override string ToString() => $"B={Batch} H={Heads} T={Length} D={HeadDim}";
}
