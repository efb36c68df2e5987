using System;
using ILGPU;
using ILGPU.Runtime;
using ILGPU.Runtime.CPU;
using NUnit.Framework;
using StickBreaking.ILGPU.Tests.Infrastructure;
using StickBreaking.ILGPU.Tests.Reference;

namespace StickBreaking.ILGPU.Tests;

/// <summary>
/// The library adapts its launch shapes to the accelerator it is given: ILGPU's default CPU device (few threads
/// per group) and small shared memory both still give correct results; a context without EnableAlgorithms()
/// is refused with a clear message on GPU backends.
/// </summary>
[TestFixture]
public sealed class LaunchShapeTests
{
    [Test]
    public void DefaultCpuDeviceWithFewThreadsPerGroup()
    {
        using var context = Context.Create(b => b.CPU().EnableAlgorithms());
        using var accelerator = context.GetCPUDevice(0).CreateAccelerator(context);
        using var attention = new StickBreakingAttention(accelerator);
        Assert.That(attention.GroupSize, Is.LessThanOrEqualTo(accelerator.MaxNumThreadsPerGroup));
        TestContext.Out.WriteLine($"default CPU device: {accelerator.MaxNumThreadsPerGroup} threads per group, group size {attention.GroupSize}");
        CheckForwardAndBackward(attention, new AttentionShape(1, 2, 45, 20));
    }

    [Test]
    public void TwelveThreadsAndSmallSharedMemorySplitTheColumns()
    {
        // 12 threads per group (not a power of two), and 24 KB of shared memory: D = 200 does not fit one group, so every kernel
        // walks column slices (as the dk/dv kernel does on a 48 KB GPU at D = 256).
        var device = new CPUDevice(numThreadsPerWarp: 3, numWarpsPerMultiprocessor: 4, numMultiprocessors: 2);
        using var context = Context.Create(b => b.CPU(device).EnableAlgorithms());
        using var accelerator = context.GetCPUDevice(0).CreateAccelerator(context);
        using var attention = new StickBreakingAttention(accelerator, sharedMemoryLimit: 24 * 1024);
        Assert.That(attention.GroupSize, Is.EqualTo(12));
        CheckForwardAndBackward(attention, new AttentionShape(1, 1, 40, 200));
    }

    [Test]
    public void TooLittleSharedMemoryIsAClearError()
    {
        using var context = Context.Create(b => b.CPU(CPUDeviceKind.Nvidia).EnableAlgorithms());
        using var accelerator = context.GetCPUDevice(0).CreateAccelerator(context);
        using var attention = new StickBreakingAttention(accelerator, sharedMemoryLimit: 4096);
        var x = TestInputs.Standard(1, 1, 8, 8, seed: 1);
        var ex = Assert.Throws<InvalidOperationException>(() => attention.Forward(x.Q, x.K, x.V, new AttentionShape(1, 1, 8, 8)));
        Assert.That(ex!.Message, Does.Contain("shared memory").And.Contain("4096"));
    }

    private static void CheckForwardAndBackward(StickBreakingAttention attention, AttentionShape shape)
    {
        var x = TestInputs.Standard(shape.Batch, shape.Heads, shape.Length, shape.HeadDim, seed: 4);
        double scale = StickBreakingOptions.Default.ScaleFor(shape.HeadDim);
        var output = attention.Forward(x.Q, x.K, x.V, shape);
        var grads = attention.Backward(x.Q, x.K, x.V, x.DO, x.DRem, shape);
        double[] q = TestInputs.ToDouble(x.Q), k = TestInputs.ToDouble(x.K), v = TestInputs.ToDouble(x.V);
        var expected = Float64Reference.Forward(q, k, v, shape.Batch, shape.Heads, shape.Length, shape.HeadDim, scale, false);
        var expectedGrads = Float64Reference.Backward(q, k, v, TestInputs.ToDouble(x.DO), TestInputs.ToDouble(x.DRem),
            shape.Batch, shape.Heads, shape.Length, shape.HeadDim, scale, false);
        Assert.Multiple(() =>
        {
            Assert.That(Errors.MaxAbs(output.O, expected.O), Is.LessThanOrEqualTo(2e-5));
            Assert.That(Errors.MaxAbs(output.Rem, expected.Rem), Is.LessThanOrEqualTo(2e-5));
            Assert.That(Errors.RelativeRms(grads.DQ, expectedGrads.DQ), Is.LessThanOrEqualTo(2e-5));
            Assert.That(Errors.RelativeRms(grads.DK, expectedGrads.DK), Is.LessThanOrEqualTo(2e-5));
            Assert.That(Errors.RelativeRms(grads.DV, expectedGrads.DV), Is.LessThanOrEqualTo(2e-5));
        });
    }
}
