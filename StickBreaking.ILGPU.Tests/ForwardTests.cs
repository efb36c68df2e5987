using System;
using System.Collections.Generic;
using NUnit.Framework;
using StickBreaking.ILGPU.Tests.Infrastructure;
using StickBreaking.ILGPU.Tests.Reference;

namespace StickBreaking.ILGPU.Tests;

/// <summary>The forward cases of docs/math.md, Test cases, every one on every backend, against the float64 reference.</summary>
public sealed class ForwardTests(string backend) : BackendFixture(backend)
{
    private static readonly int[] Lengths = [1, 2, 15, 63, 64, 65, 127];
    private static readonly int[] HeadDims = [1, 16, 50, 64, 100, 128];

    public static IEnumerable<TestCaseData> StandardShapes()
    {
        foreach (int t in Lengths)
            foreach (int d in HeadDims)
                foreach (bool attend in new[] { false, true })
                    yield return new TestCaseData(t, d, attend).SetArgDisplayNames($"T={t}", $"D={d}", attend ? "AttendCurrent" : "Strict");
    }

    [TestCaseSource(nameof(StandardShapes))]
    public void Standard(int length, int headDim, bool attendCurrent) =>
        CheckAgainstReference(InputKind.Standard, new AttentionShape(1, 1, length, headDim),
            new StickBreakingOptions { AttendCurrent = attendCurrent });

    [TestCase(false)]
    [TestCase(true)]
    public void SeveralTiles(bool attendCurrent) =>
        CheckAgainstReference(InputKind.Standard, new AttentionShape(1, 1, 300, 64),
            new StickBreakingOptions { AttendCurrent = attendCurrent });

    [TestCase(false)]
    [TestCase(true)]
    public void LongRange(bool attendCurrent)
    {
        var output = CheckAgainstReference(InputKind.LongRange, new AttentionShape(1, 2, 300, 32),
            new StickBreakingOptions { AttendCurrent = attendCurrent });
        // The stick must really survive across many tiles for this case to mean anything.
        Assert.That(output.Rem[^1], Is.GreaterThan(0.2f));
    }

    [TestCase(16)]
    [TestCase(64)]
    public void Saturated(int headDim) =>
        CheckAgainstReference(InputKind.Saturated, new AttentionShape(1, 2, 130, headDim), null);

    [Test]
    public void UsedUpStick()
    {
        var output = CheckAgainstReference(InputKind.UsedUp, new AttentionShape(1, 1, 400, 16), null);
        Assert.That(output.LogRem[^1], Is.LessThan(-200f), "the stick must be used up (LogRem in the hundreds)");
    }

    [Test]
    public void BatchAndHeads() =>
        CheckAgainstReference(InputKind.Standard, new AttentionShape(2, 3, 70, 24), null);

    [TestCase(1.0f)]
    [TestCase(0.1f)]
    public void ExplicitScale(float scale) =>
        CheckAgainstReference(InputKind.Standard, new AttentionShape(1, 2, 65, 50),
            new StickBreakingOptions { InvTemperature = scale });

    [Test]
    public void MaximumHeadDim() =>
        CheckAgainstReference(InputKind.Standard, new AttentionShape(1, 1, 40, AttentionShape.MaxHeadDim), null);

    [Test]
    public void RepeatRunsAreBitwiseIdentical()
    {
        var shape = new AttentionShape(2, 2, 97, 40);
        var inputs = TestInputs.Standard(shape.Batch, shape.Heads, shape.Length, shape.HeadDim, seed: 7);
        var first = Attention.Forward(inputs.Q, inputs.K, inputs.V, shape);
        var second = Attention.Forward(inputs.Q, inputs.K, inputs.V, shape);
        Assert.Multiple(() =>
        {
            Assert.That(second.O, Is.EqualTo(first.O).AsCollection, "O");
            Assert.That(second.Rem, Is.EqualTo(first.Rem).AsCollection, "Rem");
            Assert.That(second.LogRem, Is.EqualTo(first.LogRem).AsCollection, "LogRem");
        });
    }

    [Test]
    public void FirstQuerySeesNothingByDefault()
    {
        var shape = new AttentionShape(1, 1, 5, 8);
        var inputs = TestInputs.Standard(1, 1, 5, 8, seed: 3);
        var output = Attention.Forward(inputs.Q, inputs.K, inputs.V, shape);
        Assert.Multiple(() =>
        {
            Assert.That(output.O[..8], Is.All.EqualTo(0f));
            Assert.That(output.Rem[0], Is.EqualTo(1f));
            Assert.That(output.LogRem[0], Is.EqualTo(0f));
        });
    }

    private StickBreakingOutput CheckAgainstReference(InputKind kind, AttentionShape shape, StickBreakingOptions? options)
    {
        var inputs = TestInputs.Create(kind, shape.Batch, shape.Heads, shape.Length, shape.HeadDim, seed: 11 * shape.Length + shape.HeadDim);
        var output = Attention.Forward(inputs.Q, inputs.K, inputs.V, shape, options);
        double scale = (options ?? StickBreakingOptions.Default).ScaleFor(shape.HeadDim);
        var expected = Float64Reference.Forward(TestInputs.ToDouble(inputs.Q), TestInputs.ToDouble(inputs.K),
            TestInputs.ToDouble(inputs.V), shape.Batch, shape.Heads, shape.Length, shape.HeadDim, scale,
            options?.AttendCurrent ?? false);
        double oError = Errors.MaxAbs(output.O, expected.O);
        double remError = Errors.MaxAbs(output.Rem, expected.Rem);
        double logRemError = 0;
        for (int i = 0; i < expected.LogRem.Length; i++)
            logRemError = Math.Max(logRemError, Math.Abs(output.LogRem[i] - expected.LogRem[i]) / Math.Max(1, Math.Abs(expected.LogRem[i])));
        if (double.IsNaN(logRemError))
            logRemError = double.PositiveInfinity;
        TestContext.Out.WriteLine($"{Backend} {kind} {shape}: max|dO| {oError:E2}, max|dRem| {remError:E2}, LogRem rel {logRemError:E2}");
        Assert.Multiple(() =>
        {
            Assert.That(oError, Is.LessThanOrEqualTo(ForwardTolerance), "max abs error of O");
            Assert.That(remError, Is.LessThanOrEqualTo(ForwardTolerance), "max abs error of Rem");
            Assert.That(logRemError, Is.LessThanOrEqualTo(ForwardTolerance), "error of LogRem relative to max(1, |LogRem|)");
        });
        return output;
    }
}
