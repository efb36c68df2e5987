using System.Collections.Generic;
using NUnit.Framework;
using StickBreaking.ILGPU.Tests.Infrastructure;
using StickBreaking.ILGPU.Tests.Reference;

namespace StickBreaking.ILGPU.Tests;

/// <summary>The gradient cases of docs/math.md, Test cases, every one on every backend, against the float64 reference.</summary>
public sealed class BackwardTests(string backend) : BackendFixture(backend)
{
    private static readonly int[] Lengths = [1, 2, 15, 63, 64, 65, 127];
    private static readonly int[] HeadDims = [1, 16, 50, 64, 100, 128];

    public static IEnumerable<TestCaseData> StandardShapes()
    {
        // Every length with every head dimension; visibility and dRem alternate so that each occurs with
        // every length and every head dimension without running the full product.
        int n = 0;
        foreach (int t in Lengths)
            foreach (int d in HeadDims)
            {
                bool attend = n % 2 == 0, zeroDRem = n / 2 % 2 == 0;
                n++;
                yield return new TestCaseData(t, d, attend, zeroDRem)
                    .SetArgDisplayNames($"T={t}", $"D={d}", attend ? "AttendCurrent" : "Strict", zeroDRem ? "dRem=0" : "dRem");
            }
    }

    [TestCaseSource(nameof(StandardShapes))]
    public void Standard(int length, int headDim, bool attendCurrent, bool zeroDRem) =>
        CheckAgainstReference(InputKind.Standard, new AttentionShape(1, 1, length, headDim),
            new StickBreakingOptions { AttendCurrent = attendCurrent }, zeroDRem);

    [TestCase(false, false)]
    [TestCase(true, true)]
    public void SeveralTiles(bool attendCurrent, bool zeroDRem) =>
        CheckAgainstReference(InputKind.Standard, new AttentionShape(1, 1, 300, 64),
            new StickBreakingOptions { AttendCurrent = attendCurrent }, zeroDRem);

    [TestCase(false)]
    [TestCase(true)]
    public void LongRange(bool attendCurrent) =>
        CheckAgainstReference(InputKind.LongRange, new AttentionShape(1, 2, 300, 32),
            new StickBreakingOptions { AttendCurrent = attendCurrent }, zeroDRem: false);

    [TestCase(16, false)]
    [TestCase(64, true)]
    public void Saturated(int headDim, bool zeroDRem) =>
        CheckAgainstReference(InputKind.Saturated, new AttentionShape(1, 2, 130, headDim), null, zeroDRem);

    [TestCase(false)]
    [TestCase(true)]
    public void UsedUpStick(bool zeroDRem) =>
        CheckAgainstReference(InputKind.UsedUp, new AttentionShape(1, 1, 400, 16), null, zeroDRem);

    [Test]
    public void BatchAndHeads() =>
        CheckAgainstReference(InputKind.Standard, new AttentionShape(2, 3, 70, 24), null, zeroDRem: false);

    [TestCase(1.0f)]
    [TestCase(0.1f)]
    public void ExplicitScale(float scale) =>
        CheckAgainstReference(InputKind.Standard, new AttentionShape(1, 2, 65, 50),
            new StickBreakingOptions { InvTemperature = scale }, zeroDRem: false);

    [Test]
    public void MaximumHeadDim() =>
        CheckAgainstReference(InputKind.Standard, new AttentionShape(1, 1, 40, AttentionShape.MaxHeadDim), null, zeroDRem: false);

    [Test]
    public void RepeatRunsAreBitwiseIdentical()
    {
        var shape = new AttentionShape(2, 2, 97, 40);
        var x = TestInputs.Standard(shape.Batch, shape.Heads, shape.Length, shape.HeadDim, seed: 5);
        var first = Attention.Backward(x.Q, x.K, x.V, x.DO, x.DRem, shape);
        var second = Attention.Backward(x.Q, x.K, x.V, x.DO, x.DRem, shape);
        Assert.Multiple(() =>
        {
            Assert.That(second.DQ, Is.EqualTo(first.DQ).AsCollection, "DQ");
            Assert.That(second.DK, Is.EqualTo(first.DK).AsCollection, "DK");
            Assert.That(second.DV, Is.EqualTo(first.DV).AsCollection, "DV");
        });
    }

    private void CheckAgainstReference(InputKind kind, AttentionShape shape, StickBreakingOptions? options, bool zeroDRem)
    {
        var x = TestInputs.Create(kind, shape.Batch, shape.Heads, shape.Length, shape.HeadDim, seed: 13 * shape.Length + shape.HeadDim);
        if (zeroDRem)
            x = x.WithZeroDRem();
        var grads = Attention.Backward(x.Q, x.K, x.V, x.DO, x.DRem, shape, options);
        double scale = (options ?? StickBreakingOptions.Default).ScaleFor(shape.HeadDim);
        var expected = Float64Reference.Backward(TestInputs.ToDouble(x.Q), TestInputs.ToDouble(x.K), TestInputs.ToDouble(x.V),
            TestInputs.ToDouble(x.DO), TestInputs.ToDouble(x.DRem), shape.Batch, shape.Heads, shape.Length, shape.HeadDim,
            scale, options?.AttendCurrent ?? false);
        double dq = Errors.RelativeRms(grads.DQ, expected.DQ);
        double dk = Errors.RelativeRms(grads.DK, expected.DK);
        double dv = Errors.RelativeRms(grads.DV, expected.DV);
        TestContext.Out.WriteLine($"{Backend} {kind} {shape} dRem{(zeroDRem ? "=0" : "")}: rel RMS dq {dq:E2}, dk {dk:E2}, dv {dv:E2}");
        Assert.Multiple(() =>
        {
            Assert.That(dq, Is.LessThanOrEqualTo(GradientTolerance), "relative RMS error of dq");
            Assert.That(dk, Is.LessThanOrEqualTo(GradientTolerance), "relative RMS error of dk");
            Assert.That(dv, Is.LessThanOrEqualTo(GradientTolerance), "relative RMS error of dv");
        });
    }
}
