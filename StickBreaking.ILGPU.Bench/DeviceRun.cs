using System;
using System.Diagnostics;
using StickBreaking.ILGPU.Tests.Infrastructure;
using StickBreaking.ILGPU.Tests.Reference;

namespace StickBreaking.ILGPU.Bench;

/// <summary>
/// One shape's device buffers on one accelerator (the tests' <see cref="DeviceTensors"/>), with the forward and
/// backward ready to launch through the device-level API (no host copies and no allocation inside the timed calls).
/// </summary>
internal sealed class DeviceRun : IDisposable
{
    private readonly StickBreakingAttention attention;
    private readonly DeviceTensors tensors;

    public DeviceRun(StickBreakingAttention attention, AttentionShape shape, AttentionInputs inputs)
    {
        this.attention = attention;
        tensors = new DeviceTensors(attention.Accelerator, shape, inputs);
    }

    public AttentionShape Shape => tensors.Shape;

    /// <summary>FLOPs of the forward's two matrix products over the causal half: 4 T^2 D / 2 per head.</summary>
    public double ForwardFlops => 4.0 * Shape.Length * Shape.Length * Shape.HeadDim / 2 * Shape.HeadCount;

    /// <summary>The backward counted as 2.5 forwards.</summary>
    public double BackwardFlops => 2.5 * ForwardFlops;

    public void Forward(bool training) => tensors.Forward(attention, attention.Accelerator.DefaultStream, training: training);

    public void Backward() => tensors.Backward(attention, attention.Accelerator.DefaultStream);

    public void Synchronize() => attention.Accelerator.DefaultStream.Synchronize();

    public (float[] O, float[] Rem) ForwardResult() => (tensors.O, tensors.Rem);

    public (float[] DQ, float[] DK, float[] DV) Gradients() => (tensors.DQ, tensors.DK, tensors.DV);

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

    public void Dispose() => tensors.Dispose();
}
