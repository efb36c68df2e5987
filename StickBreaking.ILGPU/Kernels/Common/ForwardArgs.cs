using ILGPU;
using StickBreaking.ILGPU.Launch;

namespace StickBreaking.ILGPU.Kernels.Common;

/// <summary>Arguments of the forward kernels; all tensors contiguous [B, H, T, D] / [B, H, T].</summary>
internal struct ForwardArgs : IGridArgs<ForwardArgs>
{
    public ArrayView<float> Q, K, V;
    public ArrayView<float> O, Rem, LogRem;
    /// <summary>acc per (row, key tile) before that tile; written only when <see cref="WriteSnapshots"/> != 0.</summary>
    public ArrayView<float> AccSnapshots;
    public int Length, HeadDim, AttendCurrent, WriteSnapshots, SnapshotTiles;
    public float Scale;
    /// <summary>Output columns per group: each group owns O[rows, ColumnsPerGroup * Grid.IdxZ ..].</summary>
    public int ColumnsPerGroup;
    public int RowBlocks;

    /// <inheritdoc />
    public readonly ForwardArgs WithGrid(int rowBlocks, int columnsPerGroup) =>
        this with { RowBlocks = rowBlocks, ColumnsPerGroup = columnsPerGroup };
}
