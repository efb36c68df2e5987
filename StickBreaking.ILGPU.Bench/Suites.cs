using System;
using System.Collections.Generic;
using System.Linq;
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

    /// <summary>The backends present on this machine (limited by STICKBREAKING_BACKENDS where set).</summary>
    public static IEnumerable<string> PresentBackends() => Backends.All.Where(b => Backends.Selected?.Contains(b) ?? true).Where(b =>
    {
        var (context, accelerator, _) = Backends.Open(b);
        accelerator?.Dispose();
        context?.Dispose();
        return accelerator is not null;
    }).ToList();

    /// <summary>Backend to time: every one present.</summary>
    [ParamsSource(nameof(PresentBackends))]
    public string Backend { get; set; } = Backends.Cpu;

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
        // CUDA: the shape of the peers' figures; PoCL's CPU device and the CPU accelerator (a simulator, one OS
        // thread per GPU thread): small ones, so that one call stays within what the in-process toolchain allows.
        var shape = accelerator.AcceleratorType switch
        {
            global::ILGPU.Runtime.AcceleratorType.Cuda => new AttentionShape(4, 12, T, 128),
            global::ILGPU.Runtime.AcceleratorType.OpenCL => new AttentionShape(1, 2, T / 8, 64),
            _ => new AttentionShape(1, 2, T / 32, 64),
        };
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

/// <summary>The inference forward (no snapshots): B=4 H=12 D=128 on CUDA; B=1 H=2 D=64 and T/8 on OpenCL, T/32 on the CPU accelerator.</summary>
public class ForwardSuite : SuiteBase
{
    [Benchmark]
    public void Forward()
    {
        Run!.Forward(training: false);
        Run.Synchronize();
    }
}

/// <summary>The backward (dq, dk, dv) after a training forward, shapes as <see cref="ForwardSuite"/>.</summary>
public class BackwardSuite : SuiteBase
{
    [Benchmark]
    public void Backward()
    {
        Run!.Backward();
        Run.Synchronize();
    }
}
