using System;
using ILGPU;
using ILGPU.Runtime;
using ILGPU.Runtime.CPU;
using NUnit.Framework;
using StickBreaking.ILGPU.Tests.Infrastructure;
using StickBreaking.ILGPU.Tests.Reference;

namespace StickBreaking.ILGPU.Tests;

/// <summary>
/// The bad inputs of docs/math.md, Test cases: each a clear exception naming the argument, and the accelerator still usable
/// afterwards (every test ends with a correct call).
/// </summary>
public sealed class BadInputTests(string backend) : BackendFixture(backend)
{
    private static readonly AttentionShape Shape = new(1, 2, 9, 4);
    private AttentionInputs inputs = null!;

    [SetUp]
    public void MakeInputs() => inputs = TestInputs.Standard(Shape.Batch, Shape.Heads, Shape.Length, Shape.HeadDim, seed: 1);

    [TearDown]
    public void AcceleratorStillUsable()
    {
        var output = Attention.Forward(inputs.Q, inputs.K, inputs.V, Shape);
        var expected = Float64Reference.Forward(TestInputs.ToDouble(inputs.Q), TestInputs.ToDouble(inputs.K),
            TestInputs.ToDouble(inputs.V), Shape.Batch, Shape.Heads, Shape.Length, Shape.HeadDim, 0.5, false);
        Assert.That(Errors.MaxAbs(output.O, expected.O), Is.LessThanOrEqualTo(ForwardTolerance), "a call after the bad one");
    }

    [TestCase("q")]
    [TestCase("k")]
    [TestCase("v")]
    public void MismatchedLengthNamesTheArgument(string name)
    {
        float[] shortOne = new float[Shape.TensorLength - 1];
        var ex = Assert.Throws<ArgumentException>(() => Attention.Forward(
            name == "q" ? shortOne : inputs.Q, name == "k" ? shortOne : inputs.K, name == "v" ? shortOne : inputs.V, Shape));
        Assert.That(ex!.ParamName, Is.EqualTo(name));
        Assert.That(ex.Message, Does.Contain($"{Shape.TensorLength}"));
    }

    [TestCase("dO")]
    [TestCase("dRem")]
    public void MismatchedGradientLengthNamesTheArgument(string name)
    {
        var ex = Assert.Throws<ArgumentException>(() => Attention.Backward(inputs.Q, inputs.K, inputs.V,
            name == "dO" ? new float[3] : inputs.DO, name == "dRem" ? new float[Shape.RowCount + 1] : inputs.DRem, Shape));
        Assert.That(ex!.ParamName, Is.EqualTo(name));
    }

    [TestCase(0, 1, 9, 4, "Batch")]
    [TestCase(1, -2, 9, 4, "Heads")]
    [TestCase(1, 1, 0, 4, "Length")]
    [TestCase(1, 1, 9, 0, "HeadDim")]
    [TestCase(1, 1, 9, -1, "HeadDim")]
    [TestCase(1, 1, 9, AttentionShape.MaxHeadDim + 1, "HeadDim")]
    public void BadShapeNamesTheField(int b, int h, int t, int d, string field)
    {
        var shape = new AttentionShape(b, h, t, d);
        var ex = Assert.Throws<ArgumentOutOfRangeException>(() => Attention.Forward(inputs.Q, inputs.K, inputs.V, shape));
        Assert.That(ex!.ParamName, Is.EqualTo("shape"));
        Assert.That(ex.Message, Does.Contain(field));
    }

    [TestCase(float.NaN)]
    [TestCase(float.PositiveInfinity)]
    public void NonFiniteScaleNamesOptions(float scale)
    {
        var ex = Assert.Throws<ArgumentOutOfRangeException>(() =>
            Attention.Forward(inputs.Q, inputs.K, inputs.V, Shape, new StickBreakingOptions { InvTemperature = scale }));
        Assert.That(ex!.ParamName, Is.EqualTo("options"));
        Assert.That(ex.Message, Does.Contain("InvTemperature"));
    }

