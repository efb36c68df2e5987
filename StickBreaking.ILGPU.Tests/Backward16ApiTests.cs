using System;
using System.Linq;
using ILGPU;
using ILGPU.Runtime;
using NUnit.Framework;
using StickBreaking.ILGPU.Launch;
using StickBreaking.ILGPU.Tests.Infrastructure;
using StickBreaking.ILGPU.Tests.Reference;
using Half = System.Half;
using static StickBreaking.ILGPU.Tests.Rounding;

namespace StickBreaking.ILGPU.Tests;

/// <summary>
/// The public fp16 and bf16 backward (host and device level) on every backend: the kernels the instance picks for the
/// accelerator (the tensor-core passes where they serve, the portable passes elsewhere), against the float64 gradients
/// of the SAME rounded inputs. Tolerance (docs/math.md, "16-bit storage"): the relative RMS of each of dq, dk, dv
/// within twice the floor, the relative RMS of rounding the exact gradient to the storage type, which no 16-bit output
/// can beat. Repeat calls are bitwise identical; the device level gives the host level's bits; misuse names the argument.
/// </summary>
public sealed class Backward16ApiTests(string backend) : BackendFixture(backend)
{
    [TestCase(true, InputKind.Standard, 65, 64, false, false)]
    [TestCase(false, InputKind.Standard, 65, 128, true, false)]
    [TestCase(true, InputKind.Standard, 40, 50, true, true)]
    [TestCase(false, InputKind.Standard, 97, 64, false, true)]
    [TestCase(true, InputKind.Saturated, 70, 64, false, false)]
    [TestCase(false, InputKind.Saturated, 70, 128, true, false)]
    [TestCase(true, InputKind.UsedUp, 130, 128, false, false)]
    [TestCase(false, InputKind.UsedUp, 130, 16, true, true)]
    public void MatchesFloat64OnRoundedInputs(bool bf16, InputKind kind, int length, int headDim, bool attendCurrent, bool zeroDRem) =>
        CheckAgainstFloat64(Attention, Backend, bf16, kind, new AttentionShape(1, 2, length, headDim), attendCurrent, zeroDRem);

    /// <summary>
    /// CUDA only: training past <see cref="KernelSet.TwoWarpgroupsFromLength"/> at D = 128, where an SM 9.0 device's forward
    /// (and the snapshots the backward reads) is the Hopper plan with two warpgroups a group.
    /// </summary>
    [Test]
    public void MatchesFloat64PastTheTwoWarpgroupLength()
    {
        if (Backend != Backends.Cuda)
            Assert.Ignore("CUDA only (the length selects a CUDA plan; the float64 reference and the portable kernels at this length cost CI minutes)");
        CheckAgainstFloat64(Attention, Backend, true, InputKind.Standard, new AttentionShape(1, 2, KernelSet.TwoWarpgroupsFromLength + 37, 128),
            attendCurrent: false, zeroDRem: false);
    }

    /// <summary>
    /// The host-level 16-bit backward of <paramref name="attention"/> against float64 on the same rounded inputs: each
    /// gradient's relative RMS error within twice its rounding floor; returns the gradients (as floats) for further checks.
    /// </summary>
    internal static (float[] DQ, float[] DK, float[] DV) CheckAgainstFloat64(StickBreakingAttention attention, string backend,
        bool bf16, InputKind kind, AttentionShape shape, bool attendCurrent, bool zeroDRem, bool exactProducts = false,
        double maxRatio = 2)
    {
        int b = shape.Batch, h = shape.Heads, length = shape.Length, headDim = shape.HeadDim;
        var x = TestInputs.Create(kind, b, h, length, headDim, seed: 13 * length + headDim);
        float[] dRem = zeroDRem ? new float[x.DRem.Length] : x.DRem;
        var options = new StickBreakingOptions { AttendCurrent = attendCurrent, ExactProducts = exactProducts };
        var exact = Float64Reference.Backward(Rounded(x.Q, bf16), Rounded(x.K, bf16), Rounded(x.V, bf16), Rounded(x.DO, bf16),
            TestInputs.ToDouble(dRem), b, h, length, headDim, 1.0 / Math.Sqrt(headDim), attendCurrent);
        var (dq, dk, dv) = Run(attention, bf16, x, dRem, shape, options);
        var (dqError, dqFloor) = Error(dq, exact.DQ, bf16);
        var (dkError, dkFloor) = Error(dk, exact.DK, bf16);
        var (dvError, dvFloor) = Error(dv, exact.DV, bf16);
        TestContext.Out.WriteLine($"{backend} {(bf16 ? "bf16" : "fp16")} {kind} {shape}{(zeroDRem ? " dRem=0" : "")}: relative RMS " +
            $"dq {dqError:E2} ({dqError / dqFloor:F2} x floor), dk {dkError:E2} ({dkError / dkFloor:F2} x), dv {dvError:E2} ({dvError / dvFloor:F2} x)");
        Assert.Multiple(() =>
        {
            Assert.That(dqError, Is.LessThanOrEqualTo(maxRatio * dqFloor), "dq");
            Assert.That(dkError, Is.LessThanOrEqualTo(maxRatio * dkFloor), "dk");
            Assert.That(dvError, Is.LessThanOrEqualTo(maxRatio * dvFloor), "dv");
        });
        return (dq, dk, dv);
    }

