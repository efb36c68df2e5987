using System;
using System.Runtime.CompilerServices;
using System.Threading;
using ILGPU;
using ILGPU.Runtime;
using ILGPU.Runtime.Cuda;
using StickBreaking.ILGPU.Kernels.Common;

namespace StickBreaking.ILGPU.Launch;

/// <summary>
/// Every check a public call makes before it enqueues anything: misuse (disposed objects, views of another
/// accelerator or of the wrong length, outputs that overlap inputs, a concurrent call on one instance), sizes
/// (grid limits, device memory), each an exception that names the argument. Nothing here allocates on the
/// managed heap on the success path: the device-level calls stay allocation-free.
/// </summary>
internal static class Guards
{
    // ------------------------------------------------------------------------------------------------
    // Naming accelerators: two accelerators often share a name ("CPUAccelerator"), so each gets a number
    // in the order this process first names it, and CUDA devices their device id.

    private static readonly ConditionalWeakTable<Accelerator, StrongBox<int>> numbers = new();
    private static int lastNumber;

    /// <summary>"accelerator #2 'CPUAccelerator' (CPU)", "accelerator #1 'NVIDIA H200' (Cuda device 0)".</summary>
    public static string Describe(Accelerator accelerator)
    {
        int number = numbers.GetValue(accelerator, _ => new StrongBox<int>(Interlocked.Increment(ref lastNumber))).Value;
        string kind = accelerator is CudaAccelerator cuda ? $"Cuda device {cuda.DeviceId}" : accelerator.AcceleratorType.ToString();
        return $"accelerator #{number} '{accelerator.Name}' ({kind})";
    }

    // ------------------------------------------------------------------------------------------------
    // Disposed objects, streams, views, host spans, workspaces

    /// <summary>The accelerator an instance runs on: not disposed, nor its context.</summary>
    public static void Accelerator(Accelerator accelerator)
    {
        if (accelerator.IsDisposed)
            throw new ObjectDisposedException("accelerator",
                $"The {Describe(accelerator)} this instance runs on has been disposed; create a new accelerator and a new StickBreakingAttention.");
        if (accelerator.Context.IsDisposed)
            throw new ObjectDisposedException("accelerator",
                $"The ILGPU context of the {Describe(accelerator)} this instance runs on has been disposed; " +
                "create a new context, accelerator and StickBreakingAttention.");
    }

    /// <summary>A stream of <paramref name="accelerator"/>, not disposed.</summary>
    public static void Stream(Accelerator accelerator, AcceleratorStream stream)
    {
        ArgumentNullException.ThrowIfNull(stream);
        if (stream.IsDisposed)
            throw new ObjectDisposedException(nameof(stream), $"stream (of {Describe(stream.Accelerator)}) has been disposed.");
        if (!ReferenceEquals(stream.Accelerator, accelerator))
            throw new ArgumentException(
                $"stream belongs to {Describe(stream.Accelerator)}, not to {Describe(accelerator)} that this instance runs on.",
                nameof(stream));
    }

    /// <summary>What a tensor of <typeparamref name="T"/> holds, for messages ("floats", "16-bit values").</summary>
    private static string Unit<T>() where T : unmanaged => typeof(T) == typeof(float) ? "floats" : $"{typeof(T).Name} values";

    /// <summary>A host span of exactly <paramref name="expected"/> elements.</summary>
    public static void Host<T>(ReadOnlySpan<T> data, long expected, string name, AttentionShape shape)
        where T : unmanaged
    {
        if (data.Length != expected)
            throw new ArgumentException($"{name} has {data.Length} {Unit<T>()}; shape {shape} needs {expected}.", name);
    }

