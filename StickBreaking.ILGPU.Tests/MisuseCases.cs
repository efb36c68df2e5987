using System;
using ILGPU;
using ILGPU.Runtime;
using StickBreaking.ILGPU.Tests.Infrastructure;
using StickBreaking.ILGPU.Tests.Reference;

namespace StickBreaking.ILGPU.Tests;

/// <summary>
/// Misuse that once ended the process (a disposed workspace: an assertion, exit 134; a view of a disposed
/// buffer: a NullReferenceException on ILGPU's threads) or could: each case is run in a child process by
/// <see cref="MisuseInChildProcessTests"/> and must throw before anything is enqueued.
/// </summary>
internal static class MisuseCases
{
    public static readonly AttentionShape Shape = new(1, 2, 9, 4);

    /// <summary>Case name, the exception it must throw, and the argument it must name.</summary>
    public static readonly (string Name, Type Exception, string Param)[] All =
    [
        ("TrainingForwardWithDisposedWorkspace", typeof(ObjectDisposedException), "workspace"),
        ("BackwardWithDisposedWorkspace", typeof(ObjectDisposedException), "workspace"),
        ("InputViewOfDisposedBuffer", typeof(ObjectDisposedException), "k"),
        ("OutputViewOfDisposedBuffer", typeof(ObjectDisposedException), "o"),
        ("GradientViewOfDisposedBuffer", typeof(ObjectDisposedException), "dv"),
        ("DisposedStream", typeof(ObjectDisposedException), "stream"),
        ("InstanceOnDisposedAccelerator", typeof(ObjectDisposedException), "accelerator"),
        ("WorkspaceOnDisposedAccelerator", typeof(ObjectDisposedException), "accelerator"),
        ("InstanceOnDisposedContext", typeof(ObjectDisposedException), "accelerator"),
    ];

    private static AttentionInputs Inputs => TestInputs.Standard(Shape.Batch, Shape.Heads, Shape.Length, Shape.HeadDim, seed: 1);

    /// <summary>Runs one case; it should throw. Whatever it enqueued is waited for, so a crash shows in this case.</summary>
    public static void Run(string name, string backend, Accelerator accelerator, StickBreakingAttention attention)
    {
        var x = Inputs;
        var stream = accelerator.DefaultStream;
        using var q = accelerator.Allocate1D(x.Q);
        using var k = accelerator.Allocate1D(x.K);
        using var v = accelerator.Allocate1D(x.V);
        using var dO = accelerator.Allocate1D(x.DO);
        using var dRem = accelerator.Allocate1D(x.DRem);
        using var o = accelerator.Allocate1D<float>(Shape.TensorLength);
        using var rem = accelerator.Allocate1D<float>(Shape.RowCount);
        using var logRem = accelerator.Allocate1D<float>(Shape.RowCount);
        using var dq = accelerator.Allocate1D<float>(Shape.TensorLength);
        using var dk = accelerator.Allocate1D<float>(Shape.TensorLength);
        using var dv = accelerator.Allocate1D<float>(Shape.TensorLength);
        using var workspace = new StickBreakingWorkspace(accelerator, Shape);
        // Views taken while their buffers live, as a caller holds them (a buffer's View after Dispose is a default view).
        ArrayView<float> qv = q.View, kv = k.View, vv = v.View, dOv = dO.View, dRemv = dRem.View, ov = o.View, remv = rem.View,
            logRemv = logRem.View, dqv = dq.View, dkv = dk.View, dvv = dv.View;
        void Forward(StickBreakingWorkspace? ws = null) =>
            attention.Forward(stream, Shape, qv, kv, vv, ov, remv, logRemv, null, ws);
        void Backward() =>
            attention.Backward(stream, Shape, qv, kv, vv, dOv, dRemv, logRemv, workspace, dqv, dkv, dvv);
        try
        {
            switch (name)
            {
                case "TrainingForwardWithDisposedWorkspace":
                    workspace.Dispose();
                    Forward(workspace);
                    break;
                case "BackwardWithDisposedWorkspace":
                    Forward(workspace);
                    stream.Synchronize();
                    workspace.Dispose();
                    Backward();
                    break;
                case "InputViewOfDisposedBuffer":
                    k.Dispose();
                    Forward();
                    break;
                case "OutputViewOfDisposedBuffer":
                    o.Dispose();
                    Forward();
                    break;
                case "GradientViewOfDisposedBuffer":
                    Forward(workspace);
                    dv.Dispose();
                    Backward();
                    break;
                case "DisposedStream":
                    var own = accelerator.CreateStream();
                    own.Dispose();
                    attention.Forward(own, Shape, qv, kv, vv, ov, remv, logRemv);
                    break;
                case "InstanceOnDisposedAccelerator":
                case "WorkspaceOnDisposedAccelerator":
                case "InstanceOnDisposedContext":
                    OnDeadAccelerator(name, backend, x);
                    break;
                default:
                    throw new ArgumentOutOfRangeException(nameof(name), name, "unknown case");
            }
        }
        finally
        {
            stream.Synchronize();
        }
    }

    private static void OnDeadAccelerator(string name, string backend, AttentionInputs x)
    {
        var (context, other, reason) = Backends.Open(backend);
        if (other is null)
            throw new InvalidOperationException($"a second {backend} accelerator could not be opened: {reason}");
        using var _ = context;
        using var __ = other;   // disposing twice is harmless; the context case leaves it to this
        using var attention = new StickBreakingAttention(other);
        if (name == "InstanceOnDisposedContext")
            context!.Dispose();
        else
            other.Dispose();
        if (name == "WorkspaceOnDisposedAccelerator")
            using (new StickBreakingWorkspace(other, Shape)) { }
        else
            attention.Forward(x.Q, x.K, x.V, Shape);
    }

    /// <summary>A correct host-level forward on the instance: "ok", or what was wrong.</summary>
    public static string CorrectCall(Accelerator accelerator, StickBreakingAttention attention)
    {
        var x = Inputs;
        var output = attention.Forward(x.Q, x.K, x.V, Shape);
        var expected = Float64Reference.Forward(TestInputs.ToDouble(x.Q), TestInputs.ToDouble(x.K), TestInputs.ToDouble(x.V),
            Shape.Batch, Shape.Heads, Shape.Length, Shape.HeadDim, 0.5, false);
        double error = Errors.MaxAbs(output.O, expected.O);
        return error <= 2e-5 ? "ok" : $"the call after it was wrong: max abs error {error}";
    }
}
