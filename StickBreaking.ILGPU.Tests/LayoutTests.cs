using System;
using System.Linq;
using ILGPU;
using ILGPU.Runtime;
using NUnit.Framework;
using StickBreaking.ILGPU.Tests.Infrastructure;
using StickBreaking.ILGPU.Tests.Reference;
using Half = System.Half;
using static StickBreaking.ILGPU.Tests.Rounding;

namespace StickBreaking.ILGPU.Tests;

/// <summary>How a layout case lays its tensors out (docs/api.md, "Layouts").</summary>
public enum LayoutKind
{
    /// <summary>No layout: contiguous [B, heads, T, D].</summary>
    HeadMajor,
    /// <summary>[B, T, heads, D] everywhere.</summary>
    TokenMajor,
    /// <summary>q, k, v slices of one [B, T, Hq + 2 Hkv, D] buffer; o and dO [B, T, Hq, D].</summary>
    FusedQkv,
    /// <summary>Head-major with gaps after every row, head and sequence (NaN-filled: a kernel that reads a gap poisons its output).</summary>
    Padded,
}

/// <summary>
/// Strided layouts and grouped-query heads through the public API on every backend (the kernels each picks: portable,
/// CUDA fp32 or tensor cores), fp32 / fp16 / bf16, forward and backward, against the float64 reference of the SAME
/// (rounded) inputs: k and v repeated over each group for the forward, dk and dv summed over the group's query heads
/// (docs/math.md, "Layouts and grouped heads"). Tolerances are those of the contiguous tests (fp32: 2e-5; 16-bit:
/// twice the rounding floor, rem and LogRem 2e-5). Gaps between strided rows hold NaN, which must reach no output. A
/// strided call gives the bits of the same call on contiguous copies (the layout changes addresses, not arithmetic).
/// </summary>
public sealed class LayoutTests(string backend) : BackendFixture(backend)
{
    /// <summary>
    /// Each storage type with each layout once and each Hkv in {1, 2, H} once per storage and per layout (a Latin square),
    /// plus the default layout with groups.
    /// </summary>
    private static readonly object[] ForwardCases =
    [
        .. from i in Enumerable.Range(0, 3)
           from j in Enumerable.Range(0, 3)
           select new object[] { (StorageType)i, new[] { LayoutKind.TokenMajor, LayoutKind.FusedQkv, LayoutKind.Padded }[j], new[] { 1, 2, 4 }[(i + j) % 3] },
        new object[] { StorageType.Bf16, LayoutKind.HeadMajor, 1 },
        new object[] { StorageType.Fp32, LayoutKind.HeadMajor, 2 },
    ];

    [TestCaseSource(nameof(ForwardCases))]
    public void ForwardMatchesFloat64(StorageType storage, LayoutKind kind, int kvHeads) =>
        LayoutCheck.Forward(Attention, Backend, storage, kind, new AttentionShape(2, 4, 40, 64) { KeyValueHeads = kvHeads },
            attendCurrent: kvHeads == 2, ForwardTolerance);

    /// <summary>The forward's Latin square shifted (other pairs of layout and Hkv), plus the default layout with groups.</summary>
    private static readonly object[] BackwardCases =
    [
        .. from i in Enumerable.Range(0, 3)
           from j in Enumerable.Range(0, 3)
           select new object[] { (StorageType)i, new[] { LayoutKind.TokenMajor, LayoutKind.FusedQkv, LayoutKind.Padded }[j], new[] { 1, 2, 4 }[(i + 2 * j + 1) % 3] },
        new object[] { StorageType.Bf16, LayoutKind.HeadMajor, 2 },
    ];

    [TestCaseSource(nameof(BackwardCases))]
    public void BackwardMatchesFloat64(StorageType storage, LayoutKind kind, int kvHeads) =>
        LayoutCheck.Backward(Attention, Backend, storage, kind, new AttentionShape(2, 4, 40, 64) { KeyValueHeads = kvHeads },
            attendCurrent: kvHeads != 2, GradientTolerance);