    /// <summary>A view of <paramref name="expected"/> elements, in a live buffer of <paramref name="accelerator"/>.</summary>
    public static void View<T>(Accelerator accelerator, ArrayView<T> view, long expected, string name, AttentionShape shape)
        where T : unmanaged
    {
        if (!view.IsValid)
            throw new ArgumentException(
                $"{name} is an empty or default view (a disposed buffer's View is one); shape {shape} needs {expected} {Unit<T>()}.", name);
        var buffer = BufferOf(view);
        var owner = buffer.Accelerator;
        if (buffer.IsDisposed)
            throw new ObjectDisposedException(name,
                $"{name} is a view of a MemoryBuffer (on {Describe(owner)}) that has been disposed.");
        if (!ReferenceEquals(owner, accelerator))
            throw new ArgumentException(
                $"{name} is a view on {Describe(owner)}, not on {Describe(accelerator)} that this instance runs on.", name);
        if (view.Length != expected)
            throw new ArgumentException($"{name} has {view.Length} {Unit<T>()}; shape {shape} needs {expected}.", name);
    }

    /// <summary>
    /// A host span for one tensor of a call: exactly the contiguous length when the call has no layout, else at least
    /// the layout's span (the elements past it, and between its rows, are not read).
    /// </summary>
    public static void HostTensor<T>(ReadOnlySpan<T> data, long span, bool custom, string name, AttentionShape shape)
        where T : unmanaged
    {
        if (!custom)
        {
            Host(data, span, name, shape);
            return;
        }
        if (data.Length < span)
            throw new ArgumentException(
                $"{name} has {data.Length} {Unit<T>()}; its layout in options.Layout reaches element {span - 1} for shape {shape}, " +
                $"so it needs at least {span}.", name);
    }

    /// <summary>
    /// A device view for one tensor of a call: exactly the contiguous length when the call has no layout, else at least
    /// the layout's span; in a live buffer of <paramref name="accelerator"/> either way.
    /// </summary>
    public static void ViewTensor<T>(Accelerator accelerator, ArrayView<T> view, long span, bool custom, string name, AttentionShape shape)
        where T : unmanaged
    {
        if (!custom)
        {
            View(accelerator, view, span, name, shape);
            return;
        }
        if (!view.IsValid)
            throw new ArgumentException(
                $"{name} is an empty or default view (a disposed buffer's View is one); its layout needs {span} {Unit<T>()}.", name);
        View(accelerator, view, view.Length, name, shape);   // live, on this accelerator
        if (view.Length < span)
            throw new ArgumentException(
                $"{name} has {view.Length} {Unit<T>()}; its layout in options.Layout reaches element {span - 1} for shape {shape}, " +
                $"so it needs at least {span}: the strides run past the view.", name);
    }

    /// <summary>
    /// Each of the eight layouts can hold its tensor (<see cref="TensorLayout.Problem"/>); otherwise an exception naming
    /// <paramref name="paramName"/><c>.Layout.</c> and the entry.
    /// </summary>
    public static void Layout(AttentionLayout.Resolved layout, string paramName)
    {
        if (!layout.Custom)
            return;
        var s = layout.Shape;
        Check(layout.Q, s.Heads, nameof(AttentionLayout.Query));
        Check(layout.K, s.KeyValueHeads, nameof(AttentionLayout.Key));
        Check(layout.V, s.KeyValueHeads, nameof(AttentionLayout.Value));
        Check(layout.O, s.Heads, nameof(AttentionLayout.Output));
        Check(layout.DO, s.Heads, nameof(AttentionLayout.OutputGradient));
        Check(layout.DQ, s.Heads, nameof(AttentionLayout.QueryGradient));
        Check(layout.DK, s.KeyValueHeads, nameof(AttentionLayout.KeyGradient));
        Check(layout.DV, s.KeyValueHeads, nameof(AttentionLayout.ValueGradient));

        void Check(TensorLayout x, int heads, string entry)
        {
            if (x.Problem(s.Batch, heads, s.Length, s.HeadDim) is { } problem)
                throw new ArgumentException($"{paramName}.{nameof(StickBreakingOptions.Layout)}.{entry} cannot hold a tensor of shape {s}: {problem}.", paramName);
        }
    }

    /// <summary>
    /// A layout the tensor-core kernels can read: they move rows in <paramref name="bytes"/>-byte pieces, so every stride
    /// must be a multiple of that many bytes (16 for q, k, v, dO; 4 for o, dq, dk, dv), as the view's start must be.
    /// </summary>
    public static void AlignedStrides(TensorLayout layout, int elementBytes, int bytes, string name)
    {
        int elements = bytes / elementBytes;
        if (layout.BatchStride % elements != 0 || layout.HeadStride % elements != 0 || layout.TokenStride % elements != 0)
            throw new ArgumentException(
                $"{name}'s layout has {layout}; the tensor-core kernel reads it in {bytes}-byte pieces and needs every stride " +
                $"to be a multiple of {elements} elements (any [B, T, H, D] or fused layout of D = 64 or 128 is).", name);
    }

