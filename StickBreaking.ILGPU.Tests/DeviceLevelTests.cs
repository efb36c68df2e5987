using System;
using ILGPU;
using ILGPU.Runtime;
using NUnit.Framework;
using StickBreaking.ILGPU.Kernels.Common;
using StickBreaking.ILGPU.Kernels.Portable;
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
        using var tensors = new DeviceTensors(Accelerator, shape, x, workspaceCapacity: shape with { Length = 100 });
        tensors.Forward(Attention, stream, options);
        tensors.Backward(Attention, stream);
        stream.Synchronize();

        var hostForward = Attention.Forward(x.Q, x.K, x.V, shape, options);
        var hostBackward = Attention.Backward(x.Q, x.K, x.V, x.DO, x.DRem, shape, options);
        Assert.Multiple(() =>
        {
            Assert.That(tensors.O, Is.EqualTo(hostForward.O).AsCollection, "O");
            Assert.That(tensors.LogRem, Is.EqualTo(hostForward.LogRem).AsCollection, "LogRem");
            Assert.That(tensors.DQ, Is.EqualTo(hostBackward.DQ).AsCollection, "DQ");
            Assert.That(tensors.DK, Is.EqualTo(hostBackward.DK).AsCollection, "DK");
            Assert.That(tensors.DV, Is.EqualTo(hostBackward.DV).AsCollection, "DV");
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

    /// <summary>
    /// The device-level calls allocate nothing of their own once warm: a forward (one kernel launch) and a
    /// backward (two) allocate no more managed memory than launches of empty kernels with the same argument
    /// structs (ILGPU's own launch cost: a task holding the arguments per launch on the CPU accelerator).
    /// </summary>
    [Test]
    public void DeviceLevelCallsAllocateNothingOfTheirOwn()
    {
        var shape = new AttentionShape(1, 1, 40, 16);
        using var x = Accelerator.Allocate1D<float>(shape.TensorLength);
        using var rows = Accelerator.Allocate1D<float>(shape.RowCount);
        using var o = Accelerator.Allocate1D<float>(shape.TensorLength);   // outputs may not overlap inputs or each other
        using var rem = Accelerator.Allocate1D<float>(shape.RowCount);
        using var logRem = Accelerator.Allocate1D<float>(shape.RowCount);
        using var dq = Accelerator.Allocate1D<float>(shape.TensorLength);
        using var dk = Accelerator.Allocate1D<float>(shape.TensorLength);
        using var dv = Accelerator.Allocate1D<float>(shape.TensorLength);
        using var workspace = new StickBreakingWorkspace(Accelerator, shape);
        var stream = Accelerator.DefaultStream;
        var emptyForward = Accelerator.LoadKernel<ForwardArgs<float>>(Empty);
        var emptyBackward = Accelerator.LoadKernel<BackwardArgs<float>>(Empty);
        var config = new KernelConfig(1, 1);
        void Forward() => Attention.Forward(stream, shape, x.View, x.View, x.View, o.View, rem.View, logRem.View, null, workspace);
        void Backward() => Attention.Backward(stream, shape, x.View, x.View, x.View, x.View, rows.View, logRem.View, workspace, dq.View, dk.View, dv.View);
        void LaunchForward() => emptyForward(stream, config, default);
        void LaunchBackward()
        {
            emptyBackward(stream, config, default);
            emptyBackward(stream, config, default);
        }

        const int Calls = 20;
        long forwardLaunch = AllocatedPerCall(LaunchForward, Calls);
        long backwardLaunches = AllocatedPerCall(LaunchBackward, Calls);
        long forward = AllocatedPerCall(Forward, Calls);
        long backward = AllocatedPerCall(Backward, Calls);
        TestContext.Out.WriteLine($"{Backend}: bytes per call: forward {forward} (empty launch {forwardLaunch}), " +
            $"backward {backward} (empty launches {backwardLaunches})");
        Assert.Multiple(() =>
        {
            Assert.That(forward, Is.LessThanOrEqualTo(forwardLaunch), "forward");
            Assert.That(backward, Is.LessThanOrEqualTo(backwardLaunches), "backward");
        });

        long AllocatedPerCall(Action call, int calls)
        {
            for (int i = 0; i < 3; i++)
                call();   // warm: kernels compiled and cached
            stream.Synchronize();
            long before = GC.GetAllocatedBytesForCurrentThread();
            for (int i = 0; i < calls; i++)
                call();
            long after = GC.GetAllocatedBytesForCurrentThread();
            stream.Synchronize();
            return (after - before) / calls;
        }
    }

    private static void Empty(ForwardArgs<float> args)
    {
    }

    private static void Empty(BackwardArgs<float> args)
    {
    }

    [Test]
    public void WorkspaceSizeIsTwoFloatsPerRowPerKeyTile()
    {
        var shape = new AttentionShape(4, 12, 16384, 128);
        Assert.That(StickBreakingWorkspace.BytesFor(shape), Is.EqualTo(2L * 4 * 4 * 12 * 16384 * (16384 / 32)));
    }
}
