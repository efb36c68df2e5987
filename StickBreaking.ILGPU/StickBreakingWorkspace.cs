using System;
using ILGPU;
using ILGPU.Runtime;
using StickBreaking.ILGPU.Kernels.Common;
using StickBreaking.ILGPU.Kernels.Portable;

namespace StickBreaking.ILGPU;

/// <summary>
/// Device memory that carries a training forward's state into the backward: the forward's running log-stick
/// sum <c>acc</c> per (row, key tile of 32 keys), and the backward's prefix P per (row, key tile). That is
/// 2 floats per row per key tile: <c>8 * B * H * T * ceil(T / 32)</c> bytes, e.g. 64 MiB per head at T = 16384
/// (process heads in chunks where that is too much). Allocate once and reuse: the device-level calls then
/// allocate nothing. It holds the snapshots of the latest forward that was given it.
/// </summary>
public sealed class StickBreakingWorkspace : IDisposable
{
    private readonly MemoryBuffer1D<float, Stride1D.Dense> acc;
    private readonly MemoryBuffer1D<float, Stride1D.Dense> prefix;

    /// <summary>Allocates a workspace on <paramref name="accelerator"/> for calls up to <paramref name="capacity"/>.</summary>
    /// <param name="accelerator">The accelerator whose calls will use it.</param>
    /// <param name="capacity">The largest shape it serves: any shape whose snapshots fit (see <see cref="SnapshotFloats"/>) may use it.</param>
    public StickBreakingWorkspace(Accelerator accelerator, AttentionShape capacity)
    {
        ArgumentNullException.ThrowIfNull(accelerator);
        capacity.Validate(nameof(capacity));
        Accelerator = accelerator;
        Capacity = capacity;
        long floats = SnapshotFloats(capacity);
        acc = accelerator.Allocate1D<float>(floats);
        prefix = accelerator.Allocate1D<float>(floats);
    }

    /// <summary>The accelerator this workspace lives on.</summary>
    public Accelerator Accelerator { get; }

    /// <summary>The shape it was sized for.</summary>
    public AttentionShape Capacity { get; }

    /// <summary>Floats per snapshot array for <paramref name="shape"/>: B * H * T * ceil(T / 32).</summary>
    public static long SnapshotFloats(AttentionShape shape) =>
        shape.RowCount * Snapshots.TileCount(shape.Length);

    /// <summary>Bytes of device memory a workspace for <paramref name="shape"/> takes (two snapshot arrays).</summary>
    public static long BytesFor(AttentionShape shape) => 2 * 4 * SnapshotFloats(shape);

    /// <summary>The (shape, scale, visibility) of the forward whose snapshots it holds, if any.</summary>
    internal (AttentionShape Shape, float Scale, bool AttendCurrent)? FilledBy { get; set; }

    internal ArrayView<float> AccFor(AttentionShape shape) => acc.View.SubView(0, SnapshotFloats(shape));

    internal ArrayView<float> PrefixFor(AttentionShape shape) => prefix.View.SubView(0, SnapshotFloats(shape));

    internal bool Fits(AttentionShape shape) => SnapshotFloats(shape) <= acc.Length;

    /// <inheritdoc />
    public void Dispose()
    {
        acc.Dispose();
        prefix.Dispose();
    }
}