    /// <summary>
    /// A layout whose rows of one head the tensor-core kernels can address with 32-bit offsets in 16-byte pieces from the
    /// head's row 0 (they compute offsets up to 64 rows past the last, never reading those): (T + 64) times the token
    /// stride, in pieces, within 2^31 - 1.
    /// </summary>
    public static void HeadOffsets(TensorLayout layout, int length, int elementBytes, string name)
    {
        long pieces = layout.TokenStride * elementBytes / 16;
        if ((length + 64L) * pieces > int.MaxValue)
            throw new ArgumentException(
                $"{name}'s layout has {layout}: {length} rows {layout.TokenStride} elements apart span more than the tensor-core " +
                $"kernel addresses within one head (2^31 16-byte pieces, 32-bit offsets from the head's first row).", name);
    }

    /// <summary>A view whose first element sits at a multiple of <paramref name="bytes"/> (a kernel reads it in pieces that wide).</summary>
    public static void Aligned<T>(ArrayView<T> view, int bytes, string name)
        where T : unmanaged
    {
        long start = StartInBytes(view);
        if (start % bytes != 0)
            throw new ArgumentException(
                $"{name} starts at byte {start} of its buffer; the tensor-core kernel reads it in {bytes}-byte pieces and needs a " +
                $"{bytes}-byte aligned start (a whole buffer, or a sub-view at a multiple of {bytes} bytes).", name);
    }

    /// <summary>A live workspace of <paramref name="accelerator"/> whose capacity covers <paramref name="shape"/>.</summary>
    public static void Workspace(Accelerator accelerator, StickBreakingWorkspace workspace, AttentionShape shape)
    {
        ArgumentNullException.ThrowIfNull(workspace);
        if (workspace.IsDisposed)
            throw new ObjectDisposedException(nameof(workspace),
                $"workspace (capacity {workspace.Capacity}, on {Describe(workspace.Accelerator)}) has been disposed.");
        if (!ReferenceEquals(workspace.Accelerator, accelerator))
            throw new ArgumentException(
                $"workspace lives on {Describe(workspace.Accelerator)}, not on {Describe(accelerator)}.", nameof(workspace));
        if (!workspace.Fits(shape))
            throw new ArgumentException(
                $"workspace was sized for {workspace.Capacity} ({StickBreakingWorkspace.SnapshotFloats(workspace.Capacity)} snapshot floats); " +
                $"shape {shape} needs {StickBreakingWorkspace.SnapshotFloats(shape)}.", nameof(workspace));
    }

    /// <summary>The buffer behind a view, read through the interface without boxing the view.</summary>
    private static MemoryBuffer BufferOf<TView>(TView view) where TView : IArrayView => view.Buffer;

    private static long StartInBytes<TView>(TView view) where TView : IContiguousArrayView => view.IndexInBytes;

    // ------------------------------------------------------------------------------------------------
    // Overlap: an output may not share memory with an input or another output; inputs may alias.

    /// <summary>
    /// The bytes [Start, End) of a buffer that a view covers, the name of the argument that carries it, and, for a
    /// strided tensor, which of those bytes it touches (<see cref="Rows"/>).
    /// </summary>
    public readonly record struct Arg(MemoryBuffer Buffer, long Start, long End, string Name, Lattice Rows = default)
    {
        /// <summary>The extent of <paramref name="view"/>, carried by the argument <paramref name="name"/>.</summary>
        public static Arg Of<T>(ArrayView<T> view, string name)
            where T : unmanaged
        {
            long start = StartInBytes(view);
            return new Arg(BufferOf(view), start, start + view.LengthInBytes, name);
        }

        /// <summary>
        /// The rows a tensor in <paramref name="layout"/> of <paramref name="heads"/> heads touches in
        /// <paramref name="view"/> (its first <paramref name="span"/> elements).
        /// </summary>
        public static Arg Of<T>(ArrayView<T> view, string name, TensorLayout layout, AttentionShape shape, int heads, long span)
            where T : unmanaged
        {
            long start = StartInBytes(view);
            int size = Unsafe.SizeOf<T>();
            var rows = new Lattice(layout.BatchStride * size, layout.HeadStride * size, layout.TokenStride * size,
                shape.Batch, heads, shape.Length, (long)shape.HeadDim * size);
            return new Arg(BufferOf(view), start, start + span * size, name, rows);
        }
    }

