using System;
using NUnit.Framework;
using StickBreaking.ILGPU.Tests.Infrastructure;
using StickBreaking.ILGPU.Tests.Reference;

namespace StickBreaking.ILGPU.Tests;

/// <summary>
/// The accuracy aim of docs/math.md, Accuracy, at its own scale, T = 4096 and D = 128: max abs error of o and rem at or below 1e-5,
/// relative RMS error of dq, dk, dv at or below 1e-5, against float64. Runs on CUDA only: the CPU accelerator
/// (a simulator) and PoCL would take many minutes at this length; the other tests cover them at smaller T.
/// </summary>
public sealed class SpecScaleTests(string backend) : BackendFixture(backend)
{
    private const double SpecAim = 1e-5;

    [TestCase(InputKind.Standard)]
    [TestCase(InputKind.LongRange)]
    public void AccuracyAtT4096D128(InputKind kind)
    {
        if (Backend != Backends.Cuda)
            Assert.Ignore($"T = 4096 runs on CUDA only; {Backend} is covered at smaller T by the other fixtures.");
        var shape = new AttentionShape(1, 1, 4096, 128);
        var x = TestInputs.Create(kind, 1, 1, shape.Length, shape.HeadDim, seed: 4096);
        double scale = StickBreakingOptions.Default.ScaleFor(shape.HeadDim);
        double[] q = TestInputs.ToDouble(x.Q), k = TestInputs.ToDouble(x.K), v = TestInputs.ToDouble(x.V);
        var output = Attention.Forward(x.Q, x.K, x.V, shape);
        var grads = Attention.Backward(x.Q, x.K, x.V, x.DO, x.DRem, shape);
        var expected = Float64Reference.Forward(q, k, v, 1, 1, shape.Length, shape.HeadDim, scale, false);
        var expectedGrads = Float64Reference.Backward(q, k, v, TestInputs.ToDouble(x.DO), TestInputs.ToDouble(x.DRem),
            1, 1, shape.Length, shape.HeadDim, scale, false);
        double o = Errors.MaxAbs(output.O, expected.O), rem = Errors.MaxAbs(output.Rem, expected.Rem);
        double dq = Errors.RelativeRms(grads.DQ, expectedGrads.DQ), dk = Errors.RelativeRms(grads.DK, expectedGrads.DK),
            dv = Errors.RelativeRms(grads.DV, expectedGrads.DV);
        TestContext.Out.WriteLine($"{Backend} {kind} {shape}: max|dO| {o:E2}, max|dRem| {rem:E2}; rel RMS dq {dq:E2}, dk {dk:E2}, dv {dv:E2}");
        Assert.Multiple(() =>
        {
            Assert.That(o, Is.LessThanOrEqualTo(SpecAim), "O");
            Assert.That(rem, Is.LessThanOrEqualTo(SpecAim), "Rem");
            Assert.That(dq, Is.LessThanOrEqualTo(SpecAim), "dq");
            Assert.That(dk, Is.LessThanOrEqualTo(SpecAim), "dk");
            Assert.That(dv, Is.LessThanOrEqualTo(SpecAim), "dv");
        });
    }
}