    [TestCase(StorageType.Fp32, 40)]
    [TestCase(StorageType.Bf16, 64)]
    [TestCase(StorageType.Fp16, 128)]
    public void StridedCallsGiveTheContiguousBits(StorageType storage, int headDim) =>
        LayoutCheck.SameBitsAsContiguous(Attention, storage, new AttentionShape(2, 2, 33, headDim));

    [TestCase(StorageType.Fp32)]
    [TestCase(StorageType.Bf16)]
    public void DeviceLevelFusedBuffersGiveTheHostLevelBits(StorageType storage) =>
        LayoutCheck.DeviceFused(Attention, Accelerator, storage, new AttentionShape(2, 4, 50, 64) { KeyValueHeads = 2 });
}

/// <summary>
/// The layout cases on the CUDA fp32 kernels' code run by the CPU accelerator. The tensor-core kernels' layouts are checked
/// on the CPU at kernel level (<see cref="TensorCoreRowsTests"/>, <see cref="TensorCoreBackwardKeyLayoutTests"/>: another
/// fixture here would compile them again, which is most of CI's time), and through this API by <see cref="LayoutTests"/>
/// on CUDA.
/// </summary>
public sealed class CudaCodeLayoutTests : CudaCodeOnCpuFixture
{
    [TestCase(StorageType.Fp32, LayoutKind.FusedQkv, 2)]
    [TestCase(StorageType.Fp32, LayoutKind.Padded, 1)]
    public void ForwardMatchesFloat64(StorageType storage, LayoutKind kind, int kvHeads) =>
        LayoutCheck.Forward(Attention, "Cpu (CUDA code)", storage, kind, new AttentionShape(1, 4, 40, 64) { KeyValueHeads = kvHeads },
            attendCurrent: false, 2e-5);

    [TestCase(StorageType.Fp32, LayoutKind.FusedQkv, 2)]
    [TestCase(StorageType.Fp32, LayoutKind.TokenMajor, 1)]
    public void BackwardMatchesFloat64(StorageType storage, LayoutKind kind, int kvHeads) =>
        LayoutCheck.Backward(Attention, "Cpu (CUDA code)", storage, kind, new AttentionShape(1, 4, 40, 64) { KeyValueHeads = kvHeads },
            attendCurrent: true, 2e-5);
}

/// <summary>Bad layouts and head counts: each an exception naming the argument, before anything runs.</summary>
public sealed class LayoutValidationTests(string backend) : BackendFixture(backend)
{
    private static readonly AttentionShape Shape = new(1, 2, 16, 8);

    [Test]
    public void HeadsThatAreNotAMultipleOfKeyValueHeadsAreRefused()
    {
        var shape = new AttentionShape(1, 3, 16, 8) { KeyValueHeads = 2 };
        var ex = Assert.Throws<ArgumentOutOfRangeException>(() => Attention.Forward(new float[48 * 8], new float[32 * 8], new float[32 * 8], shape));
        Assert.That(ex!.ParamName, Is.EqualTo("shape"));
        Assert.That(ex.Message, Does.Contain("multiple of shape.KeyValueHeads"));
        Assert.Throws<ArgumentOutOfRangeException>(() => new AttentionShape(1, 2, 16, 8) { KeyValueHeads = 0 }.Validate("shape"));
    }

    [Test]
    public void AKeyValueHeadCountIsPartOfTheShape()
    {
        Assert.That(new AttentionShape(1, 4, 16, 8) { KeyValueHeads = 4 }, Is.EqualTo(new AttentionShape(1, 4, 16, 8)));
        Assert.That(new AttentionShape(1, 4, 16, 8) { KeyValueHeads = 2 }, Is.Not.EqualTo(new AttentionShape(1, 4, 16, 8)));
        Assert.That(new AttentionShape(1, 4, 16, 8) { KeyValueHeads = 2 }.KeyValueTensorLength, Is.EqualTo(2 * 16 * 8));
    }

