using System;
using System.Linq;
using ILGPU;
using ILGPU.Runtime;
using ILGPU.Runtime.CPU;
using NUnit.Framework;
using StickBreaking.ILGPU.Launch;
using StickBreaking.ILGPU.Tests.Infrastructure;
using StickBreaking.ILGPU.Tests.Reference;
using Half = System.Half;
using static StickBreaking.ILGPU.Tests.Rounding;

namespace StickBreaking.ILGPU.Tests;

/// <summary>
/// The public fp16 and bf16 forward (host and device level) on the tensor-core kernel's code: on the CPU accelerator
/// with the mma emulated (the kernels forced to the CUDA family), against float64 computed from the same rounded
/// inputs, within twice the error of rounding the exact o to the storage type (docs/math.md, "16-bit storage") or
/// 1.5 units in the last place at |o|max where that floor happens to be small; rem and LogRem within 2e-5. The
/// device level must give the host level's bits, and views the kernel cannot read are refused.
/// </summary>
public sealed class Forward16ApiTests : CudaCodeOnCpuFixture
{
    [TestCase(true, 70, 64, false)]
    [TestCase(false, 70, 128, true)]
    [TestCase(true, 33, 128, true)]
    public void HostLevelMatchesFloat64OnRoundedInputs(bool bf16, int length, int headDim, bool attendCurrent)
    {
        Assert.That(Attention.UsesTensorCores, Is.True);
        CheckAgainstFloat64(Attention, bf16, InputKind.Standard, new AttentionShape(1, 2, length, headDim), attendCurrent);
    }

    /// <summary>
    /// The host-level 16-bit forward of <paramref name="attention"/> against float64 on the same rounded inputs: o within
    /// max(2 x the rounding floor, 1.5 ulp at |o|max), rem and LogRem within 2e-5 (plus 1e-6 |LogRem| where the stick
    /// is used up: LogRem in the hundreds is an fp32 sum of hundreds of terms).
    /// </summary>
    internal static void CheckAgainstFloat64(StickBreakingAttention Attention, bool bf16, InputKind kind, AttentionShape shape, bool attendCurrent)
    {
        int b = shape.Batch, h = shape.Heads, length = shape.Length, headDim = shape.HeadDim;
        var x = TestInputs.Create(kind, b, h, length, headDim, seed: 5);
        var options = new StickBreakingOptions { AttendCurrent = attendCurrent };
        double[] q = Rounded(x.Q, bf16), k = Rounded(x.K, bf16), v = Rounded(x.V, bf16);
        var expected = Float64Reference.Forward(q, k, v, b, h, length, headDim, 1.0 / Math.Sqrt(headDim), attendCurrent);
        float[] o, rem, logRem;
        if (bf16)
        {
            var y = Attention.Forward(x.Q.Select(f => (BFloat16)f).ToArray(), x.K.Select(f => (BFloat16)f).ToArray(),
                x.V.Select(f => (BFloat16)f).ToArray(), shape, options);
            (o, rem, logRem) = (y.O.Select(h => (float)h).ToArray(), y.Rem, y.LogRem);
        }
        else
        {
            var y = Attention.Forward(x.Q.Select(f => (Half)f).ToArray(), x.K.Select(f => (Half)f).ToArray(),
                x.V.Select(f => (Half)f).ToArray(), shape, options);
            (o, rem, logRem) = (y.O.Select(h => (float)h).ToArray(), y.Rem, y.LogRem);
        }
        double floor = expected.O.Max(e => Math.Abs(RoundTrip(e, bf16) - e));
        double ulp = Math.Pow(2, Math.Floor(Math.Log2(expected.O.Max(Math.Abs))) - (bf16 ? 7 : 10));
        double oError = Errors.MaxAbs(o, expected.O);
        double logRemTolerance = 2e-5 + 1e-6 * expected.LogRem.Max(Math.Abs);
        TestContext.Out.WriteLine($"{(bf16 ? "bf16" : "fp16")} {kind} {shape}: o {oError:E2} ({oError / floor:F2} x floor), " +
            $"rem {Errors.MaxAbs(rem, expected.Rem):E2}");
        Assert.Multiple(() =>
        {
            Assert.That(oError, Is.LessThanOrEqualTo(Math.Max(2 * floor, 1.5 * ulp)), "o");
            Assert.That(Errors.MaxAbs(rem, expected.Rem), Is.LessThanOrEqualTo(2e-5), "rem");
            Assert.That(Errors.MaxAbs(logRem, expected.LogRem), Is.LessThanOrEqualTo(logRemTolerance), "LogRem");
        });
    }