    /// <summary>
    /// The rows of a strided tensor, in bytes: row (b, h, t) covers [start + b Batch + h Head + t Token, + RowBytes) for
    /// b, h, t below Batches, Heads, Tokens. Default (no strides): the whole range counts as touched.
    /// </summary>
    public readonly record struct Lattice(long Batch, long Head, long Token, int Batches, int Heads, int Tokens, long RowBytes)
    {
        /// <summary>Whether it describes rows (else the whole range counts).</summary>
        public bool IsSet => RowBytes > 0;

        /// <summary>Whether <paramref name="other"/> has the same strides and row width (extents may differ).</summary>
        public bool SameStrides(Lattice other) =>
            Batch == other.Batch && Head == other.Head && Token == other.Token && RowBytes == other.RowBytes;

        /// <summary>
        /// Whether a row of this tensor and a row of <paramref name="other"/> (same strides, starting
        /// <paramref name="shift"/> bytes later) share a byte: index differences c = i - i' per dimension, each from
        /// -(other's extent - 1) to this extent - 1, with |shift - sum c s| &lt; RowBytes. Strides each at least what the
        /// dimensions below them cover (<see cref="TensorLayout.Problem"/>) leave at most three candidates per
        /// dimension, tried largest stride first: at most 27 cases.
        /// </summary>
        public bool Overlaps(Lattice other, long shift)
        {
            Span<long> stride = [Batch, Head, Token];
            Span<long> high = [Batches - 1, Heads - 1, Tokens - 1];
            Span<long> low = [-(other.Batches - 1), -(other.Heads - 1), -(other.Tokens - 1)];
            for (int i = 1; i < 3; i++)   // sort by stride, largest first
                for (int j = i; j > 0 && stride[j] > stride[j - 1]; j--)
                {
                    (stride[j], stride[j - 1]) = (stride[j - 1], stride[j]);
                    (high[j], high[j - 1]) = (high[j - 1], high[j]);
                    (low[j], low[j - 1]) = (low[j - 1], low[j]);
                }
            return Reaches(shift, stride, low, high, 0);
        }

        private bool Reaches(long shift, Span<long> stride, Span<long> low, Span<long> high, int dim)
        {
            if (dim == 3)
                return Math.Abs(shift) < RowBytes;
            if (stride[dim] == 0 || (low[dim] == 0 && high[dim] == 0))
                return Reaches(shift, stride, low, high, dim + 1);
            long floor = shift / stride[dim];
            if (shift % stride[dim] != 0 && shift < 0)
                floor--;
            for (long c = Math.Max(floor - 1, low[dim]); c <= Math.Min(floor + 1, high[dim]); c++)
                if (Reaches(shift - c * stride[dim], stride, low, high, dim + 1))
                    return true;
            return false;
        }
    }

    /// <summary>
    /// Throws an <see cref="ArgumentException"/> naming the output when an output overlaps an input or an
    /// earlier output: same buffer and overlapping byte ranges. Views of different buffers never overlap.
    /// Call after <see cref="View"/> has checked each one (valid, live).
    /// </summary>
    public static void Disjoint(ReadOnlySpan<Arg> outputs, ReadOnlySpan<Arg> inputs)
    {
        for (int i = 0; i < outputs.Length; i++)
        {
            for (int j = 0; j < inputs.Length; j++)
                ThrowIfOverlap(outputs[i], inputs[j], "input");
            for (int j = 0; j < i; j++)
                ThrowIfOverlap(outputs[i], outputs[j], "output");
        }
    }

