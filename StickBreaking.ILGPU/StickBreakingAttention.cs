using System;
using System.Diagnostics.CodeAnalysis;
using System.Runtime.InteropServices;
using Half = System.Half;
using ILGPU;
using ILGPU.Runtime;
using StickBreaking.ILGPU.Kernels.Common;
using StickBreaking.ILGPU.Kernels.TensorCore;
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
public sealed partial class StickBreakingAttention : IDisposable
{
    private readonly Accelerator accelerator;
    private readonly KernelLauncher launcher;
    private readonly KernelSet kernels;
    private bool disposed;
    private MemoryBuffer1D<float, Stride1D.Dense>? scratch;
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
    /// Whether the tensor-core forward (mma.sync, fp32 accumulation) serves fp16 and bf16 storage for head dimensions
    /// 64 and 128: on CUDA devices that hold it; other head dimensions and accelerators run the portable kernels.
    /// </summary>
    public bool UsesTensorCores => kernels.TensorCoreForward;

    /// <summary>
    /// Whether the tensor-core backward passes (mma.sync, fp32 accumulation) serve fp16 and bf16 storage for head
    /// dimensions 64 and 128: on CUDA devices that hold them (about 170 KB of opt-in shared memory per group for the
    /// dk/dv pass); other head dimensions and accelerators run the portable 16-bit passes.
    /// </summary>
    public bool UsesTensorCoreBackward => kernels.TensorCoreBackward;

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
        var layout = ResolveLayout(ref options, shape);
        Guards.Memory(accelerator, HostForwardBytes(layout, sizeof(float)), "Forward", shape);
        CheckHostInputs(layout, q, k, v);

        using var dq = Upload(q);
        using var dk = Upload(k);
        using var dv = Upload(v);
        using var o = AllocateOutput<float>(layout.QuerySpan(layout.O), layout.Custom);
        using var rem = accelerator.Allocate1D<float>(shape.RowCount);
        using var logRem = accelerator.Allocate1D<float>(shape.RowCount);
        var stream = accelerator.DefaultStream;
        EnqueueForward(stream, layout, dq.View, dk.View, dv.View, o.View, rem.View, logRem.View, options, workspace: null);
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
        var layout = ResolveLayout(ref options, shape);
        Guards.Memory(accelerator, HostBackwardBytes(layout, sizeof(float)), "Backward", shape);
        CheckHostInputs(layout, q, k, v);
        Guards.HostTensor(dO, layout.QuerySpan(layout.DO), layout.Custom, nameof(dO), shape);
        CheckHost(dRem, shape.RowCount, nameof(dRem), shape);