    [Test]
    public void DeviceLevelGivesTheHostLevelBits()
    {
        var shape = new AttentionShape(1, 1, 40, 64);
        var x = TestInputs.Create(InputKind.Standard, 1, 1, 40, 64, seed: 8);
        var q = x.Q.Select(f => (BFloat16)f).ToArray();
        var k = x.K.Select(f => (BFloat16)f).ToArray();
        var v = x.V.Select(f => (BFloat16)f).ToArray();
        var host = Attention.Forward(q, k, v, shape);
        var acc = Accelerator;
        using var qb = acc.Allocate1D(q);
        using var kb = acc.Allocate1D(k);
        using var vb = acc.Allocate1D(v);
        using var ob = acc.Allocate1D<BFloat16>(q.Length);
        using var rem = acc.Allocate1D<float>(shape.RowCount);
        using var logRem = acc.Allocate1D<float>(shape.RowCount);
        Attention.Forward(acc.DefaultStream, shape, qb.View, kb.View, vb.View, ob.View, rem.View, logRem.View);
        acc.Synchronize();
        Assert.Multiple(() =>
        {
            Assert.That(ob.GetAsArray1D().Select(b => b.Bits), Is.EqualTo(host.O.Select(b => b.Bits)));
            Assert.That(rem.GetAsArray1D(), Is.EqualTo(host.Rem));
            Assert.That(logRem.GetAsArray1D(), Is.EqualTo(host.LogRem));
        });
    }

    [Test]
    public void AMisalignedViewIsRefusedNamingIt()
    {
        var shape = new AttentionShape(1, 1, 8, 64);
        var acc = Accelerator;
        using var big = acc.Allocate1D<Half>(shape.TensorLength + 4);
        using var ok = acc.Allocate1D<Half>(shape.TensorLength);
        using var o = acc.Allocate1D<Half>(shape.TensorLength);
        using var rows = acc.Allocate1D<float>(2 * shape.RowCount);
        var misaligned = big.View.SubView(1, shape.TensorLength);   // starts at byte 2
        var ex = Assert.Throws<ArgumentException>(() => Attention.Forward(acc.DefaultStream, shape, misaligned, ok.View, ok.View,
            o.View, rows.View.SubView(0, shape.RowCount), rows.View.SubView(shape.RowCount, shape.RowCount)));
        Assert.That(ex!.ParamName, Is.EqualTo("q"));
    }
}

/// <summary>
/// The public fp16 and bf16 forward on every backend: the tensor-core kernel where it serves (CUDA, D = 64 and 128),
/// the portable fp16/bf16 kernels elsewhere (every D, the CPU accelerator and OpenCL), each against float64 on the
/// same rounded inputs (<see cref="Forward16ApiTests.CheckAgainstFloat64"/>), including saturated logits and a
/// used-up stick.
/// </summary>
public sealed class Forward16BackendTests(string backend) : BackendFixture(backend)
{
    [TestCase(true, InputKind.Standard, 65, 50, false)]
    [TestCase(false, InputKind.Standard, 65, 64, true)]
    [TestCase(true, InputKind.Saturated, 40, 64, false)]
    [TestCase(false, InputKind.UsedUp, 130, 16, true)]
    [TestCase(true, InputKind.UsedUp, 100, 128, false)]
    public void MatchesFloat64OnRoundedInputs(bool bf16, InputKind kind, int length, int headDim, bool attendCurrent) =>
        Forward16ApiTests.CheckAgainstFloat64(Attention, bf16, kind, new AttentionShape(1, 2, length, headDim), attendCurrent);

    /// <summary>
    /// CUDA only: a length past <see cref="KernelSet.TwoWarpgroupsFromLength"/> at D = 128, where an SM 9.0 device takes the
    /// Hopper plan with two warpgroups a group (elsewhere the kernel the shorter cases take), its last block partly past T.
    /// </summary>
    [TestCase(true, false)]
    [TestCase(false, true)]
    public void MatchesFloat64PastTheTwoWarpgroupLength(bool bf16, bool attendCurrent)
    {
        if (Backend != Backends.Cuda)
            Assert.Ignore("CUDA only (the length selects a CUDA plan; the float64 reference and the portable kernels at this length cost CI minutes)");
        Forward16ApiTests.CheckAgainstFloat64(Attention, bf16, InputKind.Standard,
            new AttentionShape(1, 2, KernelSet.TwoWarpgroupsFromLength + 37, 128), attendCurrent);
    }
}
