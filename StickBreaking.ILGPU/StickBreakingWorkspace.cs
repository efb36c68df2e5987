using System;
using ILGPU;
using ILGPU.Runtime;
using StickBreaking.ILGPU.Kernels.Common;
using StickBreaking.ILGPU.Launch;

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
    private bool disposed;

    /// <summary>Allocates a workspace on <paramref name="accelerator"/> for calls up to <paramref name="capacity"/>.</summary>
    /// <param name="accelerator">The accelerator whose calls will use it.</param>
    /// <param name="capacity">The largest shape it serves: any shape whose snapshots fit (see <see cref="SnapshotFloats"/>) may use it.</param>
    /// <exception cref="ArgumentOutOfRangeException"><paramref name="capacity"/> is invalid, or needs more bytes
    /// (<see cref="BytesFor"/>) than the accelerator has in all; checked before anything is allocated.</exception>
    /// <exception cref="ObjectDisposedException">The accelerator or its context has been disposed.</exception>
    public StickBreakingWorkspace(Accelerator accelerator, AttentionShape capacity)
    {
        ArgumentNullException.ThrowIfNull(accelerator);
        capacity.Validate(nameof(capacity));
        Guards.Accelerator(accelerator);
        long floats = SnapshotFloats(capacity);
        Guards.Memory(accelerator, BytesFor(capacity), "A workspace", capacity, nameof(capacity));
        Accelerator = accelerator;
        Capacity = capacity;
        acc = accelerator.Allocate1D<float>(floats);
        try
        {
            prefix = accelerator.Allocate1D<float>(floats);
        }
        catch
        {
            acc.Dispose();   // the second array did not fit: free the first before the caller sees the exception
            throw;
        }
    }

    /// <summary>The accelerator this workspace lives on.</summary>
    public Accelerator Accelerator { get; }

    /// <summary>The shape it was sized for.</summary>
    public AttentionShape Capacity { get; }

    /// <summary>Whether <see cref="Dispose"/> has run (or its memory was freed with its accelerator).</summary>
    internal bool IsDisposed => disposed || acc.IsDisposed || prefix.IsDisposed;

    /// <summary>Floats per snapshot array for <paramref name="shape"/>: B * H * T * ceil(T / 32), in 64-bit arithmetic.</summary>
    /// <exception cref="ArgumentOutOfRangeException"><paramref name="shape"/> is invalid (<see cref="AttentionShape.Validate"/>).</exception>
    public static long SnapshotFloats(AttentionShape shape)
    {
        shape.Validate(nameof(shape));
        long tiles = (shape.Length + (long)Snapshots.KeyTile - 1) / Snapshots.KeyTile;
        return checked(shape.RowCount * tiles);   // at most 2^31 rows * 2^25 tiles
    }

    /// <summary>Bytes of device memory a workspace for <paramref name="shape"/> takes (two snapshot arrays); never negative.</summary>
    /// <exception cref="ArgumentOutOfRangeException"><paramref name="shape"/> is invalid (<see cref="AttentionShape.Validate"/>).</exception>
    public static long BytesFor(AttentionShape shape) => checked(2 * sizeof(float) * SnapshotFloats(shape));

    /// <summary>The (shape, scale, visibility, products, layout) of the forward whose snapshots it holds, if any.</summary>
    internal (AttentionShape Shape, float Scale, bool AttendCurrent, bool ExactProducts, AttentionLayout? Layout)? FilledBy { get; set; }

    internal ArrayView<float> AccFor(AttentionShape shape) => acc.View.SubView(0, SnapshotFloats(shape));

    internal ArrayView<float> PrefixFor(AttentionShape shape) => prefix.View.SubView(0, SnapshotFloats(shape));

    internal bool Fits(AttentionShape shape) => SnapshotFloats(shape) <= acc.Length;

    /// <inheritdoc />
    public void Dispose()
    {
        disposed = true;
        FilledBy = null;
        acc.Dispose();
        prefix.Dispose();
    }
}