        using var workspace = new StickBreakingWorkspace(accelerator, shape);
        using var bq = Upload(q);
        using var bk = Upload(k);
        using var bv = Upload(v);
        using var bdO = Upload(dO);
        using var bdRem = Upload(dRem);
        using var o = AllocateOutput<float>(layout.QuerySpan(layout.O), layout.Custom);
        using var rem = accelerator.Allocate1D<float>(shape.RowCount);
        using var logRem = accelerator.Allocate1D<float>(shape.RowCount);
        using var gq = AllocateOutput<float>(layout.QuerySpan(layout.DQ), layout.Custom);
        using var gk = AllocateOutput<float>(layout.KeySpan(layout.DK), layout.Custom);
        using var gv = AllocateOutput<float>(layout.KeySpan(layout.DV), layout.Custom);
        var stream = accelerator.DefaultStream;
        EnqueueForward(stream, layout, bq.View, bk.View, bv.View, o.View, rem.View, logRem.View, options, workspace);
        EnqueueBackward(stream, layout, bq.View, bk.View, bv.View, bdO.View, bdRem.View, logRem.View, workspace,
            gq.View, gk.View, gv.View);
        stream.Synchronize();
        return new StickBreakingGradients(gq.GetAsArray1D(), gk.GetAsArray1D(), gv.GetAsArray1D());
    }

    /// <summary>
    /// The forward on fp16 host arrays, row-major <c>[B, H, T, D]</c>: o in fp16, rem and LogRem in fp32. Every
    /// product is accumulated and every scan summed in fp32 (docs/math.md, "16-bit storage"). Blocks until the
    /// result is on the host.
    /// </summary>
    /// <param name="q">Queries, <c>[B, H, T, D]</c>.</param>
    /// <param name="k">Keys, <c>[B, H, T, D]</c>.</param>
    /// <param name="v">Values, <c>[B, H, T, D]</c>.</param>
    /// <param name="shape">The sizes B, H, T, D.</param>
    /// <param name="options">Scale and visibility; <c>null</c> for the defaults.</param>
    public StickBreakingOutput<Half> Forward(ReadOnlySpan<Half> q, ReadOnlySpan<Half> k, ReadOnlySpan<Half> v,
        AttentionShape shape, StickBreakingOptions? options = null) =>
        HostForward16(q, k, v, shape, options, bf16: false);

    /// <summary>The forward on bf16 host arrays: as the fp16 overload, with o in bf16.</summary>
    /// <param name="q">Queries, <c>[B, H, T, D]</c>.</param>
    /// <param name="k">Keys, <c>[B, H, T, D]</c>.</param>
    /// <param name="v">Values, <c>[B, H, T, D]</c>.</param>
    /// <param name="shape">The sizes B, H, T, D.</param>
    /// <param name="options">Scale and visibility; <c>null</c> for the defaults.</param>
    public StickBreakingOutput<BFloat16> Forward(ReadOnlySpan<BFloat16> q, ReadOnlySpan<BFloat16> k, ReadOnlySpan<BFloat16> v,
        AttentionShape shape, StickBreakingOptions? options = null) =>
        HostForward16(q, k, v, shape, options, bf16: true);

    private StickBreakingOutput<T> HostForward16<T>(ReadOnlySpan<T> q, ReadOnlySpan<T> k, ReadOnlySpan<T> v,
        AttentionShape shape, StickBreakingOptions? options, bool bf16)
        where T : unmanaged
    {
        ThrowIfDisposed();
        using var call = calls.Enter(accelerator);
        Guards.Accelerator(accelerator);
        shape.Validate(nameof(shape));
        CheckForward16Grid(shape, bf16);
        var layout = ResolveLayout(ref options, shape);
        Guards.Memory(accelerator, HostForwardBytes(layout, elementBytes: 2), "Forward", shape);
        CheckHostInputs(layout, q, k, v);

        using var dq = Upload(MemoryMarshal.Cast<T, ushort>(q));
        using var dk = Upload(MemoryMarshal.Cast<T, ushort>(k));
        using var dv = Upload(MemoryMarshal.Cast<T, ushort>(v));
        using var o = AllocateOutput<ushort>(layout.QuerySpan(layout.O), layout.Custom);
        using var rem = accelerator.Allocate1D<float>(shape.RowCount);
        using var logRem = accelerator.Allocate1D<float>(shape.RowCount);
        var stream = accelerator.DefaultStream;
        EnqueueForward16(stream, layout, dq.View, dk.View, dv.View, o.View, rem.View, logRem.View, options, workspace: null, bf16);
        stream.Synchronize();
        var result = new T[o.Length];
        o.View.CopyToCPU(stream, MemoryMarshal.Cast<T, ushort>(result.AsSpan()));
        return new StickBreakingOutput<T>(result, rem.GetAsArray1D(), logRem.GetAsArray1D());
    }

    /// <summary>
    /// Gradients dq, dk, dv of L = sum dO . o + sum dRem . rem from fp16 host arrays: the gradients in fp16, every
    /// product accumulated and every scan summed in fp32 (docs/math.md, "16-bit storage"), rounded once. Runs the
    /// training forward it needs. <paramref name="dRem"/> is fp32 (as the forward's rem) and may be all zeros.
    /// Bitwise deterministic.
    /// </summary>
    /// <param name="q">Queries, <c>[B, H, T, D]</c>.</param>
    /// <param name="k">Keys, <c>[B, H, T, D]</c>.</param>
    /// <param name="v">Values, <c>[B, H, T, D]</c>.</param>
    /// <param name="dO">dL/do, <c>[B, H, T, D]</c>.</param>
    /// <param name="dRem">dL/drem, <c>[B, H, T]</c>, fp32.</param>
    /// <param name="shape">The sizes B, H, T, D.</param>
    /// <param name="options">Scale and visibility; <c>null</c> for the defaults.</param>
    public StickBreakingGradients<Half> Backward(ReadOnlySpan<Half> q, ReadOnlySpan<Half> k, ReadOnlySpan<Half> v,
        ReadOnlySpan<Half> dO, ReadOnlySpan<float> dRem, AttentionShape shape, StickBreakingOptions? options = null) =>
        HostBackward16(q, k, v, dO, dRem, shape, options, bf16: false);

    /// <summary>The backward on bf16 host arrays: as the fp16 overload, with the gradients in bf16.</summary>
    /// <param name="q">Queries, <c>[B, H, T, D]</c>.</param>
    /// <param name="k">Keys, <c>[B, H, T, D]</c>.</param>
    /// <param name="v">Values, <c>[B, H, T, D]</c>.</param>
    /// <param name="dO">dL/do, <c>[B, H, T, D]</c>.</param>
    /// <param name="dRem">dL/drem, <c>[B, H, T]</c>, fp32.</param>
    /// <param name="shape">The sizes B, H, T, D.</param>
    /// <param name="options">Scale and visibility; <c>null</c> for the defaults.</param>
    public StickBreakingGradients<BFloat16> Backward(ReadOnlySpan<BFloat16> q, ReadOnlySpan<BFloat16> k, ReadOnlySpan<BFloat16> v,
        ReadOnlySpan<BFloat16> dO, ReadOnlySpan<float> dRem, AttentionShape shape, StickBreakingOptions? options = null) =>
        HostBackward16(q, k, v, dO, dRem, shape, options, bf16: true);

    private StickBreakingGradients<T> HostBackward16<T>(ReadOnlySpan<T> q, ReadOnlySpan<T> k, ReadOnlySpan<T> v,
        ReadOnlySpan<T> dO, ReadOnlySpan<float> dRem, AttentionShape shape, StickBreakingOptions? options, bool bf16)
        where T : unmanaged
    {
        ThrowIfDisposed();
        using var call = calls.Enter(accelerator);
        Guards.Accelerator(accelerator);
        shape.Validate(nameof(shape));
        CheckForward16Grid(shape, bf16);
        CheckBackward16Grid(shape, bf16);
        var layout = ResolveLayout(ref options, shape);
        Guards.Memory(accelerator, HostBackwardBytes(layout, elementBytes: 2), "Backward", shape);
        CheckHostInputs(layout, q, k, v);
        Guards.HostTensor(dO, layout.QuerySpan(layout.DO), layout.Custom, nameof(dO), shape);
        CheckHost(dRem, shape.RowCount, nameof(dRem), shape);

        using var workspace = new StickBreakingWorkspace(accelerator, shape);
        using var bq = Upload(MemoryMarshal.Cast<T, ushort>(q));
        using var bk = Upload(MemoryMarshal.Cast<T, ushort>(k));
        using var bv = Upload(MemoryMarshal.Cast<T, ushort>(v));
        using var bdO = Upload(MemoryMarshal.Cast<T, ushort>(dO));
        using var bdRem = Upload(dRem);
        using var o = AllocateOutput<ushort>(layout.QuerySpan(layout.O), layout.Custom);
        using var rem = accelerator.Allocate1D<float>(shape.RowCount);
        using var logRem = accelerator.Allocate1D<float>(shape.RowCount);
        using var gq = AllocateOutput<ushort>(layout.QuerySpan(layout.DQ), layout.Custom);
        using var gk = AllocateOutput<ushort>(layout.KeySpan(layout.DK), layout.Custom);
        using var gv = AllocateOutput<ushort>(layout.KeySpan(layout.DV), layout.Custom);
        var stream = accelerator.DefaultStream;
        EnqueueForward16(stream, layout, bq.View, bk.View, bv.View, o.View, rem.View, logRem.View, options, workspace, bf16);
        EnqueueBackward16(stream, layout, bq.View, bk.View, bv.View, bdO.View, bdRem.View, logRem.View, workspace,
            gq.View, gk.View, gv.View, bf16);
        stream.Synchronize();
        T[] Download(MemoryBuffer1D<ushort, Stride1D.Dense> buffer)
        {
            var result = new T[buffer.Length];
            buffer.View.CopyToCPU(stream, MemoryMarshal.Cast<T, ushort>(result.AsSpan()));
            return result;
        }
        return new StickBreakingGradients<T>(Download(gq), Download(gk), Download(gv));
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
        var layout = ResolveLayout(ref options, shape);
        CheckForwardViews(layout, q, k, v, o, rem, logRem);
        if (workspace is not null)
            CheckWorkspace(workspace, shape);
        EnqueueForward(stream, layout, q, k, v, o, rem, logRem, options, workspace);
    }

    /// <summary>
    /// Enqueues the forward for fp16 views on this accelerator: o in fp16, rem and LogRem in fp32, every product and
    /// scan in fp32. On a CUDA device with tensor cores, head dimensions 64 and 128 run the tensor-core kernel
    /// (<see cref="UsesTensorCores"/>); q, k and v must then start at 16-byte aligned addresses (whole heads of a
    /// buffer do). Allocates nothing once the kernel is compiled; a <paramref name="workspace"/> makes it a
    /// training forward, as for fp32.
    /// </summary>
    /// <param name="stream">A stream of this accelerator.</param>
    /// <param name="shape">The sizes B, H, T, D.</param>
    /// <param name="q">Queries, <c>[B, H, T, D]</c> contiguous.</param>
    /// <param name="k">Keys, <c>[B, H, T, D]</c> contiguous.</param>
    /// <param name="v">Values, <c>[B, H, T, D]</c> contiguous.</param>
    /// <param name="o">Output o, <c>[B, H, T, D]</c>.</param>
    /// <param name="rem">Output rem, <c>[B, H, T]</c>, fp32.</param>
    /// <param name="logRem">Output ln(rem), <c>[B, H, T]</c>, fp32.</param>
    /// <param name="options">Scale and visibility; <c>null</c> for the defaults.</param>
    /// <param name="workspace">Where to write the backward's snapshots; <c>null</c> for inference.</param>
    public void Forward(AcceleratorStream stream, AttentionShape shape,
        ArrayView<Half> q, ArrayView<Half> k, ArrayView<Half> v,
        ArrayView<Half> o, ArrayView<float> rem, ArrayView<float> logRem,
        StickBreakingOptions? options = null, StickBreakingWorkspace? workspace = null) =>
        DeviceForward16(stream, shape, q, k, v, o, rem, logRem, options, workspace, bf16: false);

    /// <summary>Enqueues the forward for bf16 views: as the fp16 overload, with o in bf16.</summary>
    /// <param name="stream">A stream of this accelerator.</param>
    /// <param name="shape">The sizes B, H, T, D.</param>
    /// <param name="q">Queries, <c>[B, H, T, D]</c> contiguous.</param>
    /// <param name="k">Keys, <c>[B, H, T, D]</c> contiguous.</param>
    /// <param name="v">Values, <c>[B, H, T, D]</c> contiguous.</param>
    /// <param name="o">Output o, <c>[B, H, T, D]</c>.</param>
    /// <param name="rem">Output rem, <c>[B, H, T]</c>, fp32.</param>
    /// <param name="logRem">Output ln(rem), <c>[B, H, T]</c>, fp32.</param>
    /// <param name="options">Scale and visibility; <c>null</c> for the defaults.</param>
    /// <param name="workspace">Where to write the backward's snapshots; <c>null</c> for inference.</param>
    public void Forward(AcceleratorStream stream, AttentionShape shape,
        ArrayView<BFloat16> q, ArrayView<BFloat16> k, ArrayView<BFloat16> v,
        ArrayView<BFloat16> o, ArrayView<float> rem, ArrayView<float> logRem,
        StickBreakingOptions? options = null, StickBreakingWorkspace? workspace = null) =>
        DeviceForward16(stream, shape, q, k, v, o, rem, logRem, options, workspace, bf16: true);

    private void DeviceForward16<T>(AcceleratorStream stream, AttentionShape shape,
        ArrayView<T> q, ArrayView<T> k, ArrayView<T> v, ArrayView<T> o, ArrayView<float> rem, ArrayView<float> logRem,
        StickBreakingOptions? options, StickBreakingWorkspace? workspace, bool bf16)
        where T : unmanaged
    {
        ThrowIfDisposed();
        using var call = calls.Enter(accelerator);
        Guards.Accelerator(accelerator);
        CheckStream(stream);
        shape.Validate(nameof(shape));
        CheckForward16Grid(shape, bf16);
        var layout = ResolveLayout(ref options, shape);
        CheckForwardViews(layout, q, k, v, o, rem, logRem);
        if (workspace is not null)
            CheckWorkspace(workspace, shape);
        if (kernels.TensorCoreForward16(shape.HeadDim, shape.Length, bf16) is not null)
        {
            TensorCoreAligned(q, layout.Q, 16, nameof(q), layout.Shape.Length);
            TensorCoreAligned(k, layout.K, 16, nameof(k), layout.Shape.Length);
            TensorCoreAligned(v, layout.V, 16, nameof(v), layout.Shape.Length);
            TensorCoreAligned(o, layout.O, 4, nameof(o), layout.Shape.Length);
        }
        EnqueueForward16(stream, layout, q.Cast<ushort>(), k.Cast<ushort>(), v.Cast<ushort>(), o.Cast<ushort>(), rem, logRem,
            options, workspace, bf16);
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
        var layout = TrainingLayout(workspace, shape);
        CheckBackwardViews(layout, q, k, v, dO, dRem, logRem, dq, dk, dv);
        CheckTrainingWorkspace(workspace, shape);
        EnqueueBackward(stream, layout, q, k, v, dO, dRem, logRem, workspace, dq, dk, dv);
    }

    /// <summary>
    /// Enqueues the backward for fp16 views: dq, dk, dv in fp16 of L = sum dO . o + sum dRem . rem, every product and
    /// scan in fp32. <paramref name="workspace"/> must hold the snapshots of the 16-bit training forward of the same
    /// inputs and shape, whose scale and visibility the backward uses, and <paramref name="logRem"/> that forward's
    /// LogRem. Where the tensor-core backward serves (<see cref="UsesTensorCoreBackward"/>, D = 64 or 128),
    /// q, k, v and dO must start at 16-byte aligned addresses and dq, dk, dv at 4-byte aligned ones (whole heads of a
    /// buffer do), else an <see cref="ArgumentException"/> names the view. Bitwise
    /// deterministic; allocates nothing once compiled (on OpenCL the instance keeps an fp32 scratch, grown only for a
    /// larger shape).
    /// </summary>
    /// <param name="stream">A stream of this accelerator.</param>
    /// <param name="shape">The sizes B, H, T, D.</param>
    /// <param name="q">Queries, <c>[B, H, T, D]</c>.</param>
    /// <param name="k">Keys, <c>[B, H, T, D]</c>.</param>
    /// <param name="v">Values, <c>[B, H, T, D]</c>.</param>
    /// <param name="dO">dL/do, <c>[B, H, T, D]</c>.</param>
    /// <param name="dRem">dL/drem, <c>[B, H, T]</c>, fp32; may be all zeros.</param>
    /// <param name="logRem">The forward's LogRem, <c>[B, H, T]</c>, fp32.</param>
    /// <param name="workspace">The workspace the training forward filled; the backward also writes its prefix snapshots there.</param>
    /// <param name="dq">Output dL/dq, <c>[B, H, T, D]</c>.</param>
    /// <param name="dk">Output dL/dk, <c>[B, H, T, D]</c>.</param>
    /// <param name="dv">Output dL/dv, <c>[B, H, T, D]</c>.</param>
    public void Backward(AcceleratorStream stream, AttentionShape shape,
        ArrayView<Half> q, ArrayView<Half> k, ArrayView<Half> v,
        ArrayView<Half> dO, ArrayView<float> dRem, ArrayView<float> logRem,
        StickBreakingWorkspace workspace,
        ArrayView<Half> dq, ArrayView<Half> dk, ArrayView<Half> dv) =>
        DeviceBackward16(stream, shape, q, k, v, dO, dRem, logRem, workspace, dq, dk, dv, bf16: false);

    /// <summary>Enqueues the backward for bf16 views: as the fp16 overload, with the gradients in bf16.</summary>
    /// <param name="stream">A stream of this accelerator.</param>
    /// <param name="shape">The sizes B, H, T, D.</param>
    /// <param name="q">Queries, <c>[B, H, T, D]</c>.</param>
    /// <param name="k">Keys, <c>[B, H, T, D]</c>.</param>
    /// <param name="v">Values, <c>[B, H, T, D]</c>.</param>
    /// <param name="dO">dL/do, <c>[B, H, T, D]</c>.</param>
    /// <param name="dRem">dL/drem, <c>[B, H, T]</c>, fp32; may be all zeros.</param>
    /// <param name="logRem">The forward's LogRem, <c>[B, H, T]</c>, fp32.</param>
    /// <param name="workspace">The workspace the training forward filled; the backward also writes its prefix snapshots there.</param>
    /// <param name="dq">Output dL/dq, <c>[B, H, T, D]</c>.</param>
    /// <param name="dk">Output dL/dk, <c>[B, H, T, D]</c>.</param>
    /// <param name="dv">Output dL/dv, <c>[B, H, T, D]</c>.</param>
    public void Backward(AcceleratorStream stream, AttentionShape shape,
        ArrayView<BFloat16> q, ArrayView<BFloat16> k, ArrayView<BFloat16> v,
        ArrayView<BFloat16> dO, ArrayView<float> dRem, ArrayView<float> logRem,
        StickBreakingWorkspace workspace,
        ArrayView<BFloat16> dq, ArrayView<BFloat16> dk, ArrayView<BFloat16> dv) =>
        DeviceBackward16(stream, shape, q, k, v, dO, dRem, logRem, workspace, dq, dk, dv, bf16: true);

    private void DeviceBackward16<T>(AcceleratorStream stream, AttentionShape shape,
        ArrayView<T> q, ArrayView<T> k, ArrayView<T> v, ArrayView<T> dO, ArrayView<float> dRem, ArrayView<float> logRem,
        StickBreakingWorkspace workspace, ArrayView<T> dq, ArrayView<T> dk, ArrayView<T> dv, bool bf16)
        where T : unmanaged
    {
        ThrowIfDisposed();
        using var call = calls.Enter(accelerator);
        Guards.Accelerator(accelerator);
        CheckStream(stream);
        shape.Validate(nameof(shape));
        CheckBackward16Grid(shape, bf16);
        var layout = TrainingLayout(workspace, shape);
        CheckBackwardViews(layout, q, k, v, dO, dRem, logRem, dq, dk, dv);
        CheckTrainingWorkspace(workspace, shape);
        if (kernels.TensorCoreBackward16(shape.HeadDim, bf16) is not null)
        {
            TensorCoreAligned(q, layout.Q, 16, nameof(q), layout.Shape.Length);
            TensorCoreAligned(k, layout.K, 16, nameof(k), layout.Shape.Length);
            TensorCoreAligned(v, layout.V, 16, nameof(v), layout.Shape.Length);
            TensorCoreAligned(dO, layout.DO, 16, nameof(dO), layout.Shape.Length);
            TensorCoreAligned(dq, layout.DQ, 4, nameof(dq), layout.Shape.Length);
            TensorCoreAligned(dk, layout.DK, 4, nameof(dk), layout.Shape.Length);
            TensorCoreAligned(dv, layout.DV, 4, nameof(dv), layout.Shape.Length);
        }
        EnqueueBackward16(stream, layout, q.Cast<ushort>(), k.Cast<ushort>(), v.Cast<ushort>(), dO.Cast<ushort>(), dRem, logRem,
            workspace, dq.Cast<ushort>(), dk.Cast<ushort>(), dv.Cast<ushort>(), bf16);
    }

    /// <summary>Releases the compiled kernels; the accelerator stays the caller's.</summary>
    public void Dispose()
    {
        disposed = true;
        scratch?.Dispose();
        scratch = null;
        DisposeDecode();
    }

    // ------------------------------------------------------------------------------------------------
    // Arguments and launch (inputs already validated).

    private void EnqueueForward(AcceleratorStream stream, AttentionLayout.Resolved layout,
        ArrayView<float> q, ArrayView<float> k, ArrayView<float> v,
        ArrayView<float> o, ArrayView<float> rem, ArrayView<float> logRem,
        StickBreakingOptions options, StickBreakingWorkspace? workspace)
    {
        var shape = layout.Shape;
        int D = shape.HeadDim, T = shape.Length;
        float scale = options.ScaleFor(D);
        var args = new ForwardArgs<float>
        {
            Q = q, K = k, V = v, O = o, Rem = rem, LogRem = logRem,
            AccSnapshots = workspace?.AccFor(shape) ?? ArrayView<float>.Empty,
            WriteSnapshots = workspace is null ? 0 : 1,
            SnapshotTiles = Snapshots.TileCount(T),
            Rows = layout.Rows, Length = T, HeadDim = D, AttendCurrent = options.AttendCurrent ? 1 : 0, Scale = scale,
        };
        launcher.Launch(kernels.Forward(D), stream, shape, args);
        if (workspace is not null)
            workspace.FilledBy = (shape, scale, options.AttendCurrent, options.ExactProducts, options.Layout);
    }

    private void EnqueueForward16(AcceleratorStream stream, AttentionLayout.Resolved layout,
        ArrayView<ushort> q, ArrayView<ushort> k, ArrayView<ushort> v,
        ArrayView<ushort> o, ArrayView<float> rem, ArrayView<float> logRem,
        StickBreakingOptions options, StickBreakingWorkspace? workspace, bool bf16)
    {
        var shape = layout.Shape;
        int D = shape.HeadDim, T = shape.Length;
        float scale = options.ScaleFor(D);
        var snapshots = workspace?.AccFor(shape) ?? ArrayView<float>.Empty;
        if (kernels.TensorCoreForward16(D, T, bf16, options.ExactProducts) is { } tensorCores)
        {
            launcher.Launch(tensorCores, stream, shape, new TensorCoreForwardArgs
            {
                Q = q, K = k, V = v, O = o, Rem = rem, LogRem = logRem,
                AccSnapshots = snapshots, WriteSnapshots = workspace is null ? 0 : 1, SnapshotTiles = Snapshots.TileCount(T),
                Rows = layout.Rows, Length = T, HeadDim = D, AttendCurrent = options.AttendCurrent ? 1 : 0, Scale = scale,
            });
        }
        else
        {
            launcher.Launch(kernels.Forward16(D, bf16), stream, shape, new ForwardArgs<ushort>
            {
                Q = q, K = k, V = v, O = o, Rem = rem, LogRem = logRem,
                AccSnapshots = snapshots, WriteSnapshots = workspace is null ? 0 : 1, SnapshotTiles = Snapshots.TileCount(T),
                Rows = layout.Rows, Length = T, HeadDim = D, AttendCurrent = options.AttendCurrent ? 1 : 0, Scale = scale,
                AccumulatorScratch = Scratch16(shape, floatsPerElement: 1),
            });
        }
        if (workspace is not null)
            workspace.FilledBy = (shape, scale, options.AttendCurrent, options.ExactProducts, options.Layout);
    }

    private void EnqueueBackward(AcceleratorStream stream, AttentionLayout.Resolved layout,
        ArrayView<float> q, ArrayView<float> k, ArrayView<float> v,
        ArrayView<float> dO, ArrayView<float> dRem, ArrayView<float> logRem,
        StickBreakingWorkspace workspace,
        ArrayView<float> dq, ArrayView<float> dk, ArrayView<float> dv)
    {
        var (_, scale, attendCurrent, exact, _) = workspace.FilledBy!.Value;
        var shape = layout.Shape;
        int D = shape.HeadDim, T = shape.Length;
        var args = new BackwardArgs<float>
        {
            Q = q, K = k, V = v, DO = dO, DRem = dRem, LogRem = logRem,
            AccSnapshots = workspace.AccFor(shape), PrefixSnapshots = workspace.PrefixFor(shape),
            DQ = dq, DK = dk, DV = dv,
            Rows = layout.Rows, Length = T, HeadDim = D, AttendCurrent = attendCurrent ? 1 : 0, SnapshotTiles = Snapshots.TileCount(T), Scale = scale,
        };
        var (query, key) = kernels.Backward(D);
        if ((BackwardPasses & 1) != 0)
            launcher.Launch(query, stream, shape, args);
        if ((BackwardPasses & 2) != 0)
            launcher.Launch(key, stream, shape, args);
    }

    private void EnqueueBackward16(AcceleratorStream stream, AttentionLayout.Resolved layout,
        ArrayView<ushort> q, ArrayView<ushort> k, ArrayView<ushort> v,
        ArrayView<ushort> dO, ArrayView<float> dRem, ArrayView<float> logRem,
        StickBreakingWorkspace workspace,
        ArrayView<ushort> dq, ArrayView<ushort> dk, ArrayView<ushort> dv, bool bf16)
    {
        var (_, scale, attendCurrent, exact, _) = workspace.FilledBy!.Value;
        var shape = layout.Shape;
        int D = shape.HeadDim, T = shape.Length;
        var args = new BackwardArgs<ushort>
        {
            Q = q, K = k, V = v, DO = dO, DRem = dRem, LogRem = logRem,
            AccSnapshots = workspace.AccFor(shape), PrefixSnapshots = workspace.PrefixFor(shape),
            DQ = dq, DK = dk, DV = dv,
            AccumulatorScratch = Scratch16(shape, floatsPerElement: 2),
            Rows = layout.Rows, Length = T, HeadDim = D, AttendCurrent = attendCurrent ? 1 : 0, SnapshotTiles = Snapshots.TileCount(T), Scale = scale,
        };
        var (query, key) = kernels.Backward16(D, bf16, exact);
        if ((BackwardPasses & 1) != 0)
            launcher.Launch(query, stream, shape, args);
        if ((BackwardPasses & 2) != 0)
            launcher.Launch(key, stream, shape, args);
    }

    /// <summary>
    /// The fp32 accumulator a portable 16-bit kernel needs on OpenCL, where it cannot accumulate in shared memory
    /// nor in its 16-bit outputs (docs/design.md): <paramref name="floatsPerElement"/> floats per tensor element, kept
    /// by the instance and grown (after the stream drains) only when a larger shape arrives, so that warm calls allocate
    /// nothing. Empty elsewhere.
    /// </summary>
    private ArrayView<float> Scratch16(AttentionShape shape, int floatsPerElement)
    {
        if (accelerator.AcceleratorType != AcceleratorType.OpenCL)
            return ArrayView<float>.Empty;
        long floats = checked(shape.TensorLength * floatsPerElement);
        if (scratch is null || scratch.Length < floats)
        {
            accelerator.Synchronize();
            scratch?.Dispose();
            scratch = null;
            scratch = accelerator.Allocate1D<float>(floats);
        }
        return scratch.View.SubView(0, floats);
    }

    /// <summary>
    /// A host-level call's output buffer of <paramref name="length"/> elements; zeroed under a custom layout, whose gaps
    /// between rows the kernels never write (the caller gets them back as zeros, not as stale memory).
    /// </summary>
    private MemoryBuffer1D<T, Stride1D.Dense> AllocateOutput<T>(long length, bool custom)
        where T : unmanaged
    {
        var buffer = accelerator.Allocate1D<T>(length);
        if (custom)
            buffer.MemSetToZero(accelerator.DefaultStream);
        return buffer;
    }

    private MemoryBuffer1D<T, Stride1D.Dense> Upload<T>(ReadOnlySpan<T> data)
        where T : unmanaged
    {
        var buffer = accelerator.Allocate1D<T>(data.Length);
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

    private void CheckForward16Grid(AttentionShape shape, bool bf16) =>
        Guards.Grid(accelerator, shape, kernels.TensorCoreForward16(shape.HeadDim, shape.Length, bf16)?.RowsPerGroup ?? kernels.Forward16(shape.HeadDim, bf16).RowsPerGroup, "forward");

    private void CheckBackward16Grid(AttentionShape shape, bool bf16)
    {
        var (query, key) = kernels.Backward16(shape.HeadDim, bf16);
        Guards.Grid(accelerator, shape, Math.Min(query.RowsPerGroup, key.RowsPerGroup), "backward");
    }

    private void CheckForwardGrid(AttentionShape shape) =>
        Guards.Grid(accelerator, shape, ForwardRowsPerGroup(shape.HeadDim), "forward");

    private void CheckBackwardGrid(AttentionShape shape) =>
        Guards.Grid(accelerator, shape, BackwardRowsPerGroup(shape.HeadDim), "backward");

    private void CheckStream(AcceleratorStream stream) => Guards.Stream(accelerator, stream);

    /// <summary>Validates the options (defaults when null) and their layout against <paramref name="shape"/>.</summary>
    private static AttentionLayout.Resolved ResolveLayout([NotNull] ref StickBreakingOptions? options, AttentionShape shape)
    {
        options ??= StickBreakingOptions.Default;
        options.Validate(nameof(options));
        var layout = AttentionLayout.Resolve(options.Layout, shape);
        Guards.Layout(layout, nameof(options));
        return layout;
    }

    /// <summary>
    /// The layout of the training forward whose snapshots <paramref name="workspace"/> holds (the default while it holds
    /// none of this shape: <see cref="CheckTrainingWorkspace"/> refuses that after the views are checked).
    /// </summary>
    private static AttentionLayout.Resolved TrainingLayout(StickBreakingWorkspace? workspace, AttentionShape shape) =>
        AttentionLayout.Resolve(workspace?.FilledBy is { } f && f.Shape == shape ? f.Layout : null, shape);

    /// <summary>A live workspace holding the snapshots of a training forward of <paramref name="shape"/>.</summary>
    private void CheckTrainingWorkspace(StickBreakingWorkspace workspace, AttentionShape shape)
    {
        CheckWorkspace(workspace, shape);
        if (workspace.FilledBy?.Shape != shape)
            throw new ArgumentException(
                $"workspace holds no snapshots of a training forward with shape {shape} " +
                $"(it holds {(workspace.FilledBy is { } f ? $"those of {f.Shape}" : "none")}): run Forward with this workspace first.",
                nameof(workspace));
    }

    private static void CheckHostInputs<T>(AttentionLayout.Resolved layout, ReadOnlySpan<T> q, ReadOnlySpan<T> k, ReadOnlySpan<T> v)
        where T : unmanaged
    {
        Guards.HostTensor(q, layout.QuerySpan(layout.Q), layout.Custom, nameof(q), layout.Shape);
        Guards.HostTensor(k, layout.KeySpan(layout.K), layout.Custom, nameof(k), layout.Shape);
        Guards.HostTensor(v, layout.KeySpan(layout.V), layout.Custom, nameof(v), layout.Shape);
    }

    private void CheckForwardViews<T>(AttentionLayout.Resolved layout, ArrayView<T> q, ArrayView<T> k, ArrayView<T> v,
        ArrayView<T> o, ArrayView<float> rem, ArrayView<float> logRem)
        where T : unmanaged
    {
        var shape = layout.Shape;
        long qSpan = layout.QuerySpan(layout.Q), kSpan = layout.KeySpan(layout.K), vSpan = layout.KeySpan(layout.V), oSpan = layout.QuerySpan(layout.O);
        Guards.ViewTensor(accelerator, q, qSpan, layout.Custom, nameof(q), shape);
        Guards.ViewTensor(accelerator, k, kSpan, layout.Custom, nameof(k), shape);
        Guards.ViewTensor(accelerator, v, vSpan, layout.Custom, nameof(v), shape);
        Guards.ViewTensor(accelerator, o, oSpan, layout.Custom, nameof(o), shape);
        CheckView(rem, shape.RowCount, nameof(rem), shape);
        CheckView(logRem, shape.RowCount, nameof(logRem), shape);
        Guards.Disjoint(
            [Guards.Arg.Of(o, nameof(o), layout.O, shape, shape.Heads, oSpan), Guards.Arg.Of(rem, nameof(rem)), Guards.Arg.Of(logRem, nameof(logRem))],
            [Guards.Arg.Of(q, nameof(q), layout.Q, shape, shape.Heads, qSpan), Guards.Arg.Of(k, nameof(k), layout.K, shape, shape.KeyValueHeads, kSpan),
             Guards.Arg.Of(v, nameof(v), layout.V, shape, shape.KeyValueHeads, vSpan)]);
    }

    private void CheckBackwardViews<T>(AttentionLayout.Resolved layout, ArrayView<T> q, ArrayView<T> k, ArrayView<T> v,
        ArrayView<T> dO, ArrayView<float> dRem, ArrayView<float> logRem, ArrayView<T> dq, ArrayView<T> dk, ArrayView<T> dv)
        where T : unmanaged
    {
        var shape = layout.Shape;
        long qSpan = layout.QuerySpan(layout.Q), kSpan = layout.KeySpan(layout.K), vSpan = layout.KeySpan(layout.V);
        long dOSpan = layout.QuerySpan(layout.DO), dqSpan = layout.QuerySpan(layout.DQ);
        long dkSpan = layout.KeySpan(layout.DK), dvSpan = layout.KeySpan(layout.DV);
        Guards.ViewTensor(accelerator, q, qSpan, layout.Custom, nameof(q), shape);
        Guards.ViewTensor(accelerator, k, kSpan, layout.Custom, nameof(k), shape);
        Guards.ViewTensor(accelerator, v, vSpan, layout.Custom, nameof(v), shape);
        Guards.ViewTensor(accelerator, dO, dOSpan, layout.Custom, nameof(dO), shape);
        CheckView(dRem, shape.RowCount, nameof(dRem), shape);
        CheckView(logRem, shape.RowCount, nameof(logRem), shape);
        Guards.ViewTensor(accelerator, dq, dqSpan, layout.Custom, nameof(dq), shape);
        Guards.ViewTensor(accelerator, dk, dkSpan, layout.Custom, nameof(dk), shape);
        Guards.ViewTensor(accelerator, dv, dvSpan, layout.Custom, nameof(dv), shape);
        int h = shape.Heads, hkv = shape.KeyValueHeads;
        Guards.Disjoint(
            [Guards.Arg.Of(dq, nameof(dq), layout.DQ, shape, h, dqSpan), Guards.Arg.Of(dk, nameof(dk), layout.DK, shape, hkv, dkSpan),
             Guards.Arg.Of(dv, nameof(dv), layout.DV, shape, hkv, dvSpan)],
            [Guards.Arg.Of(q, nameof(q), layout.Q, shape, h, qSpan), Guards.Arg.Of(k, nameof(k), layout.K, shape, hkv, kSpan),
             Guards.Arg.Of(v, nameof(v), layout.V, shape, hkv, vSpan), Guards.Arg.Of(dO, nameof(dO), layout.DO, shape, h, dOSpan),
             Guards.Arg.Of(dRem, nameof(dRem)), Guards.Arg.Of(logRem, nameof(logRem))]);
    }

    /// <summary>
    /// A view and layout the tensor-core kernels can move in <paramref name="bytes"/>-byte pieces; those they read in
    /// 16-byte pieces (q, k, v, dO) also within 32-bit offsets per head over <paramref name="length"/> rows.
    /// </summary>
    private static void TensorCoreAligned<T>(ArrayView<T> view, TensorLayout layout, int bytes, string name, int length)
        where T : unmanaged
    {
        Guards.Aligned(view, bytes, name);
        Guards.AlignedStrides(layout, 2, bytes, name);
        if (bytes == 16)
            Guards.HeadOffsets(layout, length, 2, name);
    }

    /// <summary>Bytes a host-level Forward allocates: q, k, v, o (their layouts' spans) and rem, LogRem.</summary>
    private static long HostForwardBytes(AttentionLayout.Resolved layout, int elementBytes) =>
        checked(elementBytes * (layout.QuerySpan(layout.Q) + layout.KeySpan(layout.K) + layout.KeySpan(layout.V) + layout.QuerySpan(layout.O))
                + 4 * 2 * layout.Shape.RowCount);

    /// <summary>
    /// Bytes a host-level Backward allocates: q, k, v, dO, o, dq, dk, dv (their layouts' spans), dRem, rem, LogRem and a
    /// workspace. A training step at the device level holds the same buffers (the caller's).
    /// </summary>
    private static long HostBackwardBytes(AttentionLayout.Resolved layout, int elementBytes) =>
        checked(HostForwardBytes(layout, elementBytes)
                + elementBytes * (layout.QuerySpan(layout.DO) + layout.QuerySpan(layout.DQ) + layout.KeySpan(layout.DK) + layout.KeySpan(layout.DV))
                + 4 * layout.Shape.RowCount + StickBreakingWorkspace.BytesFor(layout.Shape));

    private void CheckWorkspace(StickBreakingWorkspace workspace, AttentionShape shape) => Guards.Workspace(accelerator, workspace, shape);

    private static void CheckHost(ReadOnlySpan<float> data, long expected, string name, AttentionShape shape) =>
        Guards.Host(data, expected, name, shape);

    private void CheckView(ArrayView<float> view, long expected, string name, AttentionShape shape) =>
        Guards.View(accelerator, view, expected, name, shape);
}
