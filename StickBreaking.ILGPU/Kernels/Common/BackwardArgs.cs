using ILGPU;
using ILGPU.Runtime;
using StickBreaking.ILGPU.Launch;

namespace StickBreaking.ILGPU.Kernels.Common;

/// <summary>
/// Arguments of the backward passes, portable and CUDA alike (each pass reads what it needs). Tensors are
/// [B, H, T, D] as Rows says, statistics [B, H, T], snapshots per (row, 32-key tile) (<see cref="Snapshots"/>).
/// </summary>
/// <typeparam name="T">Storage of q, k, v, dO, dq, dk, dv (<see cref="float"/>, or <see cref="ushort"/> bits of fp16 / bf16:
/// see <see cref="IElement{T}"/>); dRem, LogRem and the snapshots are always fp32.</typeparam>
internal struct BackwardArgs<T> : IGridArgs<BackwardArgs<T>>
    where T : unmanaged
{
    public ArrayView<T> Q, K, V, DO;
    public ArrayView<float> DRem, LogRem;
    /// <summary>The forward's acc per (row, key tile) (read by both passes).</summary>
    public ArrayView<float> AccSnapshots;
    /// <summary>P per (row, key tile) before that tile (written by pass 1, read by pass 2).</summary>
    public ArrayView<float> PrefixSnapshots;
    /// <summary>Outputs: dq of pass 1, dk and dv of pass 2.</summary>
    public ArrayView<T> DQ, DK, DV;
    /// <summary>
    /// The portable passes' fp32 accumulators where they cannot use shared memory (OpenCL,
    /// <see cref="OutputAccumulator.InOutput"/>) and the gradients are 16-bit: 2 * B * H * T * D floats. Pass 1
    /// accumulates dq in the first B * H * T * D (indexed as DQ), pass 2 dk there and dv in the second half; the
    /// passes run one after the other on one stream, so they share it. Unused (may be empty) for fp32 storage,
    /// which accumulates in the outputs themselves, and on CUDA and the CPU accelerator.
    /// </summary>
    public ArrayView<float> AccumulatorScratch;
    /// <summary>Where the rows of q, k, v, o (and dO, dq, dk, dv) lie, and which key/value head each query head reads.</summary>
    public AttentionRows Rows;
    public int Length, HeadDim, AttendCurrent, SnapshotTiles;
    /// <summary>Output columns per group (portable kernels; a grid z slice each).</summary>
    public int ColumnsPerGroup;
    /// <summary>Blocks of query rows in the grid's y dimension (launched heaviest first).</summary>
    public int RowBlocks;
    public float Scale;
    /// <summary>CUDA: the device addresses of element 0 of <see cref="K"/> and <see cref="V"/> (the tensor-core dq pass copies their tiles by cp.async); 0 elsewhere. Set by the launch layer (<see cref="WithGrid"/>).</summary>
    public long KeyAddress, ValueAddress;
    /// <summary>CUDA: the device addresses of element 0 of <see cref="Q"/> and <see cref="DO"/> (the tensor-core dk/dv pass copies their row blocks by cp.async); 0 elsewhere.</summary>
    public long QueryAddress, OutputGradientAddress;

    /// <summary>A copy with the device addresses of q, k, v and dO set on CUDA (the views' device addresses, read on the host); unchanged elsewhere.</summary>
    private readonly BackwardArgs<T> WithDeviceAddresses(Accelerator accelerator) =>
        accelerator.AcceleratorType == AcceleratorType.Cuda
            ? this with
            {
                KeyAddress = K.LoadEffectiveAddressAsPtr().ToInt64(), ValueAddress = V.LoadEffectiveAddressAsPtr().ToInt64(),
                QueryAddress = Q.LoadEffectiveAddressAsPtr().ToInt64(), OutputGradientAddress = DO.LoadEffectiveAddressAsPtr().ToInt64(),
            }
            : this;

    /// <inheritdoc />
    public readonly BackwardArgs<T> WithGrid(int rowBlocks, int columnsPerGroup, Accelerator accelerator) =>
        (this with { RowBlocks = rowBlocks, ColumnsPerGroup = columnsPerGroup }).WithDeviceAddresses(accelerator);
}
