using System;
using System.Threading;
using System.Threading.Tasks;
using ILGPU;
using ILGPU.Runtime;
using ILGPU.Runtime.CPU;
using NUnit.Framework;
using StickBreaking.ILGPU.Tests.Infrastructure;
using StickBreaking.ILGPU.Tests.Reference;

namespace StickBreaking.ILGPU.Tests;

/// <summary>
/// Misuse that cannot end the process, in process: outputs overlapping inputs or each other, aliased inputs
/// (legal), accelerators of one name told apart, and a concurrent call on one instance. Every test ends with a
/// correct call on the same instance.
/// </summary>
public sealed class MisuseTests(string backend) : BackendFixture(backend)
{
    private static readonly AttentionShape Shape = MisuseCases.Shape;
    private AttentionInputs x = null!;

    [SetUp]
    public void MakeInputs() => x = TestInputs.Standard(Shape.Batch, Shape.Heads, Shape.Length, Shape.HeadDim, seed: 1);

    [TearDown]
    public void InstanceStillUsable() => Assert.That(MisuseCases.CorrectCall(Accelerator, Attention), Is.EqualTo("ok"));

    private long N => Shape.TensorLength;
    private long R => Shape.RowCount;

    [TestCase("o=q", "o")]
    [TestCase("o=v", "o")]
    [TestCase("o overlaps k by one float", "o")]
    [TestCase("rem=logRem", "logRem")]
    [TestCase("logRem inside o", "logRem")]
    public void ForwardOutputOverlapIsRefused(string layout, string param)
    {
        // One buffer holds everything; each layout puts one output over another view.
        using var all = Accelerator.Allocate1D<float>(4 * N + 2 * R);
        ArrayView<float> q = all.View.SubView(0, N), k = all.View.SubView(N, N), v = all.View.SubView(2 * N, N),
            o = all.View.SubView(3 * N, N), rem = all.View.SubView(4 * N, R), logRem = all.View.SubView(4 * N + R, R);
        switch (layout)
        {
            case "o=q": o = q; break;
            case "o=v": o = v; break;
            case "o overlaps k by one float": o = all.View.SubView(2 * N - 1, N); break;
            case "rem=logRem": logRem = rem; break;
            case "logRem inside o": logRem = o.SubView(1, R); break;
        }
        var ex = Assert.Throws<ArgumentException>(() => Attention.Forward(Accelerator.DefaultStream, Shape, q, k, v, o, rem, logRem));
        Assert.That(ex!.ParamName, Is.EqualTo(param));
        Assert.That(ex.Message, Does.Contain("overlaps"));
    }

    [TestCase("dq=dO", "dq")]
    [TestCase("dk=dq", "dk")]
    [TestCase("dv=logRem-sized slice of q", "dv")]
    public void BackwardOutputOverlapIsRefused(string layout, string param)
    {
        using var inputs = Accelerator.Allocate1D<float>(4 * N + 2 * R);
        using var outputs = Accelerator.Allocate1D<float>(3 * N);
        using var workspace = new StickBreakingWorkspace(Accelerator, Shape);
        ArrayView<float> q = inputs.View.SubView(0, N), dO = inputs.View.SubView(3 * N, N), dRem = inputs.View.SubView(4 * N, R),
            logRem = inputs.View.SubView(4 * N + R, R);
        ArrayView<float> dq = outputs.View.SubView(0, N), dk = outputs.View.SubView(N, N), dv = outputs.View.SubView(2 * N, N);
        switch (layout)
        {
            case "dq=dO": dq = dO; break;
            case "dk=dq": dk = dq; break;
            case "dv=logRem-sized slice of q": dv = inputs.View.SubView(1, N); break;
        }
        var ex = Assert.Throws<ArgumentException>(() => Attention.Backward(Accelerator.DefaultStream, Shape,
            q, q, q, dO, dRem, logRem, workspace, dq, dk, dv));
        Assert.That(ex!.ParamName, Is.EqualTo(param));
        Assert.That(ex.Message, Does.Contain("overlaps"));
    }