    [Test]
    public void StridesThatOverlapAreRefusedNamingTheEntry()
    {
        var options = new StickBreakingOptions { Layout = new AttentionLayout { Key = new TensorLayout(256, 128, 4) } };
        var ex = Assert.Throws<ArgumentException>(() => Attention.Forward(new float[256], new float[256], new float[256], Shape, options));
        Assert.That(ex!.ParamName, Is.EqualTo("options"));
        Assert.That(ex.Message, Does.Contain("options.Layout.Key"));
        var negative = new StickBreakingOptions { Layout = new AttentionLayout { Value = new TensorLayout(256, -128, 8) } };
        ex = Assert.Throws<ArgumentException>(() => Attention.Forward(new float[256], new float[256], new float[512], Shape, negative));
        Assert.That(ex!.Message, Does.Contain("options.Layout.Value").And.Contain("non-negative"));
    }

    [Test]
    public void StridesThatRunPastTheArrayAreRefusedNamingIt()
    {
        var options = new StickBreakingOptions { Layout = AttentionLayout.TokenMajor(Shape) };
        var ex = Assert.Throws<ArgumentException>(() => Attention.Forward(new float[256], new float[255], new float[256], Shape, options));
        Assert.That(ex!.ParamName, Is.EqualTo("k"));
        Assert.That(ex.Message, Does.Contain("at least 256"));
    }

    [Test]
    public void FusedGradientSlicesAreAcceptedButOverlappingOnesRefused()
    {
        var shape = new AttentionShape(1, 2, 16, 8);
        var options = new StickBreakingOptions { Layout = AttentionLayout.FusedQkv(shape) };
        long fused = shape.Length * 6L * shape.HeadDim, rows = shape.RowCount, plain = shape.TensorLength;
        var acc = Accelerator;
        using var qkv = acc.Allocate1D<float>(fused);
        using var grads = acc.Allocate1D<float>(fused);
        using var other = acc.Allocate1D<float>(2 * plain + 3 * rows);
        qkv.MemSetToZero();
        other.MemSetToZero();
        using var workspace = new StickBreakingWorkspace(acc, shape);
        var stream = acc.DefaultStream;
        ArrayView<float> Slice(MemoryBuffer1D<float, Stride1D.Dense> b, long at) => b.View.SubView(at, fused - at);
        var o = other.View.SubView(0, plain);
        var dO = other.View.SubView(plain, plain);
        var rem = other.View.SubView(2 * plain, rows);
        var logRem = other.View.SubView(2 * plain + rows, rows);
        var dRem = other.View.SubView(2 * plain + 2 * rows, rows);
        Attention.Forward(stream, shape, Slice(qkv, 0), Slice(qkv, 16), Slice(qkv, 32), o, rem, logRem, options, workspace);
        Assert.DoesNotThrow(() => Attention.Backward(stream, shape, Slice(qkv, 0), Slice(qkv, 16), Slice(qkv, 32), dO, dRem, logRem,
            workspace, Slice(grads, 0), Slice(grads, 16), Slice(grads, 32)));
        // dk four elements after dq: rows of the two meet.
        var ex = Assert.Throws<ArgumentException>(() => Attention.Backward(stream, shape, Slice(qkv, 0), Slice(qkv, 16), Slice(qkv, 32),
            dO, dRem, logRem, workspace, Slice(grads, 0), Slice(grads, 4), Slice(grads, 32)));
        Assert.That(ex!.ParamName, Is.EqualTo("dk"));
        Assert.That(ex.Message, Does.Contain("overlaps the output dq"));
        // dq written into q's fused buffer at its own place: refused as an overlap with the input q.
        ex = Assert.Throws<ArgumentException>(() => Attention.Backward(stream, shape, Slice(qkv, 0), Slice(qkv, 16), Slice(qkv, 32),
            dO, dRem, logRem, workspace, Slice(qkv, 0), Slice(grads, 16), Slice(grads, 32)));
        Assert.That(ex!.ParamName, Is.EqualTo("dq"));
        stream.Synchronize();
    }
}

