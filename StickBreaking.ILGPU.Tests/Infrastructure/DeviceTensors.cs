using System;
using ILGPU;
using ILGPU.Runtime;
using StickBreaking.ILGPU.Tests.Reference;

namespace StickBreaking.ILGPU.Tests.Infrastructure;

/// <summary>
/// One shape's inputs and outputs on an accelerator, with a workspace, for the device-level API: the tests
/// that call it (device level against host level, the CUDA kernels on the CPU accelerator) and the
/// benchmark's timed runs share this setup.
/// </summary>
internal sealed class DeviceTensors : IDisposable
{
    private readonly MemoryBuffer1D<float, Stride1D.Dense> q, k, v, dO, dRem, o, rem, logRem, dq, dk, dv;

    /// <param name="accelerator">Where the buffers live.</param>
    /// <param name="shape">The sizes B, H, T, D.</param>
    /// <param name="inputs">q, k, v, dO, dRem, uploaded once.</param>
    /// <param name="workspaceCapacity">The workspace's capacity; <paramref name="shape"/> when null.</param>
    public DeviceTensors(Accelerator accelerator, AttentionShape shape, AttentionInputs inputs, AttentionShape? workspaceCapacity = null)
    {
        Shape = shape;
        q = accelerator.Allocate1D(inputs.Q);
        k = accelerator.Allocate1D(inputs.K);
        v = accelerator.Allocate1D(inputs.V);
        dO = accelerator.Allocate1D(inputs.DO);
        dRem = accelerator.Allocate1D(inputs.DRem);
        o = accelerator.Allocate1D<float>(shape.TensorLength);
        rem = accelerator.Allocate1D<float>(shape.RowCount);
        logRem = accelerator.Allocate1D<float>(shape.RowCount);
        dq = accelerator.Allocate1D<float>(shape.TensorLength);
        dk = accelerator.Allocate1D<float>(shape.TensorLength);
        dv = accelerator.Allocate1D<float>(shape.TensorLength);
        Workspace = new StickBreakingWorkspace(accelerator, workspaceCapacity ?? shape);
    }

    public AttentionShape Shape { get; }

    public StickBreakingWorkspace Workspace { get; }

    /// <summary>Enqueues the forward; a training forward (<paramref name="training"/>) fills the workspace.</summary>
    public void Forward(StickBreakingAttention attention, AcceleratorStream stream, StickBreakingOptions? options = null, bool training = true) =>
        attention.Forward(stream, Shape, q.View, k.View, v.View, o.View, rem.View, logRem.View, options, training ? Workspace : null);

    /// <summary>Enqueues the backward of the last training forward (its scale and visibility come from the workspace).</summary>
    public void Backward(StickBreakingAttention attention, AcceleratorStream stream) =>
        attention.Backward(stream, Shape, q.View, k.View, v.View, dO.View, dRem.View, logRem.View, Workspace,
            dq.View, dk.View, dv.View);

    public float[] O => o.GetAsArray1D();

    public float[] Rem => rem.GetAsArray1D();

    public float[] LogRem => logRem.GetAsArray1D();

    public float[] DQ => dq.GetAsArray1D();

    public float[] DK => dk.GetAsArray1D();

    public float[] DV => dv.GetAsArray1D();

    public void Dispose()
    {
        foreach (var buffer in new[] { q, k, v, dO, dRem, o, rem, logRem, dq, dk, dv })
            buffer.Dispose();
        Workspace.Dispose();
    }
}