    [Test]
    public void ViewOfAnotherAcceleratorNamesTheArgument()
    {
        using var otherContext = Context.Create(b => b.CPU(CPUDeviceKind.Nvidia).EnableAlgorithms());
        using var other = otherContext.GetCPUDevice(0).CreateAccelerator(otherContext);
        using var foreign = other.Allocate1D<float>(Shape.TensorLength);
        using var q = Accelerator.Allocate1D(inputs.Q);
        using var o = Accelerator.Allocate1D<float>(Shape.TensorLength);
        using var rem = Accelerator.Allocate1D<float>(Shape.RowCount);
        using var logRem = Accelerator.Allocate1D<float>(Shape.RowCount);
        var ex = Assert.Throws<ArgumentException>(() => Attention.Forward(Accelerator.DefaultStream, Shape,
            q.View, foreign.View, q.View, o.View, rem.View, logRem.View));
        Assert.That(ex!.ParamName, Is.EqualTo("k"));
        Assert.That(ex.Message, Does.Contain("accelerator"));
    }

    [Test]
    public void StreamOfAnotherAcceleratorIsRefused()
    {
        using var otherContext = Context.Create(b => b.CPU(CPUDeviceKind.Nvidia).EnableAlgorithms());
        using var other = otherContext.GetCPUDevice(0).CreateAccelerator(otherContext);
        using var q = Accelerator.Allocate1D(inputs.Q);
        using var o = Accelerator.Allocate1D<float>(Shape.TensorLength);
        using var rem = Accelerator.Allocate1D<float>(Shape.RowCount);
        var ex = Assert.Throws<ArgumentException>(() => Attention.Forward(other.DefaultStream, Shape,
            q.View, q.View, q.View, o.View, rem.View, rem.View));
        Assert.That(ex!.ParamName, Is.EqualTo("stream"));
    }

    [Test]
    public void DefaultViewNamesTheArgument()
    {
        using var q = Accelerator.Allocate1D(inputs.Q);
        using var rem = Accelerator.Allocate1D<float>(Shape.RowCount);
        var ex = Assert.Throws<ArgumentException>(() => Attention.Forward(Accelerator.DefaultStream, Shape,
            q.View, q.View, q.View, default, rem.View, rem.View));
        Assert.That(ex!.ParamName, Is.EqualTo("o"));
    }

    [Test]
    public void BackwardWithoutATrainingForwardIsRefused()
    {
        using var workspace = new StickBreakingWorkspace(Accelerator, Shape);
        using var x = Accelerator.Allocate1D(inputs.Q);
        using var rows = Accelerator.Allocate1D<float>(Shape.RowCount);
        using var g = Accelerator.Allocate1D<float>(3 * Shape.TensorLength);   // dq, dk, dv: outputs may not overlap
        var ex = Assert.Throws<ArgumentException>(() => Attention.Backward(Accelerator.DefaultStream, Shape,
            x.View, x.View, x.View, x.View, rows.View, rows.View, workspace,
            g.View.SubView(0, Shape.TensorLength), g.View.SubView(Shape.TensorLength, Shape.TensorLength),
            g.View.SubView(2 * Shape.TensorLength, Shape.TensorLength)));
        Assert.That(ex!.ParamName, Is.EqualTo("workspace"));
        Assert.That(ex.Message, Does.Contain("Forward"));
    }

    [Test]
    public void TooSmallWorkspaceIsRefused()
    {
        using var workspace = new StickBreakingWorkspace(Accelerator, Shape with { Length = 3 });
        using var x = Accelerator.Allocate1D(inputs.Q);
        using var o = Accelerator.Allocate1D<float>(Shape.TensorLength);
        using var rem = Accelerator.Allocate1D<float>(Shape.RowCount);
        using var logRem = Accelerator.Allocate1D<float>(Shape.RowCount);
        var ex = Assert.Throws<ArgumentException>(() => Attention.Forward(Accelerator.DefaultStream, Shape,
            x.View, x.View, x.View, o.View, rem.View, logRem.View, null, workspace));
        Assert.That(ex!.ParamName, Is.EqualTo("workspace"));
    }
}