/// <summary>The checks behind the layout tests: packing, the grouped float64 reference, the comparisons.</summary>
internal static class LayoutCheck
{
    /// <summary>The options' layout for a case (null for <see cref="LayoutKind.HeadMajor"/>).</summary>
    public static AttentionLayout? LayoutFor(LayoutKind kind, AttentionShape s) => kind switch
    {
        LayoutKind.HeadMajor => null,
        LayoutKind.TokenMajor => AttentionLayout.TokenMajor(s),
        LayoutKind.FusedQkv => AttentionLayout.FusedQkv(s),
        _ => new AttentionLayout
        {
            Query = Padded(s.Heads, s), Output = Padded(s.Heads, s),
            Key = Padded(s.KeyValueHeads, s), Value = Padded(s.KeyValueHeads, s),
        },
    };

    /// <summary>Head-major with 8 spare elements after each row, 16 after each head, 24 after each sequence (multiples of 8: tensor cores read it).</summary>
    private static TensorLayout Padded(int heads, AttentionShape s)
    {
        long token = s.HeadDim + 8, head = s.Length * token + 16;
        return new TensorLayout(heads * head + 24, head, token);
    }

    /// <summary>Logical [B, heads, T, D] values, rounded to the storage type (what the kernels will read).</summary>
    public static float[] Rounded(float[] x, StorageType storage) => storage == StorageType.Fp32 ? x : Rounding.Round(x, storage);

    /// <summary>Writes logical <paramref name="x"/> ([B, heads, T, D]) into <paramref name="to"/> from <paramref name="at"/> as <paramref name="layout"/> says.</summary>
    public static void Place(float[] x, float[] to, long at, TensorLayout layout, int batch, int heads, int length, int headDim)
    {
        for (int b = 0; b < batch; b++)
            for (int h = 0; h < heads; h++)
                for (int t = 0; t < length; t++)
                    Array.Copy(x, (((long)b * heads + h) * length + t) * headDim,
                        to, at + b * layout.BatchStride + h * layout.HeadStride + t * layout.TokenStride, headDim);
    }

    /// <summary>The logical [B, heads, T, D] tensor that <paramref name="layout"/> places in <paramref name="from"/>.</summary>
    public static float[] Take(float[] from, TensorLayout layout, int batch, int heads, int length, int headDim)
    {
        var x = new float[(long)batch * heads * length * headDim];
        for (int b = 0; b < batch; b++)
            for (int h = 0; h < heads; h++)
                for (int t = 0; t < length; t++)
                    Array.Copy(from, b * layout.BatchStride + h * layout.HeadStride + t * layout.TokenStride,
                        x, (((long)b * heads + h) * length + t) * headDim, headDim);
        return x;
    }

    /// <summary>The case's inputs: q, dO, dRem with Hq heads, k, v with Hkv heads, each rounded to the storage type.</summary>
    public static (float[] Q, float[] K, float[] V, float[] DO, float[] DRem) Inputs(AttentionShape s, StorageType storage, int seed)
    {
        var query = TestInputs.Create(InputKind.Standard, s.Batch, s.Heads, s.Length, s.HeadDim, seed);
        var key = TestInputs.Create(InputKind.Standard, s.Batch, s.KeyValueHeads, s.Length, s.HeadDim, seed + 1);
        return (Rounded(query.Q, storage), Rounded(key.K, storage), Rounded(key.V, storage), Rounded(query.DO, storage), query.DRem);
    }

    /// <summary>k or v of Hkv heads repeated over each group to Hq heads (the reference's grouped-query attention).</summary>
    public static double[] Repeated(float[] x, AttentionShape s)
    {
        int group = s.Heads / s.KeyValueHeads, rows = s.Length * s.HeadDim;
        var y = new double[s.TensorLength];
        for (int b = 0; b < s.Batch; b++)
            for (int h = 0; h < s.Heads; h++)
                for (int i = 0; i < rows; i++)
                    y[((long)b * s.Heads + h) * rows + i] = x[((long)b * s.KeyValueHeads + h / group) * rows + i];
        return y;
    }