    private static void ThrowIfOverlap(Arg output, Arg other, string role)
    {
        if (!ReferenceEquals(output.Buffer, other.Buffer))
            return;
        long a0 = output.Start, a1 = output.End;
        long b0 = other.Start, b1 = other.End;
        if (!(a0 < b1 && b0 < a1))
            return;
        if (output.Rows.IsSet && other.Rows.IsSet && output.Rows.SameStrides(other.Rows))
        {
            // Two tensors with the same strides (slices of one fused buffer): disjoint unless a row of one meets a row
            // of the other.
            if (output.Rows.Overlaps(other.Rows, b0 - a0))
                throw new ArgumentException(
                    $"{output.Name} overlaps the {role} {other.Name}: both are views of one MemoryBuffer with the same strides, " +
                    $"starting {b0 - a0} bytes apart, and a row of one meets a row of the other. An output must not share memory " +
                    "with an input or another output.", output.Name);
            return;
        }
        if (output.Rows.IsSet || other.Rows.IsSet)
            throw new ArgumentException(
                $"{output.Name} overlaps the {role} {other.Name}: both are views of one MemoryBuffer, at bytes [{a0}, {a1}) and [{b0}, {b1}), " +
                "with different strides, so the library cannot show that no element is shared; an output must not share memory " +
                "with an input or another output. Give them the same layout (e.g. slices of one fused buffer) or separate buffers.",
                output.Name);
        throw new ArgumentException(
                $"{output.Name} overlaps the {role} {other.Name}: both are views of one MemoryBuffer, at bytes [{a0}, {a1}) and [{b0}, {b1}). " +
                "An output must not share memory with an input or another output (inputs may alias each other, e.g. q = k).",
                output.Name);
    }

    // ------------------------------------------------------------------------------------------------
    // Grid limits: (B*H) heads on grid X, blocks of rows on grid Y. A too-long T cannot be split away.

    /// <summary>The longest T a pass with <paramref name="rowsPerBlock"/> rows per group runs on this accelerator.</summary>
    public static long MaxLength(Accelerator accelerator, int rowsPerBlock) =>
        Math.Min((long)accelerator.MaxGridSize.Y * rowsPerBlock, AttentionShape.MaxLength);

    /// <summary>
    /// The grid of a pass whose kernel owns <paramref name="rowsPerBlock"/> rows (or keys) per group along T
    /// (its <see cref="KernelLaunch{TArgs}.RowsPerGroup"/>): checked in 64-bit before any launch arithmetic in 32-bit.
    /// </summary>
    public static void Grid(Accelerator accelerator, AttentionShape shape, int rowsPerBlock, string pass)
    {
        var max = accelerator.MaxGridSize;
        if (shape.HeadCount > max.X)
            throw new ArgumentOutOfRangeException("shape", shape.HeadCount,
                $"shape {shape} has B*H = {shape.HeadCount} heads; the {pass} puts one head per group along grid X, and " +
                $"{Describe(accelerator)} allows {max.X}: split the batch into calls of at most {max.X} heads.");
        long blocks = (shape.Length + (long)rowsPerBlock - 1) / rowsPerBlock;
        if (blocks > max.Y)
            throw new ArgumentOutOfRangeException("shape", shape.Length,
                $"shape {shape}: T = {shape.Length} needs {blocks} groups of {rowsPerBlock} rows along grid Y in the {pass}, and " +
                $"{Describe(accelerator)} allows {max.Y}, so the longest T the {pass} runs on it is {MaxLength(accelerator, rowsPerBlock)}. " +
                "Splitting the batch or the heads does not shorten T: this accelerator cannot run this sequence length.");
    }

    // ------------------------------------------------------------------------------------------------
    // Memory: what a call allocates, against what the accelerator has, checked before allocating.

    /// <summary>Bytes a host-level Forward allocates: q, k, v, o and rem, LogRem.</summary>
    public static long HostForwardBytes(AttentionShape shape, int elementBytes = sizeof(float)) =>
        checked(elementBytes * 4 * shape.TensorLength + 4 * 2 * shape.RowCount);

