using System;
using ILGPU;
using ILGPU.Runtime;
using StickBreaking.ILGPU.Kernels.Common;
using StickBreaking.ILGPU.Launch;

namespace StickBreaking.ILGPU;

/// <summary>
/// Stick-breaking attention (Tan et al., arXiv 2410.17980) on one ILGPU accelerator: a tiled fp32 forward
/// that returns o, rem and ln(rem), and a deterministic backward for dq, dk, dv.
/// </summary>
/// <remarks>
/// Two levels of API. The host-level <see cref="Forward(ReadOnlySpan{float}, ReadOnlySpan{float}, ReadOnlySpan{float}, AttentionShape, StickBreakingOptions?)"/>
/// and <see cref="Backward(ReadOnlySpan{float}, ReadOnlySpan{float}, ReadOnlySpan{float}, ReadOnlySpan{float}, ReadOnlySpan{float}, AttentionShape, StickBreakingOptions?)"/>
/// copy host arrays in and out. The device-level overloads take views already on the accelerator, enqueue on
/// a given stream and allocate nothing once the kernels are compiled (the first call on an accelerator
/// compiles them). The accelerator's context must be built with <c>EnableAlgorithms()</c> (ILGPU.Algorithms)
/// for GPU backends; launch shapes follow the accelerator's group-size, shared-memory and grid limits.
/// The instance uses the accelerator it is given and never picks a device itself. Not thread-safe.
/// </remarks>
public sealed class StickBreakingAttention : IDisposable
{
    private readonly Accelerator accelerator;
    private readonly KernelLauncher launcher;
    private readonly KernelSet kernels;
    private bool disposed;
    private readonly Guards.CallGate calls = new();

    /// <summary>Admits one call at a time (tests reach its pause hook).</summary>
    internal Guards.CallGate Calls => calls;

    /// <summary>Binds the kernels to <paramref name="accelerator"/>.</summary>
    /// <param name="accelerator">The accelerator to run on; it stays owned by the caller.</param>
    /// <exception cref="InvalidOperationException">The accelerator's context lacks <c>EnableAlgorithms()</c>, or the accelerator's limits cannot hold the kernels.</exception>
    public StickBreakingAttention(Accelerator accelerator)
        : this(accelerator, sharedMemoryLimit: null)
    {
    }

    /// <summary>As the public constructor, with the shared memory per group capped (tests the column slices on any device).</summary>
    /// <param name="accelerator">The accelerator to run on.</param>
    /// <param name="sharedMemoryLimit">A cap on shared memory per group below the accelerator's own.</param>
    /// <param name="choice">Which kernels to run: tests run the CUDA kernels' code on the CPU accelerator too.</param>
    internal StickBreakingAttention(Accelerator accelerator, int? sharedMemoryLimit, KernelChoice choice = KernelChoice.Auto)
    {
        ArgumentNullException.ThrowIfNull(accelerator);
        Guards.Accelerator(accelerator);
        this.accelerator = accelerator;
        launcher = new KernelLauncher(accelerator, sharedMemoryLimit);
        kernels = new KernelSet(accelerator, choice);
    }

    /// <summary>
    /// Whether the CUDA-only kernels (register tiles, more than 48 KB of shared memory) serve the head
    /// dimensions they cover (D up to 128); otherwise, and on other backends, the portable kernels run.
    /// </summary>
    public bool UsesCudaKernels => kernels.CudaForward;

    /// <summary>
    /// Whether the CUDA-only backward passes serve D up to 128 as well. They need 161 KB of opt-in shared
    /// memory per group (A100, H100, H200 have it); on a CUDA device with less, the CUDA forward runs with the
    /// portable backward, which reads the same snapshots.
    /// </summary>
    public bool UsesCudaBackwardKernels => kernels.CudaBackward;

    /// <summary>
    /// Benchmark diagnostics only: which backward passes Backward launches (bit 0: pass 1, dq and the P
    /// snapshots; bit 1: pass 2, dk and dv), so that each can be timed alone. Anything but 3 leaves the
    /// gradients incomplete.
    /// </summary>
    internal int BackwardPasses { get; set; } = 3;

    /// <summary>
    /// Benchmark diagnostics only: a launch bound for every CUDA kernel in place of each kernel's own
    /// (groups per SM; it caps the registers per thread). Set it before the first call.
    /// </summary>
    internal int? CudaGroupsPerMultiprocessorOverride
    {
        get => launcher.GroupsPerMultiprocessorOverride;
        set => launcher.GroupsPerMultiprocessorOverride = value;
    }