    /// <summary>dk or dv of Hq heads summed over each group to Hkv heads.</summary>
    public static double[] Summed(double[] x, AttentionShape s)
    {
        int group = s.Heads / s.KeyValueHeads, rows = s.Length * s.HeadDim;
        var y = new double[s.KeyValueTensorLength];
        for (int b = 0; b < s.Batch; b++)
            for (int h = 0; h < s.Heads; h++)
                for (int i = 0; i < rows; i++)
                    y[((long)b * s.KeyValueHeads + h / group) * rows + i] += x[((long)b * s.Heads + h) * rows + i];
        return y;
    }

    /// <summary>
    /// The inputs packed as the layout says, gaps NaN: for <see cref="LayoutKind.FusedQkv"/> one array holding q, k, v
    /// with their offsets, else one array each (offset 0).
    /// </summary>
    private static (float[] Q, long QAt, float[] K, long KAt, float[] V, long VAt) Pack(AttentionLayout.Resolved r, float[] q, float[] k, float[] v)
    {
        var s = r.Shape;
        if (r.Q == r.K && r.K == r.V && r.Q.TokenStride == (s.Heads + 2L * s.KeyValueHeads) * s.HeadDim)
        {
            var fused = Gaps(r.Q.BatchStride * s.Batch);
            long kAt = (long)s.Heads * s.HeadDim, vAt = kAt + (long)s.KeyValueHeads * s.HeadDim;
            Place(q, fused, 0, r.Q, s.Batch, s.Heads, s.Length, s.HeadDim);
            Place(k, fused, kAt, r.K, s.Batch, s.KeyValueHeads, s.Length, s.HeadDim);
            Place(v, fused, vAt, r.V, s.Batch, s.KeyValueHeads, s.Length, s.HeadDim);
            return (fused, 0, fused, kAt, fused, vAt);
        }
        return (Packed(q, r.Q, r.QuerySpan(r.Q), s.Heads, s), 0, Packed(k, r.K, r.KeySpan(r.K), s.KeyValueHeads, s), 0,
            Packed(v, r.V, r.KeySpan(r.V), s.KeyValueHeads, s), 0);
    }

    private static float[] Packed(float[] x, TensorLayout layout, long span, int heads, AttentionShape s)
    {
        var to = Gaps(span);
        Place(x, to, 0, layout, s.Batch, heads, s.Length, s.HeadDim);
        return to;
    }

    private static float[] Gaps(long length) => Enumerable.Repeat(float.NaN, (int)length).ToArray();

    /// <summary>The host-level forward of a case; o unpacked to logical [B, Hq, T, D] floats.</summary>
    public static (float[] O, float[] Rem, float[] LogRem) RunForward(StickBreakingAttention attention, StorageType storage,
        AttentionShape s, StickBreakingOptions options, float[] q, float[] k, float[] v)
    {
        var r = AttentionLayout.Resolve(options.Layout, s);
        var p = Pack(r, q, k, v);
        float[] o; float[] rem, logRem;
        switch (storage)
        {
            case StorageType.Fp32:
                var f = attention.Forward(p.Q.AsSpan((int)p.QAt), p.K.AsSpan((int)p.KAt), p.V.AsSpan((int)p.VAt), s, options);
                (o, rem, logRem) = (f.O, f.Rem, f.LogRem);
                break;
            case StorageType.Fp16:
                var h = attention.Forward(ToHalf(p.Q).AsSpan((int)p.QAt), ToHalf(p.K).AsSpan((int)p.KAt), ToHalf(p.V).AsSpan((int)p.VAt), s, options);
                (o, rem, logRem) = (h.O.Select(x => (float)x).ToArray(), h.Rem, h.LogRem);
                break;
            default:
                var b = attention.Forward(ToBf16(p.Q).AsSpan((int)p.QAt), ToBf16(p.K).AsSpan((int)p.KAt), ToBf16(p.V).AsSpan((int)p.VAt), s, options);
                (o, rem, logRem) = (b.O.Select(x => (float)x).ToArray(), b.Rem, b.LogRem);
                break;
        }
        return (Take(o, r.O, s.Batch, s.Heads, s.Length, s.HeadDim), rem, logRem);
    }

