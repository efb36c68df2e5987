using System;
using ILGPU;
using ILGPU.Runtime;
using ILGPU.Runtime.CPU;
using NUnit.Framework;
using StickBreaking.ILGPU.Launch;
using StickBreaking.ILGPU.Tests.Infrastructure;
using StickBreaking.ILGPU.Tests.Reference;

namespace StickBreaking.ILGPU.Tests;

/// <summary>
/// The CUDA-only kernels are plain ILGPU code apart from how they are launched: the CPU accelerator runs them
/// too, so that CI (no GPU) checks their logic against the float64 reference on small shapes. On the GPU
/// box the per-backend fixtures run them for real on CUDA.
/// </summary>
[TestFixture]
public sealed class CudaKernelOnCpuTests : CudaCodeOnCpuFixture
{
    [TestCase(InputKind.Standard, 1, 1, 8, false)]
    [TestCase(InputKind.Standard, 1, 65, 128, true)]
    [TestCase(InputKind.Standard, 2, 130, 50, false)]
    [TestCase(InputKind.LongRange, 1, 200, 32, false)]
    [TestCase(InputKind.Saturated, 1, 97, 64, true)]
    [TestCase(InputKind.UsedUp, 1, 160, 16, false)]
    public void ForwardMatchesReference(InputKind kind, int batch, int length, int headDim, bool attendCurrent) =>
        CheckForward(kind, new AttentionShape(batch, 1, length, headDim), attendCurrent);

    /// <summary>
    /// The CUDA backward passes (64 x 64 tiles made of two 32-key snapshot tiles): D = 1 and D = 128, exact and
    /// partial 64-tiles, both visibilities, dRem zero and non-zero, the hard input families.
    /// </summary>
    [TestCase(InputKind.Standard, 1, 2, 128, 1, false, true)]
    [TestCase(InputKind.UsedUp, 1, 1, 140, 128, true, false)]
    [TestCase(InputKind.Saturated, 1, 1, 100, 50, false, true)]
    [TestCase(InputKind.LongRange, 2, 1, 70, 100, true, true)]
    public void GradientsMatchReference(InputKind kind, int batch, int heads, int length, int headDim, bool attendCurrent, bool zeroDRem)
    {
        var shape = new AttentionShape(batch, heads, length, headDim);
        var options = new StickBreakingOptions { AttendCurrent = attendCurrent };
        var x = TestInputs.Create(kind, batch, heads, length, headDim, seed: 5 * length + headDim);
        if (zeroDRem)
            x = x.WithZeroDRem();
        CheckGradients(Attention, Attention, x, shape, options);
    }

    /// <summary>
    /// Both kinds of kernels read and write the same 32-key snapshots: the portable backward runs on a CUDA
    /// forward's workspace, and the CUDA backward on a portable forward's.
    /// </summary>
    [TestCase(false)]
    [TestCase(true)]
    public void SnapshotsAreSharedWithThePortableKernels(bool cudaForward)
    {
        var shape = new AttentionShape(1, 1, 97, 24);
        var options = new StickBreakingOptions { AttendCurrent = cudaForward };
        var x = TestInputs.Create(InputKind.LongRange, 1, 1, shape.Length, shape.HeadDim, seed: 11);
        using var portable = new StickBreakingAttention(Accelerator, null, KernelChoice.Portable);
        CheckGradients(cudaForward ? Attention : portable, cudaForward ? portable : Attention, x, shape, options);
    }

    /// <summary>Which kernels serve the backward is visible: the CUDA passes when asked for here, the portable ones otherwise.</summary>
    [Test]
    public void WhichBackwardRunsIsVisible()
    {
        using var portable = new StickBreakingAttention(Accelerator, null, KernelChoice.Portable);
        Assert.Multiple(() =>
        {
            Assert.That(Attention.UsesCudaKernels && Attention.UsesCudaBackwardKernels, Is.True);
            Assert.That(portable.UsesCudaKernels || portable.UsesCudaBackwardKernels, Is.False);
        });
    }

