using System;
using System.Diagnostics;
using ILGPU;
using ILGPU.Runtime;
using StickBreaking.ILGPU.Tests.Reference;

namespace StickBreaking.ILGPU.Bench;

/// <summary>
/// One shape's device buffers on one accelerator, with the forward and backward ready to launch through
/// the device-level API (no host copies and no allocation inside the timed calls).
/// </summary>
internal sealed class DeviceRun : IDisposable
{
    private readonly StickBreakingAttention attention;
    private readonly MemoryBuffer1D<float, Stride1D.Dense> q, k, v, dO, dRem, o, rem, logRem, dq, dk, dv;
    private readonly StickBreakingWorkspace workspace;

    public DeviceRun(StickBreakingAttention attention, AttentionShape shape, AttentionInputs inputs)
    {
        this.attention = attention;
        Shape = shape;
        var acc = attention.Accelerator;
        q = acc.Allocate1D(inputs.Q);
        k = acc.Allocate1D(inputs.K);
        v = acc.Allocate1D(inputs.V);
        dO = acc.Allocate1D(inputs.DO);
        dRem = acc.Allocate1D(inputs.DRem);
        o = acc.Allocate1D<float>(shape.TensorLength);
        rem = acc.Allocate1D<float>(shape.RowCount);
        logRem = acc.Allocate1D<float>(shape.RowCount);
        dq = acc.Allocate1D<float>(shape.TensorLength);
        dk = acc.Allocate1D<float>(shape.TensorLength);
        dv = acc.Allocate1D<float>(shape.TensorLength);
        workspace = new StickBreakingWorkspace(acc, shape);
    }

    public AttentionShape Shape { get; }

    /// <summary>FLOPs of the forward's two matrix products over the causal half: 4 T^2 D / 2 per head.</summary>
    public double ForwardFlops => 4.0 * Shape.Length * Shape.Length * Shape.HeadDim / 2 * Shape.HeadCount;

    /// <summary>The backward counted as 2.5 forwards.</summary>
    public double BackwardFlops => 2.5 * ForwardFlops;

    public void Forward(bool training) =>
        attention.Forward(attention.Accelerator.DefaultStream, Shape, q.View, k.View, v.View, o.View, rem.View, logRem.View,
            null, training ? workspace : null);

    public void Backward() =>
        attention.Backward(attention.Accelerator.DefaultStream, Shape, q.View, k.View, v.View, dO.View, dRem.View,
            logRem.View, workspace, dq.View, dk.View, dv.View);

    public void Synchronize() => attention.Accelerator.DefaultStream.Synchronize();

    public (float[] O, float[] Rem) ForwardResult() => (o.GetAsArray1D(), rem.GetAsArray1D());

    public (float[] DQ, float[] DK, float[] DV) Gradients() => (dq.GetAsArray1D(), dk.GetAsArray1D(), dv.GetAsArray1D());

    /// <summary>Median wall time in ms of <paramref name="action"/> followed by a stream synchronisation.</summary>
    public double MedianMs(Action action, int repetitions)
    {
        action();
        Synchronize();   // warm: compiled and cached
        var times = new double[repetitions];
        for (int i = 0; i < repetitions; i++)
        {
            long start = Stopwatch.GetTimestamp();
            action();
            Synchronize();
            times[i] = Stopwatch.GetElapsedTime(start).TotalMilliseconds;
        }
        Array.Sort(times);
        return times[repetitions / 2];
    }

    public void Dispose()
    {
        foreach (var buffer in new[] { q, k, v, dO, dRem, o, rem, logRem, dq, dk, dv })
            buffer.Dispose();
        workspace.Dispose();
    }
}