    /// <summary>The host-level backward of a case; dq, dk, dv unpacked to logical floats.</summary>
    public static (float[] DQ, float[] DK, float[] DV) RunBackward(StickBreakingAttention attention, StorageType storage,
        AttentionShape s, StickBreakingOptions options, float[] q, float[] k, float[] v, float[] dO, float[] dRem)
    {
        var r = AttentionLayout.Resolve(options.Layout, s);
        var p = Pack(r, q, k, v);
        var dOPacked = Packed(dO, r.DO, r.QuerySpan(r.DO), s.Heads, s);
        float[] dq, dk, dv;
        switch (storage)
        {
            case StorageType.Fp32:
                var f = attention.Backward(p.Q.AsSpan((int)p.QAt), p.K.AsSpan((int)p.KAt), p.V.AsSpan((int)p.VAt), dOPacked, dRem, s, options);
                (dq, dk, dv) = (f.DQ, f.DK, f.DV);
                break;
            case StorageType.Fp16:
                var h = attention.Backward(ToHalf(p.Q).AsSpan((int)p.QAt), ToHalf(p.K).AsSpan((int)p.KAt), ToHalf(p.V).AsSpan((int)p.VAt),
                    ToHalf(dOPacked), dRem, s, options);
                (dq, dk, dv) = (h.DQ.Select(x => (float)x).ToArray(), h.DK.Select(x => (float)x).ToArray(), h.DV.Select(x => (float)x).ToArray());
                break;
            default:
                var b = attention.Backward(ToBf16(p.Q).AsSpan((int)p.QAt), ToBf16(p.K).AsSpan((int)p.KAt), ToBf16(p.V).AsSpan((int)p.VAt),
                    ToBf16(dOPacked), dRem, s, options);
                (dq, dk, dv) = (b.DQ.Select(x => (float)x).ToArray(), b.DK.Select(x => (float)x).ToArray(), b.DV.Select(x => (float)x).ToArray());
                break;
        }
        return (Take(dq, r.DQ, s.Batch, s.Heads, s.Length, s.HeadDim), Take(dk, r.DK, s.Batch, s.KeyValueHeads, s.Length, s.HeadDim),
            Take(dv, r.DV, s.Batch, s.KeyValueHeads, s.Length, s.HeadDim));
    }

    public static void Forward(StickBreakingAttention attention, string backend, StorageType storage, LayoutKind kind, AttentionShape s,
        bool attendCurrent, double fp32Tolerance)
    {
        var (q, k, v, _, _) = Inputs(s, storage, seed: 7 * s.Length + s.KeyValueHeads);
        var options = new StickBreakingOptions { AttendCurrent = attendCurrent, Layout = LayoutFor(kind, s) };
        var (o, rem, logRem) = RunForward(attention, storage, s, options, q, k, v);
        var exact = Float64Reference.Forward(TestInputs.ToDouble(q), Repeated(k, s), Repeated(v, s), s.Batch, s.Heads, s.Length,
            s.HeadDim, 1.0 / Math.Sqrt(s.HeadDim), attendCurrent);
        double oError = Errors.MaxAbs(o, exact.O);
        double allowed = fp32Tolerance;
        if (storage != StorageType.Fp32)
        {
            double floor = exact.O.Max(e => Math.Abs(RoundTrip(e, storage) - e));
            double ulp = Rounding.Ulp(exact.O.Max(Math.Abs), storage);
            allowed = Math.Max(2 * floor, 1.5 * ulp);
        }
        TestContext.Out.WriteLine($"{backend} {storage} {kind} {s}: o max error {oError:E2} (allowed {allowed:E2})");
        Assert.Multiple(() =>
        {
            Assert.That(oError, Is.LessThanOrEqualTo(allowed), "o");
            Assert.That(Errors.MaxAbs(rem, exact.Rem), Is.LessThanOrEqualTo(2e-5), "rem");
            Assert.That(Errors.MaxAbs(logRem, exact.LogRem), Is.LessThanOrEqualTo(2e-5), "LogRem");
        });
    }

