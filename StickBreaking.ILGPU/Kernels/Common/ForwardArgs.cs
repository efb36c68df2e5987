using ILGPU;
using ILGPU.Runtime;
using StickBreaking.ILGPU.Launch;

namespace StickBreaking.ILGPU.Kernels.Common;

/// <summary>
/// Arguments of the forward kernels; all tensors [B, H, T, D] as Rows says / [B, H, T]. <typeparamref name="T"/> is
/// the storage of q, k, v and o (<see cref="float"/>, or <see cref="ushort"/> bits of fp16 / bf16: see
/// <see cref="IElement{T}"/>); rem, LogRem and the snapshots are always fp32.
/// </summary>
internal struct ForwardArgs<T> : IGridArgs<ForwardArgs<T>>
    where T : unmanaged
{
    public ArrayView<T> Q, K, V;
    public ArrayView<T> O;
    public ArrayView<float> Rem, LogRem;
    /// <summary>
    /// The portable kernel's fp32 output accumulator where it cannot use shared memory (OpenCL,
    /// <see cref="OutputAccumulator.InOutput"/>) and o is 16-bit: B * H * T * D floats, indexed as O. Unused
    /// (may be empty) for fp32 storage, which accumulates in O itself, and on CUDA and the CPU accelerator.
    /// </summary>
    public ArrayView<float> AccumulatorScratch;
    /// <summary>acc per (row, key tile) before that tile; written only when <see cref="WriteSnapshots"/> != 0.</summary>
    public ArrayView<float> AccSnapshots;
    /// <summary>Where the rows of q, k, v, o (and dO, dq, dk, dv) lie, and which key/value head each query head reads.</summary>
    public AttentionRows Rows;
    public int Length, HeadDim, AttendCurrent, WriteSnapshots, SnapshotTiles;
    public float Scale;
    /// <summary>Output columns per group: each group owns O[rows, ColumnsPerGroup * Grid.IdxZ ..].</summary>
    public int ColumnsPerGroup;
    public int RowBlocks;

    /// <inheritdoc />
    public readonly ForwardArgs<T> WithGrid(int rowBlocks, int columnsPerGroup, Accelerator accelerator) =>
        this with { RowBlocks = rowBlocks, ColumnsPerGroup = columnsPerGroup };
}