    /// <summary>The accelerator this instance runs on.</summary>
    public Accelerator Accelerator => accelerator;

    /// <summary>Threads per group of the portable kernels on this accelerator.</summary>
    public int GroupSize => launcher.Plan.GroupSize;

    // ------------------------------------------------------------------------------------------------
    // Host level: validate, upload, enqueue, download.

    /// <summary>
    /// Runs the forward on host arrays, row-major <c>[B, H, T, D]</c>; returns o <c>[B, H, T, D]</c>, rem and
    /// LogRem = ln(rem) <c>[B, H, T]</c>. Blocks until the result is on the host.
    /// </summary>
    /// <param name="q">Queries, <c>[B, H, T, D]</c>.</param>
    /// <param name="k">Keys, <c>[B, H, T, D]</c>.</param>
    /// <param name="v">Values, <c>[B, H, T, D]</c>.</param>
    /// <param name="shape">The sizes B, H, T, D.</param>
    /// <param name="options">Scale and visibility; <c>null</c> for the defaults.</param>
    public StickBreakingOutput Forward(ReadOnlySpan<float> q, ReadOnlySpan<float> k, ReadOnlySpan<float> v,
        AttentionShape shape, StickBreakingOptions? options = null)
    {
        ThrowIfDisposed();
        using var call = calls.Enter(accelerator);
        Guards.Accelerator(accelerator);
        shape.Validate(nameof(shape));
        CheckForwardGrid(shape);
        Guards.Memory(accelerator, Guards.HostForwardBytes(shape), "Forward", shape);
        CheckHost(q, shape.TensorLength, nameof(q), shape);
        CheckHost(k, shape.TensorLength, nameof(k), shape);
        CheckHost(v, shape.TensorLength, nameof(v), shape);
        options ??= StickBreakingOptions.Default;
        options.Validate(nameof(options));

        using var dq = Upload(q);
        using var dk = Upload(k);
        using var dv = Upload(v);
        using var o = accelerator.Allocate1D<float>(shape.TensorLength);
        using var rem = accelerator.Allocate1D<float>(shape.RowCount);
        using var logRem = accelerator.Allocate1D<float>(shape.RowCount);
        var stream = accelerator.DefaultStream;
        EnqueueForward(stream, shape, dq.View, dk.View, dv.View, o.View, rem.View, logRem.View, options, workspace: null);
        stream.Synchronize();
        return new StickBreakingOutput(o.GetAsArray1D(), rem.GetAsArray1D(), logRem.GetAsArray1D());
    }

    /// <summary>
    /// Gradients dq, dk, dv of L = sum dO . o + sum dRem . rem, from host arrays. Runs the training forward it
    /// needs. <paramref name="dRem"/> may be all zeros.
    /// </summary>
    /// <param name="q">Queries, <c>[B, H, T, D]</c>.</param>
    /// <param name="k">Keys, <c>[B, H, T, D]</c>.</param>
    /// <param name="v">Values, <c>[B, H, T, D]</c>.</param>
    /// <param name="dO">dL/do, <c>[B, H, T, D]</c>.</param>
    /// <param name="dRem">dL/drem, <c>[B, H, T]</c>.</param>
    /// <param name="shape">The sizes B, H, T, D.</param>
    /// <param name="options">Scale and visibility; <c>null</c> for the defaults.</param>
    public StickBreakingGradients Backward(ReadOnlySpan<float> q, ReadOnlySpan<float> k, ReadOnlySpan<float> v,
        ReadOnlySpan<float> dO, ReadOnlySpan<float> dRem, AttentionShape shape, StickBreakingOptions? options = null)
    {
        ThrowIfDisposed();
        using var call = calls.Enter(accelerator);
        Guards.Accelerator(accelerator);
        shape.Validate(nameof(shape));
        CheckForwardGrid(shape);
        CheckBackwardGrid(shape);
        Guards.Memory(accelerator, Guards.HostBackwardBytes(shape), "Backward", shape);
        CheckHost(q, shape.TensorLength, nameof(q), shape);
        CheckHost(k, shape.TensorLength, nameof(k), shape);
        CheckHost(v, shape.TensorLength, nameof(v), shape);
        CheckHost(dO, shape.TensorLength, nameof(dO), shape);
        CheckHost(dRem, shape.RowCount, nameof(dRem), shape);
        options ??= StickBreakingOptions.Default;
        options.Validate(nameof(options));

        using var workspace = new StickBreakingWorkspace(accelerator, shape);
        using var bq = Upload(q);
        using var bk = Upload(k);
        using var bv = Upload(v);
        using var bdO = Upload(dO);
        using var bdRem = Upload(dRem);
        using var o = accelerator.Allocate1D<float>(shape.TensorLength);
        using var rem = accelerator.Allocate1D<float>(shape.RowCount);
        using var logRem = accelerator.Allocate1D<float>(shape.RowCount);
        using var gq = accelerator.Allocate1D<float>(shape.TensorLength);
        using var gk = accelerator.Allocate1D<float>(shape.TensorLength);
        using var gv = accelerator.Allocate1D<float>(shape.TensorLength);
        var stream = accelerator.DefaultStream;
        EnqueueForward(stream, shape, bq.View, bk.View, bv.View, o.View, rem.View, logRem.View, options, workspace);
        EnqueueBackward(stream, shape, bq.View, bk.View, bv.View, bdO.View, bdRem.View, logRem.View, workspace,
            gq.View, gk.View, gv.View);
        stream.Synchronize();
        return new StickBreakingGradients(gq.GetAsArray1D(), gk.GetAsArray1D(), gv.GetAsArray1D());
    }