    public static void Backward(StickBreakingAttention attention, string backend, StorageType storage, LayoutKind kind, AttentionShape s,
        bool attendCurrent, double fp32Tolerance)
    {
        var (q, k, v, dO, dRem) = Inputs(s, storage, seed: 11 * s.Length + s.KeyValueHeads);
        var options = new StickBreakingOptions { AttendCurrent = attendCurrent, Layout = LayoutFor(kind, s) };
        var (dq, dk, dv) = RunBackward(attention, storage, s, options, q, k, v, dO, dRem);
        var exact = Float64Reference.Backward(TestInputs.ToDouble(q), Repeated(k, s), Repeated(v, s), TestInputs.ToDouble(dO),
            TestInputs.ToDouble(dRem), s.Batch, s.Heads, s.Length, s.HeadDim, 1.0 / Math.Sqrt(s.HeadDim), attendCurrent);
        var dkExact = Summed(exact.DK, s);
        var dvExact = Summed(exact.DV, s);
        double Allowed(double[] e) => storage == StorageType.Fp32
            ? fp32Tolerance
            : 2 * Errors.RelativeRms(e.Select(x => (float)RoundTrip(x, storage)).ToArray(), e);
        double dqError = Errors.RelativeRms(dq, exact.DQ), dkError = Errors.RelativeRms(dk, dkExact), dvError = Errors.RelativeRms(dv, dvExact);
        TestContext.Out.WriteLine($"{backend} {storage} {kind} {s}: relative RMS dq {dqError:E2} (allowed {Allowed(exact.DQ):E2}), " +
            $"dk {dkError:E2} ({Allowed(dkExact):E2}), dv {dvError:E2} ({Allowed(dvExact):E2})");
        Assert.Multiple(() =>
        {
            Assert.That(dqError, Is.LessThanOrEqualTo(Allowed(exact.DQ)), "dq");
            Assert.That(dkError, Is.LessThanOrEqualTo(Allowed(dkExact)), "dk");
            Assert.That(dvError, Is.LessThanOrEqualTo(Allowed(dvExact)), "dv");
        });
    }

    /// <summary>Every layout's forward and backward give the bits of the contiguous call on the same values.</summary>
    public static void SameBitsAsContiguous(StickBreakingAttention attention, StorageType storage, AttentionShape s)
    {
        var (q, k, v, dO, dRem) = Inputs(s, storage, seed: 3 * s.HeadDim);
        var plain = new StickBreakingOptions();
        var o0 = RunForward(attention, storage, s, plain, q, k, v);
        var g0 = RunBackward(attention, storage, s, plain, q, k, v, dO, dRem);
        foreach (var kind in new[] { LayoutKind.TokenMajor, LayoutKind.FusedQkv, LayoutKind.Padded })
        {
            var options = new StickBreakingOptions { Layout = LayoutFor(kind, s) };
            var o = RunForward(attention, storage, s, options, q, k, v);
            var g = RunBackward(attention, storage, s, options, q, k, v, dO, dRem);
            Assert.Multiple(() =>
            {
                Assert.That(Bits(o.O), Is.EqualTo(Bits(o0.O)), $"{kind} o");
                Assert.That(Bits(o.LogRem), Is.EqualTo(Bits(o0.LogRem)), $"{kind} LogRem");
                Assert.That(Bits(g.DQ), Is.EqualTo(Bits(g0.DQ)), $"{kind} dq");
                Assert.That(Bits(g.DK), Is.EqualTo(Bits(g0.DK)), $"{kind} dk");
                Assert.That(Bits(g.DV), Is.EqualTo(Bits(g0.DV)), $"{kind} dv");
            });
        }
    }

