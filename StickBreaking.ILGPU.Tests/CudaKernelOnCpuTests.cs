using ILGPU;
using ILGPU.Runtime;
using ILGPU.Runtime.CPU;
using NUnit.Framework;
using StickBreaking.ILGPU.Tests.Infrastructure;
using StickBreaking.ILGPU.Tests.Reference;

namespace StickBreaking.ILGPU.Tests;

/// <summary>
/// The CUDA-only kernels are plain ILGPU code apart from how they are launched: the CPU accelerator runs them
/// too, so that CI (no GPU) checks their logic against the float64 reference on small shapes. On the GPU
/// box the per-backend fixtures run them for real on CUDA.
/// </summary>
[TestFixture]
public sealed class CudaKernelOnCpuTests
{
    private Context context = null!;
    private Accelerator accelerator = null!;
    private StickBreakingAttention attention = null!;

    [OneTimeSetUp]
    public void Open()
    {
        context = Context.Create(b => b.CPU(CPUDeviceKind.Nvidia).EnableAlgorithms());
        accelerator = context.GetCPUDevice(0).CreateAccelerator(context);
        attention = new StickBreakingAttention(accelerator, null, StickBreakingAttention.KernelChoice.Cuda);
    }

    [OneTimeTearDown]
    public void Close()
    {
        attention.Dispose();
        accelerator.Dispose();
        context.Dispose();
    }

    [TestCase(InputKind.Standard, 1, 1, 8, false)]
    [TestCase(InputKind.Standard, 1, 65, 128, true)]
    [TestCase(InputKind.Standard, 2, 130, 50, false)]
    [TestCase(InputKind.LongRange, 1, 200, 32, false)]
    [TestCase(InputKind.Saturated, 1, 97, 64, true)]
    [TestCase(InputKind.UsedUp, 1, 160, 16, false)]
    public void ForwardMatchesReference(InputKind kind, int batch, int length, int headDim, bool attendCurrent) =>
        CheckForward(kind, new AttentionShape(batch, 1, length, headDim), attendCurrent);

    private void CheckForward(InputKind kind, AttentionShape shape, bool attendCurrent)
    {
        var options = new StickBreakingOptions { AttendCurrent = attendCurrent };
        var x = TestInputs.Create(kind, shape.Batch, shape.Heads, shape.Length, shape.HeadDim, seed: 3 * shape.Length + shape.HeadDim);
        double scale = options.ScaleFor(shape.HeadDim);
        double[] q = TestInputs.ToDouble(x.Q), k = TestInputs.ToDouble(x.K), v = TestInputs.ToDouble(x.V);
        var expected = Float64Reference.Forward(q, k, v, shape.Batch, shape.Heads, shape.Length, shape.HeadDim, scale, attendCurrent);
        var output = attention.Forward(x.Q, x.K, x.V, shape, options);
        Assert.Multiple(() =>
        {
            Assert.That(Errors.MaxAbs(output.O, expected.O), Is.LessThanOrEqualTo(2e-5), "O");
            Assert.That(Errors.MaxAbs(output.Rem, expected.Rem), Is.LessThanOrEqualTo(2e-5), "Rem");
        });
        // A training forward's snapshots feed the (portable) backward: its gradients must match too.
        var grads = attention.Backward(x.Q, x.K, x.V, x.DO, x.DRem, shape, options);
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