    /// <summary>Disjoint views of one buffer are legal, and so are aliased inputs (q = k = v): both match the host level bitwise.</summary>
    [Test]
    public void DisjointSubViewsAndAliasedInputsAreAccepted()
    {
        using var all = Accelerator.Allocate1D<float>(2 * N + 3 * R + 1);
        all.View.SubView(1, N).CopyFromCPU(x.Q);
        ArrayView<float> q = all.View.SubView(1, N), o = all.View.SubView(N + 1, N),
            rem = all.View.SubView(2 * N + 1, R), logRem = all.View.SubView(2 * N + R + 1, R);
        Attention.Forward(Accelerator.DefaultStream, Shape, q, q, q, o, rem, logRem);
        Accelerator.DefaultStream.Synchronize();
        var host = Attention.Forward(x.Q, x.Q, x.Q, Shape);
        Assert.That(((ArrayView1D<float, Stride1D.Dense>)o).GetAsArray1D(), Is.EqualTo(host.O).AsCollection);
        Assert.That(((ArrayView1D<float, Stride1D.Dense>)logRem).GetAsArray1D(), Is.EqualTo(host.LogRem).AsCollection);
    }

    /// <summary>Two CPU accelerators are both named 'CPUAccelerator': the message tells them apart by number.</summary>
    [Test]
    public void AcceleratorsOfOneNameAreToldApart()
    {
        using var otherContext = Context.Create(b => b.CPU(CPUDeviceKind.Nvidia).EnableAlgorithms());
        using var other = otherContext.GetCPUDevice(0).CreateAccelerator(otherContext);
        using var foreign = other.Allocate1D<float>(N);
        using var q = Accelerator.Allocate1D(x.Q);
        using var o = Accelerator.Allocate1D<float>(N);
        using var rows = Accelerator.Allocate1D<float>(2 * R);
        var ex = Assert.Throws<ArgumentException>(() => Attention.Forward(Accelerator.DefaultStream, Shape,
            q.View, q.View, foreign.View, o.View, rows.View.SubView(0, R), rows.View.SubView(R, R)));
        Assert.That(ex!.ParamName, Is.EqualTo("v"));
        var numbers = System.Text.RegularExpressions.Regex.Matches(ex.Message, @"accelerator #(\d+)");
        Assert.That(numbers, Has.Count.EqualTo(2), ex.Message);
        Assert.That(numbers[0].Groups[1].Value, Is.Not.EqualTo(numbers[1].Groups[1].Value), ex.Message);
    }

    /// <summary>A refused call leaves the instance free: a call from another thread afterwards is admitted.</summary>
    [Test]
    public void RefusedCallLeavesTheInstanceFreeForOtherThreads()
    {
        Assert.Throws<ArgumentException>(() => Attention.Forward(x.Q, x.K, Array.Empty<float>(), Shape));
        Assert.Throws<ArgumentOutOfRangeException>(() => Attention.Forward(x.Q, x.K, x.V, Shape with { HeadDim = 0 }));
        string result = Task.Run(() => MisuseCases.CorrectCall(Accelerator, Attention)).Result;
        Assert.That(result, Is.EqualTo("ok"));
    }

    /// <summary>
    /// An instance is not thread-safe: while one call runs (held inside by the test hook), a call from another
    /// thread is refused with an <see cref="InvalidOperationException"/>, and the first call completes correctly.
    /// </summary>
    [Test]
    public void ConcurrentCallIsRefusedAndTheFirstCompletes()
    {
        using var entered = new ManualResetEventSlim();
        using var release = new ManualResetEventSlim();
        Attention.Calls.OnEntered = () =>
        {
            entered.Set();
            release.Wait(TimeSpan.FromSeconds(60));
        };
        Task<StickBreakingOutput> first;
        try
        {
            first = Task.Run(() => Attention.Forward(x.Q, x.K, x.V, Shape));
            Assert.That(entered.Wait(TimeSpan.FromSeconds(60)), Is.True, "the first call entered");
        }
        finally
        {
            Attention.Calls.OnEntered = null;
        }
        var ex = Assert.Throws<InvalidOperationException>(() => Attention.Forward(x.Q, x.K, x.V, Shape));
        Assert.That(ex!.Message, Does.Contain("not thread-safe"));
        using var rows = Accelerator.Allocate1D<float>(2 * R);
        using var buffers = Accelerator.Allocate1D<float>(2 * N);
        Assert.Throws<InvalidOperationException>(() => Attention.Forward(Accelerator.DefaultStream, Shape,
            buffers.View.SubView(0, N), buffers.View.SubView(0, N), buffers.View.SubView(0, N), buffers.View.SubView(N, N),
            rows.View.SubView(0, R), rows.View.SubView(R, R)), "the device level too");
        release.Set();
        Assert.That(first.Wait(TimeSpan.FromSeconds(60)), Is.True);
        var expected = Attention.Forward(x.Q, x.K, x.V, Shape);   // the instance is free again
        Assert.That(first.Result.O, Is.EqualTo(expected.O).AsCollection, "the first call's result");
    }
}