    [TestCase(true, 130, 64)]
    [TestCase(false, 100, 128)]
    public void RepeatCallsAreBitwiseIdentical(bool bf16, int length, int headDim)
    {
        var shape = new AttentionShape(1, 2, length, headDim);
        var x = TestInputs.Create(InputKind.LongRange, 1, 2, length, headDim, seed: 29);
        var first = Run(Attention, bf16, x, x.DRem, shape, null);
        var second = Run(Attention, bf16, x, x.DRem, shape, null);
        Assert.Multiple(() =>
        {
            Assert.That(Bits(second.DQ), Is.EqualTo(Bits(first.DQ)), "dq");
            Assert.That(Bits(second.DK), Is.EqualTo(Bits(first.DK)), "dk");
            Assert.That(Bits(second.DV), Is.EqualTo(Bits(first.DV)), "dv");
        });
    }

    [TestCase(true)]
    [TestCase(false)]
    public void DeviceLevelGivesTheHostLevelBits(bool bf16)
    {
        var shape = new AttentionShape(1, 2, 70, 64);
        var x = TestInputs.Create(InputKind.Standard, 1, 2, 70, 64, seed: 31);
        var options = new StickBreakingOptions { AttendCurrent = true };
        var host = Run(Attention, bf16, x, x.DRem, shape, options);
        var device = bf16
            ? DeviceRun(ToBf16(x.Q), ToBf16(x.K), ToBf16(x.V), ToBf16(x.DO), x.DRem, shape, options, b => (float)b)
            : DeviceRun(ToHalf(x.Q), ToHalf(x.K), ToHalf(x.V), ToHalf(x.DO), x.DRem, shape, options, h => (float)h);
        Assert.Multiple(() =>
        {
            Assert.That(Bits(device.DQ), Is.EqualTo(Bits(host.DQ)), "dq");
            Assert.That(Bits(device.DK), Is.EqualTo(Bits(host.DK)), "dk");
            Assert.That(Bits(device.DV), Is.EqualTo(Bits(host.DV)), "dv");
        });
    }

    [Test]
    public void AWorkspaceWithoutForwardSnapshotsIsRefusedNamingIt()
    {
        var shape = new AttentionShape(1, 1, 16, 64);
        var acc = Accelerator;
        using var tensors = acc.Allocate1D<BFloat16>(7 * shape.TensorLength);
        using var rows = acc.Allocate1D<float>(2 * shape.RowCount);
        using var workspace = new StickBreakingWorkspace(acc, shape);
        ArrayView<BFloat16> At(int i) => tensors.View.SubView(i * shape.TensorLength, shape.TensorLength);
        var ex = Assert.Throws<ArgumentException>(() => Attention.Backward(acc.DefaultStream, shape, At(0), At(1), At(2), At(3),
            rows.View.SubView(0, shape.RowCount), rows.View.SubView(shape.RowCount, shape.RowCount), workspace, At(4), At(5), At(6)));
        Assert.That(ex!.ParamName, Is.EqualTo("workspace"));
    }

    [Test]
    public void AShortGradientViewIsRefusedNamingIt()
    {
        var shape = new AttentionShape(1, 1, 16, 64);
        var acc = Accelerator;
        using var tensors = acc.Allocate1D<Half>(7 * shape.TensorLength);
        using var rows = acc.Allocate1D<float>(3 * shape.RowCount);
        using var workspace = new StickBreakingWorkspace(acc, shape);
        ArrayView<Half> At(int i) => tensors.View.SubView(i * shape.TensorLength, shape.TensorLength);
        Attention.Forward(acc.DefaultStream, shape, At(0), At(1), At(2), At(3), rows.View.SubView(0, shape.RowCount),
            rows.View.SubView(shape.RowCount, shape.RowCount), workspace: workspace);
        var ex = Assert.Throws<ArgumentException>(() => Attention.Backward(acc.DefaultStream, shape, At(0), At(1), At(2), At(3),
            rows.View.SubView(2 * shape.RowCount, shape.RowCount), rows.View.SubView(shape.RowCount, shape.RowCount), workspace,
            At(4), At(5), At(6).SubView(0, shape.TensorLength - 1)));
        Assert.That(ex!.ParamName, Is.EqualTo("dv"));
    }

