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

    /// <summary>The bytes [Start, End) of a buffer that a view covers, and the name of the argument that carries it.</summary>
    public readonly record struct Arg(MemoryBuffer Buffer, long Start, long End, string Name)
    {
        /// <summary>The extent of <paramref name="view"/>, carried by the argument <paramref name="name"/>.</summary>
        public static Arg Of<T>(ArrayView<T> view, string name)
            where T : unmanaged
        {
            long start = StartInBytes(view);
            return new Arg(BufferOf(view), start, start + view.LengthInBytes, name);
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
        if (a0 < b1 && b0 < a1)
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