    /// <summary>
    /// The device level with q, k, v in one fused buffer and dq, dk, dv in another (the realistic training call) gives
    /// the host level's bits.
    /// </summary>
    public static void DeviceFused(StickBreakingAttention attention, Accelerator acc, StorageType storage, AttentionShape s)
    {
        var (q, k, v, dO, dRem) = Inputs(s, storage, seed: 5);
        var options = new StickBreakingOptions { Layout = AttentionLayout.FusedQkv(s) };
        var host = RunBackward(attention, storage, s, options, q, k, v, dO, dRem);
        var r = AttentionLayout.Resolve(options.Layout, s);
        long fused = r.Q.BatchStride * s.Batch, kAt = (long)s.Heads * s.HeadDim, vAt = kAt + (long)s.KeyValueHeads * s.HeadDim;
        var packed = Gaps(fused);
        Place(q, packed, 0, r.Q, s.Batch, s.Heads, s.Length, s.HeadDim);
        Place(k, packed, kAt, r.K, s.Batch, s.KeyValueHeads, s.Length, s.HeadDim);
        Place(v, packed, vAt, r.V, s.Batch, s.KeyValueHeads, s.Length, s.HeadDim);
        var dOPacked = Packed(dO, r.DO, r.QuerySpan(r.DO), s.Heads, s);
        float[] grads = storage == StorageType.Fp32
            ? Device(packed, dOPacked, x => x)
            : Device(ToBf16(packed), ToBf16(dOPacked), x => (float)x);
        float[] dq = Take(grads, r.DQ, s.Batch, s.Heads, s.Length, s.HeadDim);
        float[] dk = Take(grads[(int)kAt..], r.DK, s.Batch, s.KeyValueHeads, s.Length, s.HeadDim);
        float[] dv = Take(grads[(int)vAt..], r.DV, s.Batch, s.KeyValueHeads, s.Length, s.HeadDim);
        Assert.Multiple(() =>
        {
            Assert.That(Bits(dq), Is.EqualTo(Bits(host.DQ)), "dq");
            Assert.That(Bits(dk), Is.EqualTo(Bits(host.DK)), "dk");
            Assert.That(Bits(dv), Is.EqualTo(Bits(host.DV)), "dv");
        });

        float[] Device<T>(T[] qkv, T[] dOValues, Func<T, float> toFloat)
            where T : unmanaged
        {
            using var qkvBuffer = acc.Allocate1D(qkv);
            using var gradBuffer = acc.Allocate1D<T>(fused);
            gradBuffer.MemSetToZero();
            using var dOBuffer = acc.Allocate1D(dOValues);
            using var dRemBuffer = acc.Allocate1D(dRem);
            using var o = acc.Allocate1D<T>(r.QuerySpan(r.O));
            using var rows = acc.Allocate1D<float>(2 * s.RowCount);
            using var workspace = new StickBreakingWorkspace(acc, s);
            var stream = acc.DefaultStream;
            ArrayView<T> qv = qkvBuffer.View;
            ArrayView<T> gv = gradBuffer.View;
            ArrayView<T> ov = o.View;
            ArrayView<T> dOv = dOBuffer.View;
            var rem = rows.View.SubView(0, s.RowCount);
            var logRem = rows.View.SubView(s.RowCount, s.RowCount);
            if (typeof(T) == typeof(float))
            {
                var x = qv.Cast<float>(); var g = gv.Cast<float>();
                attention.Forward(stream, s, x, x.SubView(kAt), x.SubView(vAt), ov.Cast<float>(), rem, logRem, options, workspace);
                attention.Backward(stream, s, x, x.SubView(kAt), x.SubView(vAt), dOv.Cast<float>(), dRemBuffer.View, logRem,
                    workspace, g, g.SubView(kAt), g.SubView(vAt));
            }
            else
            {
                var x = qv.Cast<BFloat16>(); var g = gv.Cast<BFloat16>();
                attention.Forward(stream, s, x, x.SubView(kAt), x.SubView(vAt), ov.Cast<BFloat16>(), rem, logRem, options, workspace);
                attention.Backward(stream, s, x, x.SubView(kAt), x.SubView(vAt), dOv.Cast<BFloat16>(), dRemBuffer.View, logRem,
                    workspace, g, g.SubView(kAt), g.SubView(vAt));
            }
            stream.Synchronize();
            return gradBuffer.GetAsArray1D().Select(toFloat).ToArray();
        }
    }

    private static int[] Bits(float[] x) => x.Select(BitConverter.SingleToInt32Bits).ToArray();
}