    /// <summary>
    /// Bytes a host-level Backward allocates: q, k, v, dO, o, dq, dk, dv, dRem, rem, LogRem and a workspace.
    /// A training step at the device level holds the same buffers (the caller's).
    /// </summary>
    public static long HostBackwardBytes(AttentionShape shape, int elementBytes = sizeof(float)) =>
        checked(elementBytes * 8 * shape.TensorLength + 4 * 3 * shape.RowCount + StickBreakingWorkspace.BytesFor(shape));

    /// <summary>
    /// Device memory the accelerator has in all. ILGPU's CPU accelerator reports <see cref="long.MaxValue"/>;
    /// its buffers live in host memory, so there it is the memory the .NET runtime sees (physical memory or
    /// the container's limit).
    /// </summary>
    public static long MemoryBytes(Accelerator accelerator) =>
        accelerator.AcceleratorType == AcceleratorType.CPU
            ? Math.Min(accelerator.MemorySize, GC.GetGCMemoryInfo().TotalAvailableMemoryBytes)
            : accelerator.MemorySize;

    /// <summary>Test hook: a smaller memory size than the accelerator's, to test the refusal on every backend.</summary>
    internal static long? MemoryBytesOverride { get; set; }

    /// <summary>
    /// Refuses a call or workspace that needs more bytes than the accelerator has in all: an
    /// <see cref="ArgumentOutOfRangeException"/> on the shape, like the grid limits (the shape is too large for
    /// this accelerator, whatever else runs), with both byte counts. Memory that is free now is not checked:
    /// an allocation that still fails throws ILGPU's own exception, and what the call allocated is freed.
    /// </summary>
    public static void Memory(Accelerator accelerator, long bytes, string what, AttentionShape shape, string paramName = "shape")
    {
        long has = MemoryBytesOverride ?? MemoryBytes(accelerator);
        if (bytes > has)
            throw new ArgumentOutOfRangeException(paramName, shape,
                $"{what} for {paramName} {shape} needs {bytes} bytes ({Gib(bytes)}) of device memory; {Describe(accelerator)} has " +
                $"{has} bytes ({Gib(has)}) in all. Use fewer heads per call or a shorter T (docs/limits.md).");
    }

    private static string Gib(long bytes) => $"{bytes / (double)(1L << 30):0.##} GiB";

    // ------------------------------------------------------------------------------------------------
    // One call at a time per instance

    /// <summary>
    /// Admits one call at a time on one instance: an instance is not thread-safe (its kernels are loaded
    /// lazily into fields, and ILGPU streams are not thread-safe), and a second call from another thread while
    /// one runs is refused with an <see cref="InvalidOperationException"/> before it touches anything. A call
    /// that enters again on the same thread (the host level calling the device level) is admitted.
    /// </summary>
    public sealed class CallGate
    {
        private int ownerThread;   // 0: free
        private int depth;         // nested entries of the owner thread beyond the first

        /// <summary>Test hook: runs inside every outermost call, right after it entered.</summary>
        internal Action? OnEntered { get; set; }

        /// <summary>Enters the gate, or throws if another thread is inside; dispose the scope to leave.</summary>
        public Scope Enter(Accelerator accelerator)
        {
            int me = Environment.CurrentManagedThreadId;
            int owner = Interlocked.CompareExchange(ref ownerThread, me, 0);
            if (owner == 0)
            {
                try
                {
                    OnEntered?.Invoke();
                }
                catch
                {
                    Exit();
                    throw;
                }
                return new Scope(this);
            }
            if (owner == me)
            {
                depth++;
                return new Scope(this);
            }
            throw new InvalidOperationException(
                $"A StickBreakingAttention instance is not thread-safe: a call on this instance (on {Describe(accelerator)}) is running on " +
                $"thread {owner}, so this call on thread {me} was refused before it enqueued anything. Use one instance per thread, " +
                "each with its own stream, or serialise the calls.");
        }

        private void Exit()
        {
            if (depth > 0)
                depth--;
            else
                Volatile.Write(ref ownerThread, 0);
        }

        /// <summary>Leaves the gate when disposed (a struct: entering allocates nothing).</summary>
        public readonly struct Scope(CallGate gate) : IDisposable
        {
            /// <inheritdoc />
            public void Dispose() => gate.Exit();
        }
    }
}