    /// <summary>The host-level backward on the inputs rounded to the storage type; the gradients as floats.</summary>
    private static (float[] DQ, float[] DK, float[] DV) Run(StickBreakingAttention attention, bool bf16, AttentionInputs x, float[] dRem,
        AttentionShape shape, StickBreakingOptions? options)
    {
        if (bf16)
        {
            var g = attention.Backward(ToBf16(x.Q), ToBf16(x.K), ToBf16(x.V), ToBf16(x.DO), dRem, shape, options);
            return (Widen(g.DQ), Widen(g.DK), Widen(g.DV));
        }
        var y = attention.Backward(ToHalf(x.Q), ToHalf(x.K), ToHalf(x.V), ToHalf(x.DO), dRem, shape, options);
        return (Widen(y.DQ), Widen(y.DK), Widen(y.DV));
    }

    /// <summary>The device-level training forward then backward on one stream, one workspace.</summary>
    private (float[] DQ, float[] DK, float[] DV) DeviceRun<T>(T[] q, T[] k, T[] v, T[] dO, float[] dRem, AttentionShape shape,
        StickBreakingOptions options, Func<T, float> toFloat)
        where T : unmanaged
    {
        var acc = Accelerator;
        using var qb = acc.Allocate1D(q);
        using var kb = acc.Allocate1D(k);
        using var vb = acc.Allocate1D(v);
        using var dOb = acc.Allocate1D(dO);
        using var dRemb = acc.Allocate1D(dRem);
        using var o = acc.Allocate1D<T>(q.Length);
        using var rem = acc.Allocate1D<float>(shape.RowCount);
        using var logRem = acc.Allocate1D<float>(shape.RowCount);
        using var dq = acc.Allocate1D<T>(q.Length);
        using var dk = acc.Allocate1D<T>(q.Length);
        using var dv = acc.Allocate1D<T>(q.Length);
        using var workspace = new StickBreakingWorkspace(acc, shape);
        var stream = acc.DefaultStream;
        if (typeof(T) == typeof(BFloat16))
        {
            Attention.Forward(stream, shape, As<BFloat16>(qb), As<BFloat16>(kb), As<BFloat16>(vb),
                As<BFloat16>(o), rem.View, logRem.View, options, workspace);
            Attention.Backward(stream, shape, As<BFloat16>(qb), As<BFloat16>(kb), As<BFloat16>(vb),
                As<BFloat16>(dOb), dRemb.View, logRem.View, workspace, As<BFloat16>(dq), As<BFloat16>(dk),
                As<BFloat16>(dv));
        }
        else
        {
            Attention.Forward(stream, shape, As<Half>(qb), As<Half>(kb), As<Half>(vb),
                As<Half>(o), rem.View, logRem.View, options, workspace);
            Attention.Backward(stream, shape, As<Half>(qb), As<Half>(kb), As<Half>(vb),
                As<Half>(dOb), dRemb.View, logRem.View, workspace, As<Half>(dq), As<Half>(dk),
                As<Half>(dv));
        }
        stream.Synchronize();
        return (dq.GetAsArray1D().Select(toFloat).ToArray(), dk.GetAsArray1D().Select(toFloat).ToArray(),
            dv.GetAsArray1D().Select(toFloat).ToArray());
    }

    private static ArrayView<TTo> As<TTo>(MemoryBuffer buffer)
        where TTo : unmanaged => ((MemoryBuffer1D<TTo, Stride1D.Dense>)buffer).View;

    private static int[] Bits(float[] x) => x.Select(BitConverter.SingleToInt32Bits).ToArray();

    /// <summary>Relative RMS error of <paramref name="actual"/>, and the floor: that of the exact gradient rounded to the storage type.</summary>
    private static (double Error, double Floor) Error(float[] actual, double[] exact, bool bf16) =>
        (Errors.RelativeRms(actual, exact), Errors.RelativeRms(exact.Select(e => (float)RoundTrip(e, bf16)).ToArray(), exact));
}

/// <summary>
/// The 16-bit backward through the public API on the tensor-core passes' code, run by the CPU accelerator with the mma
/// emulated: <see cref="StickBreakingOptions.ExactProducts"/> (split weights) at the rounding floor (1.1x allowed for
/// the order of the fp32 sums). The default products are checked by the kernels' own tests and, through this API, by
/// <see cref="Backward16ApiTests"/> on CUDA.
/// </summary>
public sealed class TensorCoreBackward16ApiTests : CudaCodeOnCpuFixture
{
    [TestCase(false, 33, 64, true, true)]
    public void MatchesFloat64OnRoundedInputs(bool bf16, int length, int headDim, bool attendCurrent, bool exactProducts)
    {
        Assert.That(Attention.UsesTensorCoreBackward, Is.True, "the tensor-core passes run");
        Backward16ApiTests.CheckAgainstFloat64(Attention, "Cpu (tensor-core code)", bf16, InputKind.Standard,
            new AttentionShape(1, 1, length, headDim), attendCurrent, zeroDRem: false, exactProducts, exactProducts ? 1.1 : 2);
    }
}