    // ------------------------------------------------------------------------------------------------
    // Device level: validate, enqueue.

    /// <summary>
    /// Enqueues the forward on <paramref name="stream"/> for views on this accelerator. Allocates nothing once
    /// the kernel is compiled. With a <paramref name="workspace"/> (a training forward) it also writes the
    /// snapshots that <see cref="Backward(AcceleratorStream, AttentionShape, ArrayView{float}, ArrayView{float}, ArrayView{float}, ArrayView{float}, ArrayView{float}, ArrayView{float}, StickBreakingWorkspace, ArrayView{float}, ArrayView{float}, ArrayView{float})"/>
    /// reads, and records the scale and visibility the backward then uses; an inference forward passes none and writes none.
    /// </summary>
    /// <param name="stream">A stream of this accelerator.</param>
    /// <param name="shape">The sizes B, H, T, D.</param>
    /// <param name="q">Queries, <c>[B, H, T, D]</c> contiguous.</param>
    /// <param name="k">Keys, <c>[B, H, T, D]</c> contiguous.</param>
    /// <param name="v">Values, <c>[B, H, T, D]</c> contiguous.</param>
    /// <param name="o">Output o, <c>[B, H, T, D]</c>.</param>
    /// <param name="rem">Output rem, <c>[B, H, T]</c>.</param>
    /// <param name="logRem">Output ln(rem), <c>[B, H, T]</c>: what the backward needs.</param>
    /// <param name="options">Scale and visibility; <c>null</c> for the defaults.</param>
    /// <param name="workspace">Where to write the backward's snapshots; <c>null</c> for inference.</param>
    public void Forward(AcceleratorStream stream, AttentionShape shape,
        ArrayView<float> q, ArrayView<float> k, ArrayView<float> v,
        ArrayView<float> o, ArrayView<float> rem, ArrayView<float> logRem,
        StickBreakingOptions? options = null, StickBreakingWorkspace? workspace = null)
    {
        ThrowIfDisposed();
        using var call = calls.Enter(accelerator);
        Guards.Accelerator(accelerator);
        CheckStream(stream);
        shape.Validate(nameof(shape));
        CheckForwardGrid(shape);
        CheckView(q, shape.TensorLength, nameof(q), shape);
        CheckView(k, shape.TensorLength, nameof(k), shape);
        CheckView(v, shape.TensorLength, nameof(v), shape);
        CheckView(o, shape.TensorLength, nameof(o), shape);
        CheckView(rem, shape.RowCount, nameof(rem), shape);
        CheckView(logRem, shape.RowCount, nameof(logRem), shape);
        Guards.Disjoint([new(o, nameof(o)), new(rem, nameof(rem)), new(logRem, nameof(logRem))],
            [new(q, nameof(q)), new(k, nameof(k)), new(v, nameof(v))]);
        options ??= StickBreakingOptions.Default;
        options.Validate(nameof(options));
        if (workspace is not null)
            CheckWorkspace(workspace, shape);
        EnqueueForward(stream, shape, q, k, v, o, rem, logRem, options, workspace);
    }

