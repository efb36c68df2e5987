using ILGPU;
using ILGPU.Runtime;
using StickBreaking.ILGPU.Launch;

namespace StickBreaking.ILGPU.Kernels.Decode;

/// <summary>
/// Where each element of the decode tensors lives: the one place that turns (sequence, head, position) into an index, so
/// that strided layouts can be added here alone. Today every tensor is contiguous: q and o <c>[B, Hq, n, D]</c>, the
/// caches <c>[B, Hkv, Capacity, D]</c>, rem and LogRem <c>[B, Hq, n]</c>, the chunk partials <c>[chunks, B, Hq, n, D]</c>
/// and <c>[chunks, B, Hq, n]</c>. Elements of one row (along D) are always adjacent.
/// </summary>
internal struct DecodeLayout
{
    public int Batch, QueryHeads, KeyValueHeads, Queries, Capacity, HeadDim;

    /// <summary>The layout of <paramref name="shape"/>.</summary>
    public static DecodeLayout Of(DecodeShape shape) => new()
    {
        Batch = shape.Batch, QueryHeads = shape.QueryHeads, KeyValueHeads = shape.KeyValueHeads,
        Queries = shape.Queries, Capacity = shape.Capacity, HeadDim = shape.HeadDim,
    };

    /// <summary>Index of row (b, h, i) in rem and LogRem.</summary>
    public readonly long Row(int b, int h, int i) => ((long)b * QueryHeads + h) * Queries + i;

    /// <summary>Index of element 0 of query (and output) row (b, h, i).</summary>
    public readonly long QueryRow(int b, int h, int i) => Row(b, h, i) * HeadDim;

    /// <summary>Index of element 0 of cache slot <paramref name="key"/> of key/value head <paramref name="kvHead"/> of sequence b.</summary>
    public readonly long CacheRow(int b, int kvHead, int key) => (((long)b * KeyValueHeads + kvHead) * Capacity + key) * HeadDim;

    /// <summary>
    /// Index of element 0 of slots <paramref name="key0"/>, key0 + 1, ... of key/value head <paramref name="kvHead"/> of
    /// sequence b, which follow each other without gaps in this layout (a tile of slots is one range of D-element rows).
    /// </summary>
    public readonly long CacheTile(int b, int kvHead, int key0) => CacheRow(b, kvHead, key0);

    /// <summary>Index of row (b, h, i) of chunk <paramref name="chunk"/> in the partial LogRem (times D: in the partial o).</summary>
    public readonly long PartialRow(int chunk, int b, int h, int i) => (long)chunk * Batch * QueryHeads * Queries + Row(b, h, i);
}

/// <summary>
/// Arguments of the decode kernel (<see cref="DecodeKernel"/>). <typeparamref name="T"/> is the storage of q, the caches
/// and o (<see cref="float"/>, or <see cref="ushort"/> bits of fp16 / bf16); rem, LogRem and the partials are fp32.
/// </summary>
internal struct DecodeArgs<T> : IGridArgs<DecodeArgs<T>>
    where T : unmanaged
{
    public ArrayView<T> Q, K, V, O;
    public ArrayView<float> Rem, LogRem;
    /// <summary>Keys present per sequence (L, at most the capacity) and keys of the sequence after them held elsewhere (0 unless <see cref="HasKeysAfter"/>).</summary>
    public ArrayView<int> CacheLengths, KeysAfter;
    /// <summary>With more than one chunk: each chunk's o and LogRem, in fp32, for the merge kernel.</summary>
    public ArrayView<float> PartialO, PartialLogRem;
    public DecodeLayout Layout;
    public int AttendCurrent, HasKeysAfter;
    /// <summary>1 when each cache row is a whole number of 16-byte words and both caches start 16-byte aligned (<see cref="DecodeKernel.PackedRows"/>).</summary>
    public int PackedRows;
    /// <summary>Chunks the keys of each sequence are split into (chunk 0 the nearest), and keys per chunk.</summary>
    public int Chunks, ChunkKeys;
    /// <summary>Keys per tile (the staging unit: <see cref="DecodeKernel.KeyTileFor"/>).</summary>
    public int KeyTile;
    public float Scale;
    /// <summary>Blocks of <see cref="DecodeKernel.BlockRows"/> rows (query head, query) per key/value head.</summary>
    public int RowBlocks;
    /// <summary>
    /// The fp16/bf16 warp decode on CUDA: device addresses of element 0 of <see cref="K"/> and <see cref="V"/>, which its
    /// staging ring copies from (<see cref="DecodeRing"/>); 0 elsewhere.
    /// </summary>
    public long KeyAddress, ValueAddress;

    /// <inheritdoc />
    public readonly DecodeArgs<T> WithGrid(int rowBlocks, int columnsPerGroup, Accelerator accelerator) => this with { RowBlocks = rowBlocks };
}

/// <summary>
/// Arguments of the merge kernels (<see cref="MergeKernel"/>): parts of a result over disjoint key ranges, each computed as
/// if its stick started whole, combined nearest first. <typeparamref name="TPart"/> is the storage of the parts' o,
/// <typeparamref name="T"/> that of the result's o.
/// </summary>
internal struct MergeArgs<TPart, T> : IGridArgs<MergeArgs<TPart, T>>
    where TPart : unmanaged
    where T : unmanaged
{
    /// <summary>The parts' o, <c>[Parts, Rows, D]</c> (part 0 the nearest), and LogRem, <c>[Parts, Rows]</c>.</summary>
    public ArrayView<TPart> PartO;
    public ArrayView<float> PartLogRem;
    /// <summary>For two parts given as separate views: the far part (then <see cref="PartO"/> holds only the near one).</summary>
    public ArrayView<TPart> FarO;
    public ArrayView<float> FarLogRem;
    public ArrayView<T> O;
    public ArrayView<float> Rem, LogRem;
    public int Parts, Rows, HeadDim, SeparateFar;

    /// <inheritdoc />
    public readonly MergeArgs<TPart, T> WithGrid(int rowBlocks, int columnsPerGroup, Accelerator accelerator) => this;
}