    /// <summary>The CUDA kernels' row scans assume warps of 32 threads: another warp size is a clear error, not wrong sums.</summary>
    [Test]
    public void OtherWarpSizeIsAClearError()
    {
        var device = new CPUDevice(numThreadsPerWarp: 16, numWarpsPerMultiprocessor: 16, numMultiprocessors: 1);
        using var context16 = Context.Create(b => b.CPU(device).EnableAlgorithms());
        using var accelerator16 = context16.GetCPUDevice(0).CreateAccelerator(context16);
        var ex = Assert.Throws<InvalidOperationException>(
            () => new StickBreakingAttention(accelerator16, null, KernelChoice.Cuda));
        Assert.That(ex!.Message, Does.Contain("warps of 32").And.Contain("warps of 16"));
    }

    private void CheckGradients(StickBreakingAttention forward, StickBreakingAttention backward, AttentionInputs x,
        AttentionShape shape, StickBreakingOptions options)
    {
        using var tensors = new DeviceTensors(Accelerator, shape, x);
        var stream = Accelerator.DefaultStream;
        tensors.Forward(forward, stream, options);
        tensors.Backward(backward, stream);
        stream.Synchronize();

        double scale = options.ScaleFor(shape.HeadDim);
        var expected = Float64Reference.Backward(TestInputs.ToDouble(x.Q), TestInputs.ToDouble(x.K), TestInputs.ToDouble(x.V),
            TestInputs.ToDouble(x.DO), TestInputs.ToDouble(x.DRem),
            shape.Batch, shape.Heads, shape.Length, shape.HeadDim, scale, options.AttendCurrent);
        Assert.Multiple(() =>
        {
            Assert.That(Errors.RelativeRms(tensors.DQ, expected.DQ), Is.LessThanOrEqualTo(2e-5), "DQ");
            Assert.That(Errors.RelativeRms(tensors.DK, expected.DK), Is.LessThanOrEqualTo(2e-5), "DK");
            Assert.That(Errors.RelativeRms(tensors.DV, expected.DV), Is.LessThanOrEqualTo(2e-5), "DV");
        });
    }

    private void CheckForward(InputKind kind, AttentionShape shape, bool attendCurrent)
    {
        var options = new StickBreakingOptions { AttendCurrent = attendCurrent };
        var x = TestInputs.Create(kind, shape.Batch, shape.Heads, shape.Length, shape.HeadDim, seed: 3 * shape.Length + shape.HeadDim);
        double scale = options.ScaleFor(shape.HeadDim);
        double[] q = TestInputs.ToDouble(x.Q), k = TestInputs.ToDouble(x.K), v = TestInputs.ToDouble(x.V);
        var expected = Float64Reference.Forward(q, k, v, shape.Batch, shape.Heads, shape.Length, shape.HeadDim, scale, attendCurrent);
        var output = Attention.Forward(x.Q, x.K, x.V, shape, options);
        Assert.Multiple(() =>
        {
            Assert.That(Errors.MaxAbs(output.O, expected.O), Is.LessThanOrEqualTo(2e-5), "O");
            Assert.That(Errors.MaxAbs(output.Rem, expected.Rem), Is.LessThanOrEqualTo(2e-5), "Rem");
        });
        // A training forward's snapshots feed the backward (the CUDA passes up to D = 128): its gradients must match too.
        var grads = Attention.Backward(x.Q, x.K, x.V, x.DO, x.DRem, shape, options);
        var expectedGrads = Float64Reference.Backward(q, k, v, TestInputs.ToDouble(x.DO), TestInputs.ToDouble(x.DRem),
            shape.Batch, shape.Heads, shape.Length, shape.HeadDim, scale, attendCurrent);
        Assert.Multiple(() =>
        {
            Assert.That(Errors.RelativeRms(grads.DQ, expectedGrads.DQ), Is.LessThanOrEqualTo(2e-5), "DQ");
            Assert.That(Errors.RelativeRms(grads.DK, expectedGrads.DK), Is.LessThanOrEqualTo(2e-5), "DK");
            Assert.That(Errors.RelativeRms(grads.DV, expectedGrads.DV), Is.LessThanOrEqualTo(2e-5), "DV");
        });
    }
}
