using System;
using BenchmarkDotNet.Attributes;
using StickBreaking.ILGPU.Tests.Infrastructure;
using StickBreaking.ILGPU.Tests.Reference;

namespace StickBreaking.ILGPU.Bench;

/// <summary>Shared set-up of the BenchmarkDotNet suites: one accelerator, one shape, device buffers.</summary>
public abstract class SuiteBase
{
    private global::ILGPU.Context? context;
    private global::ILGPU.Runtime.Accelerator? accelerator;
    private StickBreakingAttention? attention;
    private protected DeviceRun? Run;

    /// <summary>Backend to time; an absent one fails the set-up with the reason.</summary>
    [Params(Backends.Cuda)]
    public string Backend { get; set; } = Backends.Cuda;

    /// <summary>Sequence length.</summary>
    [Params(1024, 4096)]
    public int T { get; set; }

    [GlobalSetup]
    public void Setup()
    {
        (context, accelerator, string reason) = Backends.Open(Backend);
        if (accelerator is null)
            throw new InvalidOperationException($"{Backend}: {reason}");
        attention = new StickBreakingAttention(accelerator);
        var shape = Backend == Backends.Cpu ? new AttentionShape(1, 2, Math.Min(T, 256), 64) : new AttentionShape(4, 12, T, 128);
        Run = new DeviceRun(attention, shape, TestInputs.Standard(shape.Batch, shape.Heads, shape.Length, shape.HeadDim, seed: 1));
        Run.Forward(training: true);
        Run.Synchronize();
    }

    [GlobalCleanup]
    public void Cleanup()
    {
        Run?.Dispose();
        attention?.Dispose();
        accelerator?.Dispose();
        context?.Dispose();
    }
}

/// <summary>The inference forward (no snapshots), B=4 H=12 D=128 on GPUs.</summary>
public class ForwardSuite : SuiteBase
{
    [Benchmark]
    public void Forward()
    {
        Run!.Forward(training: false);
        Run.Synchronize();
    }
}

/// <summary>The backward (dq, dk, dv) after a training forward, B=4 H=12 D=128 on GPUs.</summary>
public class BackwardSuite : SuiteBase
{
    [Benchmark]
    public void Backward()
    {
        Run!.Backward();
        Run.Synchronize();
    }
}
