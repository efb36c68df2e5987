using System;

namespace StickBreaking.ILGPU;

/// <summary>
/// The shape of one attention call: <see cref="Batch"/> sequences of <see cref="Heads"/> heads, each
/// <see cref="Length"/> tokens long with vectors of <see cref="HeadDim"/> floats. q, o, dO and dq have <see cref="Heads"/>
/// heads; k, v, dk and dv have <see cref="KeyValueHeads"/> (grouped-query attention when fewer; equal by default).
/// Tensors are contiguous row-major <c>[Batch, heads, Length, HeadDim]</c> unless the call's
/// <see cref="StickBreakingOptions.Layout"/> says otherwise; per-token statistics are always <c>[Batch, Heads, Length]</c>.
/// Every count derived from it is computed in 64-bit arithmetic and checked: a count that a 64-bit integer
/// cannot hold throws rather than wraps (<see cref="Validate"/> refuses such shapes long before).
/// </summary>
/// <param name="Batch">Number of sequences, at least 1.</param>
/// <param name="Heads">Number of (query) heads per sequence, at least 1.</param>
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

    private readonly int keyValueHeads;

    /// <summary>
    /// Key/value heads Hkv per sequence (docs/math.md, "Layouts and grouped heads"): query head h reads key/value head
    /// h / (Heads / KeyValueHeads). Defaults to <see cref="Heads"/> (ordinary multi-head attention); 1 is multi-query
    /// attention. <see cref="Heads"/> must be a multiple of it. dk and dv sum over the query heads of each group.
    /// </summary>
    public int KeyValueHeads
    {
        get => keyValueHeads == 0 ? Heads : keyValueHeads;
        init => keyValueHeads = value == 0 ? -1 : value;   // 0 is the "unset" marker: keep an explicit 0 invalid
    }

    /// <summary>Query heads per key/value head (Heads / KeyValueHeads).</summary>
    public int GroupSize => Heads / KeyValueHeads;

    /// <summary>Number of (batch, head) pairs of the query side.</summary>
    public long HeadCount => (long)Batch * Heads;   // two ints: always fits

    /// <summary>Number of (batch, key/value head) pairs.</summary>
    public long KeyValueHeadCount => (long)Batch * KeyValueHeads;

    /// <summary>Number of elements in a contiguous <c>[Batch, KeyValueHeads, Length, HeadDim]</c> tensor (k, v, dk, dv).</summary>
    /// <exception cref="OverflowException">The count does not fit in 64 bits (an invalid shape).</exception>
    public long KeyValueTensorLength => Checked((Int128)Batch * KeyValueHeads * Length * HeadDim, "elements per key/value tensor");

    /// <summary>Number of elements in a contiguous <c>[Batch, Heads, Length, HeadDim]</c> tensor (q, o, dO, dq).</summary>
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
        if (KeyValueHeads < 1)
            throw new ArgumentOutOfRangeException(paramName, KeyValueHeads,
                $"{paramName}.{nameof(KeyValueHeads)} must be at least 1 (got {(keyValueHeads == -1 ? 0 : KeyValueHeads)}).");
        if (Heads % KeyValueHeads != 0)
            throw new ArgumentOutOfRangeException(paramName, this,
                $"{paramName}.{nameof(Heads)} ({Heads}) must be a multiple of {paramName}.{nameof(KeyValueHeads)} ({KeyValueHeads}): " +
                "each key/value head serves the same number of query heads (docs/math.md, \"Layouts and grouped heads\").");
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

    /// <summary>Equal sizes (an unset <see cref="KeyValueHeads"/> equals one set to <see cref="Heads"/>).</summary>
    /// <param name="other">The shape to compare with.</param>
    public bool Equals(AttentionShape other) =>
        Batch == other.Batch && Heads == other.Heads && KeyValueHeads == other.KeyValueHeads && Length == other.Length && HeadDim == other.HeadDim;

    /// <inheritdoc />
    public override int GetHashCode() => HashCode.Combine(Batch, Heads, KeyValueHeads, Length, HeadDim);

    /// <inheritdoc />
    public override string ToString() =>
        KeyValueHeads == Heads ? $"B={Batch} H={Heads} T={Length} D={HeadDim}" : $"B={Batch} H={Heads} Hkv={KeyValueHeads} T={Length} D={HeadDim}";
}
