using System;
using ILGPU;
using ILGPU.Runtime;
using NUnit.Framework;
using StickBreaking.ILGPU.Tests.Infrastructure;
using StickBreaking.ILGPU.Tests.Reference;

namespace StickBreaking.ILGPU.Tests;

/// <summary>The device-level API: views on the accelerator, a caller's stream, a reusable workspace.</summary>
public sealed class DeviceLevelTests(string backend) : BackendFixture(backend)
{
    [Test]
    public void MatchesTheHostLevelCallsBitwise()
    {
        var shape = new AttentionShape(2, 1, 70, 20);
        var options = new StickBreakingOptions { AttendCurrent = true, InvTemperature = 0.3f };
        var x = TestInputs.Standard(shape.Batch, shape.Heads, shape.Length, shape.HeadDim, seed: 21);
        using var stream = Accelerator.CreateStream();
        using var workspace = new StickBreakingWorkspace(Accelerator, shape with { Length = 100 });
        using var q = Accelerator.Allocate1D(x.Q);
        using var k = Accelerator.Allocate1D(x.K);
        using var v = Accelerator.Allocate1D(x.V);
        using var dO = Accelerator.Allocate1D(x.DO);
        using var dRem = Accelerator.Allocate1D(x.DRem);
        using var o = Accelerator.Allocate1D<float>(shape.TensorLength);
        using var rem = Accelerator.Allocate1D<float>(shape.RowCount);
        using var logRem = Accelerator.Allocate1D<float>(shape.RowCount);
        using var dq = Accelerator.Allocate1D<float>(shape.TensorLength);
        using var dk = Accelerator.Allocate1D<float>(shape.TensorLength);
        using var dv = Accelerator.Allocate1D<float>(shape.TensorLength);

        Attention.Forward(stream, shape, q.View, k.View, v.View, o.View, rem.View, logRem.View, options, workspace);
        Attention.Backward(stream, shape, q.View, k.View, v.View, dO.View, dRem.View, logRem.View, workspace,
            dq.View, dk.View, dv.View, options);
        stream.Synchronize();

        var hostForward = Attention.Forward(x.Q, x.K, x.V, shape, options);
        var hostBackward = Attention.Backward(x.Q, x.K, x.V, x.DO, x.DRem, shape, options);
        Assert.Multiple(() =>
        {
            Assert.That(o.GetAsArray1D(), Is.EqualTo(hostForward.O).AsCollection, "O");
            Assert.That(logRem.GetAsArray1D(), Is.EqualTo(hostForward.LogRem).AsCollection, "LogRem");
            Assert.That(dq.GetAsArray1D(), Is.EqualTo(hostBackward.DQ).AsCollection, "DQ");
            Assert.That(dk.GetAsArray1D(), Is.EqualTo(hostBackward.DK).AsCollection, "DK");
            Assert.That(dv.GetAsArray1D(), Is.EqualTo(hostBackward.DV).AsCollection, "DV");
        });
    }

    [Test]
    public void InferenceForwardNeedsNoWorkspaceAndMatchesTrainingForward()
    {
        var shape = new AttentionShape(1, 2, 50, 8);
        var x = TestInputs.Standard(shape.Batch, shape.Heads, shape.Length, shape.HeadDim, seed: 2);
        using var workspace = new StickBreakingWorkspace(Accelerator, shape);
        using var q = Accelerator.Allocate1D(x.Q);
        using var k = Accelerator.Allocate1D(x.K);
        using var v = Accelerator.Allocate1D(x.V);
        using var o1 = Accelerator.Allocate1D<float>(shape.TensorLength);
        using var o2 = Accelerator.Allocate1D<float>(shape.TensorLength);
        using var rem = Accelerator.Allocate1D<float>(shape.RowCount);
        using var logRem = Accelerator.Allocate1D<float>(shape.RowCount);
        var stream = Accelerator.DefaultStream;
        Attention.Forward(stream, shape, q.View, k.View, v.View, o1.View, rem.View, logRem.View);
        Attention.Forward(stream, shape, q.View, k.View, v.View, o2.View, rem.View, logRem.View, null, workspace);
        stream.Synchronize();
        Assert.That(o2.GetAsArray1D(), Is.EqualTo(o1.GetAsArray1D()).AsCollection);
    }

    [Test]
    public void WorkspaceSizeIsTwoFloatsPerRowPerKeyTile()
    {
        var shape = new AttentionShape(4, 12, 16384, 128);
        Assert.That(StickBreakingWorkspace.BytesFor(shape), Is.EqualTo(2L * 4 * 4 * 12 * 16384 * (16384 / 32)));
    }
}