    /// <summary>
    /// Enqueues the backward on <paramref name="stream"/>: dq, dk, dv of L = sum dO . o + sum dRem . rem.
    /// <paramref name="workspace"/> must hold the snapshots of the training forward of the same inputs and shape
    /// (<see cref="Forward(AcceleratorStream, AttentionShape, ArrayView{float}, ArrayView{float}, ArrayView{float}, ArrayView{float}, ArrayView{float}, ArrayView{float}, StickBreakingOptions?, StickBreakingWorkspace?)"/>
    /// with that workspace), whose scale and visibility the backward uses, and <paramref name="logRem"/> that
    /// forward's LogRem. Bitwise deterministic: every output element is summed in a fixed order by one group.
    /// Allocates nothing once compiled.
    /// </summary>
    /// <param name="stream">A stream of this accelerator.</param>
    /// <param name="shape">The sizes B, H, T, D.</param>
    /// <param name="q">Queries, <c>[B, H, T, D]</c>.</param>
    /// <param name="k">Keys, <c>[B, H, T, D]</c>.</param>
    /// <param name="v">Values, <c>[B, H, T, D]</c>.</param>
    /// <param name="dO">dL/do, <c>[B, H, T, D]</c>.</param>
    /// <param name="dRem">dL/drem, <c>[B, H, T]</c>; may be all zeros.</param>
    /// <param name="logRem">The forward's LogRem, <c>[B, H, T]</c>.</param>
    /// <param name="workspace">The workspace the training forward filled; the backward also writes its prefix snapshots there.</param>
    /// <param name="dq">Output dL/dq, <c>[B, H, T, D]</c>.</param>
    /// <param name="dk">Output dL/dk, <c>[B, H, T, D]</c>.</param>
    /// <param name="dv">Output dL/dv, <c>[B, H, T, D]</c>.</param>
    public void Backward(AcceleratorStream stream, AttentionShape shape,
        ArrayView<float> q, ArrayView<float> k, ArrayView<float> v,
        ArrayView<float> dO, ArrayView<float> dRem, ArrayView<float> logRem,
        StickBreakingWorkspace workspace,
        ArrayView<float> dq, ArrayView<float> dk, ArrayView<float> dv)
    {
        ThrowIfDisposed();
        using var call = calls.Enter(accelerator);
        Guards.Accelerator(accelerator);
        CheckStream(stream);
        shape.Validate(nameof(shape));
        CheckBackwardGrid(shape);
        CheckView(q, shape.TensorLength, nameof(q), shape);
        CheckView(k, shape.TensorLength, nameof(k), shape);
        CheckView(v, shape.TensorLength, nameof(v), shape);
        CheckView(dO, shape.TensorLength, nameof(dO), shape);
        CheckView(dRem, shape.RowCount, nameof(dRem), shape);
        CheckView(logRem, shape.RowCount, nameof(logRem), shape);
        CheckView(dq, shape.TensorLength, nameof(dq), shape);
        CheckView(dk, shape.TensorLength, nameof(dk), shape);
        CheckView(dv, shape.TensorLength, nameof(dv), shape);
        Guards.Disjoint([new(dq, nameof(dq)), new(dk, nameof(dk)), new(dv, nameof(dv))],
            [new(q, nameof(q)), new(k, nameof(k)), new(v, nameof(v)), new(dO, nameof(dO)), new(dRem, nameof(dRem)), new(logRem, nameof(logRem))]);
        CheckWorkspace(workspace, shape);
        if (workspace.FilledBy?.Shape != shape)
            throw new ArgumentException(
                $"workspace holds no snapshots of a training forward with shape {shape} " +
                $"(it holds {(workspace.FilledBy is { } f ? $"those of {f.Shape}" : "none")}): run Forward with this workspace first.",
                nameof(workspace));
        EnqueueBackward(stream, shape, q, k, v, dO, dRem, logRem, workspace, dq, dk, dv);
    }

    /// <summary>Releases the compiled kernels; the accelerator stays the caller's.</summary>
    public void Dispose() => disposed = true;

    // ------------------------------------------------------------------------------------------------
    // Arguments and launch (inputs already validated).

