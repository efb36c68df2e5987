using ILGPU;
using ILGPU.Runtime;
using StickBreaking.ILGPU.Kernels.Common;
using StickBreaking.ILGPU.Launch;

namespace StickBreaking.ILGPU.Kernels.TensorCore;

/// <summary>
/// Arguments of <see cref="TensorCoreForwardKernel"/>: q, k, v and o as 16-bit storage bits (fp16 or bf16, as the
/// kernel's storage type says), [B, H, T, D] as Rows says and starting at 16-byte aligned addresses (the kernel
/// reads and writes them in 16-byte and 4-byte pieces); rem and LogRem fp32 [B, H, T]; acc snapshots fp32 per
/// (row, 32-key tile) (<see cref="Common.Snapshots"/>), exactly as the fp32 forwards write them.
/// </summary>
internal struct TensorCoreForwardArgs : IGridArgs<TensorCoreForwardArgs>
{
    public ArrayView<ushort> Q, K, V, O;
    public ArrayView<float> Rem, LogRem;
    /// <summary>acc per (row, 32-key tile) before that tile; written only when <see cref="WriteSnapshots"/> != 0.</summary>
    public ArrayView<float> AccSnapshots;
    /// <summary>Where the rows of q, k, v, o (and dO, dq, dk, dv) lie, and which key/value head each query head reads.</summary>
    public AttentionRows Rows;
    public int Length, HeadDim, AttendCurrent, WriteSnapshots, SnapshotTiles;
    /// <summary>Blocks of <see cref="TensorCoreForwardKernel.BlockRows"/> query rows in the grid's y dimension (heaviest first).</summary>
    public int RowBlocks;
    /// <summary>z = Scale * q.k (InvTemperature).</summary>
    public float Scale;
    /// <summary>CUDA: the device addresses of element 0 of <see cref="K"/> and <see cref="V"/> (the wgmma plan copies their tiles by cp.async); 0 elsewhere. Set by the launch layer.</summary>
    public long KeyAddress, ValueAddress;

    /// <inheritdoc />
    public readonly TensorCoreForwardArgs WithGrid(int rowBlocks, int columnsPerGroup, Accelerator accelerator) =>
        accelerator.AcceleratorType == AcceleratorType.Cuda
            ? this with
            {
                RowBlocks = rowBlocks,
                KeyAddress = K.LoadEffectiveAddressAsPtr().ToInt64(), ValueAddress = V.LoadEffectiveAddressAsPtr().ToInt64(),
            }
            : this with { RowBlocks = rowBlocks };
}
