using ILGPU;
using StickBreaking.ILGPU.Launch;

namespace StickBreaking.ILGPU.Kernels.Common;

/// <summary>
/// Arguments of the backward passes, portable and CUDA alike (each pass reads what it needs). Tensors are
/// contiguous [B, H, T, D], statistics [B, H, T], snapshots per (row, 32-key tile) (<see cref="Snapshots"/>).
/// </summary>
internal struct BackwardArgs : IGridArgs<BackwardArgs>
{
    public ArrayView<float> Q, K, V, DO, DRem, LogRem;
    /// <summary>The forward's acc per (row, key tile) (read by both passes).</summary>
    public ArrayView<float> AccSnapshots;
    /// <summary>P per (row, key tile) before that tile (written by pass 1, read by pass 2).</summary>
    public ArrayView<float> PrefixSnapshots;
    /// <summary>Outputs: dq of pass 1, dk and dv of pass 2.</summary>
    public ArrayView<float> DQ, DK, DV;
    public int Length, HeadDim, AttendCurrent, SnapshotTiles;
    /// <summary>Output columns per group (portable kernels; a grid z slice each).</summary>
    public int ColumnsPerGroup;
    /// <summary>Blocks of query rows in the grid's y dimension (launched heaviest first).</summary>
    public int RowBlocks;
    public float Scale;

    /// <inheritdoc />
    public readonly BackwardArgs WithGrid(int rowBlocks, int columnsPerGroup) =>
        this with { RowBlocks = rowBlocks, ColumnsPerGroup = columnsPerGroup };
}