    private void EnqueueForward(AcceleratorStream stream, AttentionShape shape,
        ArrayView<float> q, ArrayView<float> k, ArrayView<float> v,
        ArrayView<float> o, ArrayView<float> rem, ArrayView<float> logRem,
        StickBreakingOptions options, StickBreakingWorkspace? workspace)
    {
        int D = shape.HeadDim, T = shape.Length;
        float scale = options.ScaleFor(D);
        var args = new ForwardArgs<float>
        {
            Q = q, K = k, V = v, O = o, Rem = rem, LogRem = logRem,
            AccSnapshots = workspace?.AccFor(shape) ?? ArrayView<float>.Empty,
            WriteSnapshots = workspace is null ? 0 : 1,
            SnapshotTiles = Snapshots.TileCount(T),
            Length = T, HeadDim = D, AttendCurrent = options.AttendCurrent ? 1 : 0, Scale = scale,
        };
        launcher.Launch(kernels.Forward(D), stream, shape, args);
        if (workspace is not null)
            workspace.FilledBy = (shape, scale, options.AttendCurrent);
    }

    private void EnqueueBackward(AcceleratorStream stream, AttentionShape shape,
        ArrayView<float> q, ArrayView<float> k, ArrayView<float> v,
        ArrayView<float> dO, ArrayView<float> dRem, ArrayView<float> logRem,
        StickBreakingWorkspace workspace,
        ArrayView<float> dq, ArrayView<float> dk, ArrayView<float> dv)
    {
        var (_, scale, attendCurrent) = workspace.FilledBy!.Value;
        int D = shape.HeadDim, T = shape.Length;
        var args = new BackwardArgs<float>
        {
            Q = q, K = k, V = v, DO = dO, DRem = dRem, LogRem = logRem,
            AccSnapshots = workspace.AccFor(shape), PrefixSnapshots = workspace.PrefixFor(shape),
            DQ = dq, DK = dk, DV = dv,
            Length = T, HeadDim = D, AttendCurrent = attendCurrent ? 1 : 0, SnapshotTiles = Snapshots.TileCount(T), Scale = scale,
        };
        var (query, key) = kernels.Backward(D);
        if ((BackwardPasses & 1) != 0)
            launcher.Launch(query, stream, shape, args);
        if ((BackwardPasses & 2) != 0)
            launcher.Launch(key, stream, shape, args);
    }

    private MemoryBuffer1D<float, Stride1D.Dense> Upload(ReadOnlySpan<float> data)
    {
        var buffer = accelerator.Allocate1D<float>(data.Length);
        try
        {
            buffer.View.CopyFromCPU(accelerator.DefaultStream, data);
        }
        catch
        {
            buffer.Dispose();   // a failed copy frees its buffer; the caller's earlier buffers are freed by their using
            throw;
        }
        return buffer;
    }

    // ------------------------------------------------------------------------------------------------
    // Validation (each check once per call, before anything is enqueued).

    private void ThrowIfDisposed() => ObjectDisposedException.ThrowIf(disposed, this);

    /// <summary>Rows (or keys) per group along T of the forward kernel that serves <paramref name="headDim"/>.</summary>
    internal int ForwardRowsPerGroup(int headDim) => kernels.Forward(headDim).RowsPerGroup;

    /// <summary>Rows (or keys) per group along T of the backward pass with the most groups for <paramref name="headDim"/>.</summary>
    internal int BackwardRowsPerGroup(int headDim)
    {
        var (query, key) = kernels.Backward(headDim);
        return Math.Min(query.RowsPerGroup, key.RowsPerGroup);
    }

    private void CheckForwardGrid(AttentionShape shape) =>
        Guards.Grid(accelerator, shape, ForwardRowsPerGroup(shape.HeadDim), "forward");

    private void CheckBackwardGrid(AttentionShape shape) =>
        Guards.Grid(accelerator, shape, BackwardRowsPerGroup(shape.HeadDim), "backward");

    private void CheckStream(AcceleratorStream stream) => Guards.Stream(accelerator, stream);

    private void CheckWorkspace(StickBreakingWorkspace workspace, AttentionShape shape) => Guards.Workspace(accelerator, workspace, shape);

    private static void CheckHost(ReadOnlySpan<float> data, long expected, string name, AttentionShape shape) =>
        Guards.Host(data, expected, name, shape);

    private void CheckView(ArrayView<float> view, long expected, string name, AttentionShape shape) =>
        Guards.View(accelerator, view, expected, name, shape);
}
