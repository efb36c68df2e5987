using System;

namespace StickBreaking.ILGPU;

/// <summary>
/// The shape of a call with queries behind a key/value cache (docs/math.md, "Queries behind a cache"):
/// <see cref="Batch"/> sequences, each with <see cref="Queries"/> new queries (n) in each of <see cref="QueryHeads"/>
/// heads, against a cache of <see cref="Capacity"/> key and value slots in each of <see cref="KeyValueHeads"/> heads.
/// Tensors are contiguous row-major: q and o <c>[Batch, QueryHeads, Queries, HeadDim]</c>, the caches
/// <c>[Batch, KeyValueHeads, Capacity, HeadDim]</c>, rem and LogRem <c>[Batch, QueryHeads, Queries]</c>. How many
/// slots of each sequence hold keys (its length L, at most the capacity) is an argument of the call, per sequence.
/// </summary>
/// <param name="Batch">Number of sequences, at least 1.</param>
/// <param name="QueryHeads">Query heads Hq per sequence, at least 1, a multiple of <paramref name="KeyValueHeads"/>.</param>
/// <param name="KeyValueHeads">Key/value heads Hkv per sequence (docs/math.md, "Grouped-query heads"): query head h reads
/// key/value head h / (Hq / Hkv); 1 is multi-query attention, Hq ordinary multi-head attention.</param>
/// <param name="Queries">New queries n per sequence and head, at least 1: 1 is decoding one token, more is chunked prefill.</param>
/// <param name="Capacity">Key/value slots per sequence and head in the cache, at least <paramref name="Queries"/>.</param>
/// <param name="HeadDim">Head dimension D, 1 to <see cref="AttentionShape.MaxHeadDim"/>.</param>
public readonly record struct DecodeShape(int Batch, int QueryHeads, int KeyValueHeads, int Queries, int Capacity, int HeadDim)
{
    /// <summary>Query heads per key/value head (Hq / Hkv).</summary>
    public int QueryHeadsPerKeyValueHead => QueryHeads / KeyValueHeads;

    /// <summary>Elements of q and o: B Hq n D.</summary>
    public long QueryLength => (long)Batch * QueryHeads * Queries * HeadDim;

    /// <summary>Elements of each cache: B Hkv Capacity D.</summary>
    public long CacheLength => (long)Batch * KeyValueHeads * Capacity * HeadDim;

    /// <summary>Rows of rem and LogRem: B Hq n.</summary>
    public long RowCount => (long)Batch * QueryHeads * Queries;

    /// <summary>
    /// Throws an <see cref="ArgumentOutOfRangeException"/> naming <paramref name="paramName"/> and the field at fault: a
    /// size below 1, D above <see cref="AttentionShape.MaxHeadDim"/>, query heads that are not a multiple of the key/value
    /// heads, more queries than cache slots, a capacity above <see cref="AttentionShape.MaxLength"/>, or a tensor of more
    /// than <see cref="AttentionShape.MaxTensorLength"/> elements.
    /// </summary>
    /// <param name="paramName">The name of the argument that carries this shape.</param>
    public void Validate(string paramName)
    {
        Positive(Batch, nameof(Batch), paramName);
        Positive(QueryHeads, nameof(QueryHeads), paramName);
        Positive(KeyValueHeads, nameof(KeyValueHeads), paramName);
        Positive(Queries, nameof(Queries), paramName);
        Positive(Capacity, nameof(Capacity), paramName);
        if (HeadDim < 1 || HeadDim > AttentionShape.MaxHeadDim)
            throw new ArgumentOutOfRangeException(paramName, HeadDim,
                $"{paramName}.{nameof(HeadDim)} must be between 1 and {AttentionShape.MaxHeadDim} (got {HeadDim}).");
        if (QueryHeads % KeyValueHeads != 0)
            throw new ArgumentOutOfRangeException(paramName, this,
                $"{paramName}.{nameof(QueryHeads)} ({QueryHeads}) must be a multiple of {paramName}.{nameof(KeyValueHeads)} " +
                $"({KeyValueHeads}): each key/value head serves the same number of query heads (docs/math.md, \"Grouped-query heads\").");
        if (Queries > Capacity)
            throw new ArgumentOutOfRangeException(paramName, this,
                $"{paramName}.{nameof(Queries)} ({Queries}) exceeds {paramName}.{nameof(Capacity)} ({Capacity}): the n queries are the " +
                "last n positions of a sequence whose keys are all in the cache, so n is at most its length.");
        if (Capacity > AttentionShape.MaxLength)
            throw new ArgumentOutOfRangeException(paramName, Capacity,
                $"{paramName}.{nameof(Capacity)} is {Capacity}; at most {AttentionShape.MaxLength} (2^30) is supported.");
        Int128 queries = (Int128)Batch * QueryHeads * Queries * HeadDim;
        Int128 cache = (Int128)Batch * KeyValueHeads * Capacity * HeadDim;
        if (queries > AttentionShape.MaxTensorLength || cache > AttentionShape.MaxTensorLength)
            throw new ArgumentOutOfRangeException(paramName, this,
                $"{paramName} {this} describes {queries} query and {cache} cache elements per tensor; at most " +
                $"{AttentionShape.MaxTensorLength} (2^31 - 1) are supported per call: split the batch into several calls.");
    }

    private static void Positive(int value, string field, string paramName)
    {
        if (value < 1)
            throw new ArgumentOutOfRangeException(paramName, value, $"{paramName}.{field} must be at least 1 (got {value}).");
    }

    /// <inheritdoc />
    public override string ToString() =>
        $"B={Batch} Hq={QueryHeads} Hkv={KeyValueHeads} n={Queries} capacity={Capacity} D={HeadDim}";
}
