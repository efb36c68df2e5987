using System;
using System.Collections.Generic;
using NUnit.Framework;
using StickBreaking.ILGPU.Launch;
using StickBreaking.ILGPU.Tests.Infrastructure;
using StickBreaking.ILGPU.Tests.Reference;
using static StickBreaking.ILGPU.Tests.Infrastructure.Errors;

namespace StickBreaking.ILGPU.Tests;

/// <summary>The layouts of <see cref="KernelLayoutTests"/>: library defaults, slices of a fused QKV buffer, and padded rows, heads and sequences.</summary>
public enum KernelLayoutKind { HeadMajor, FusedQkv, Padded }

/// <summary>
/// The kernels read every tensor through its layout and serve grouped heads (docs/math.md, "Layouts and grouped heads"),
/// checked against the kernels themselves on the contiguous layout with each key/value head copied to the query heads
/// of its group ("expanded" heads): the index arithmetic changes, the floating-point operations do not. So o, rem,
/// LogRem and dq must match bit for bit, and dk and dv bit for bit where each key/value head serves one query head;
/// with a group of G heads dk and dv are the sum of the expanded heads' gradients, summed in another order (the kernel
/// runs one accumulation over the G heads), so within the fp32 scan tolerance (relative RMS 2e-5).
/// </summary>
internal static class LayoutChecks
{
    private const int Batch = 2, Heads = 4, Length = 70, HeadDim = 24;

    /// <summary>Every tensor through arbitrary strides with groups of two, slices of a fused buffer with one query head per key/value head, and grouped heads in the default layout.</summary>
    public static IEnumerable<TestCaseData> Cases()
    {
        yield return new TestCaseData(KernelLayoutKind.Padded, 2).SetArgDisplayNames("Padded", "Hkv=2");
        yield return new TestCaseData(KernelLayoutKind.FusedQkv, 4).SetArgDisplayNames("FusedQkv", "Hkv=4");
        yield return new TestCaseData(KernelLayoutKind.HeadMajor, 1).SetArgDisplayNames("HeadMajor", "Hkv=1");
    }

    public static AttentionShape Shape(int keyValueHeads) => new(Batch, Heads, Length, HeadDim) { KeyValueHeads = keyValueHeads };

    /// <summary>Where q, k and v lie in one host buffer, and the layouts of the call.</summary>
    public sealed record Placement(AttentionLayout? Layout, long QOffset, long KOffset, long VOffset, long Floats)
    {
        /// <summary>q, k and v in <paramref name="buffer"/>: from their offsets, each exactly its contiguous length without a layout (the API's rule), else to the end.</summary>
        public (ReadOnlyMemory<T> Q, ReadOnlyMemory<T> K, ReadOnlyMemory<T> V) Views<T>(T[] buffer) => Layout is null
            ? (buffer.AsMemory((int)QOffset, (int)(KOffset - QOffset)), buffer.AsMemory((int)KOffset, (int)(VOffset - KOffset)),
                buffer.AsMemory((int)VOffset, (int)(Floats - VOffset)))
            : (buffer.AsMemory((int)QOffset), buffer.AsMemory((int)KOffset), buffer.AsMemory((int)VOffset));
    }

    public static Placement Place(KernelLayoutKind kind, AttentionShape shape)
    {
        int H = shape.Heads, G = shape.KeyValueHeads, T = shape.Length, D = shape.HeadDim, B = shape.Batch;
        switch (kind)
        {
            case KernelLayoutKind.HeadMajor:
            {
                long query = (long)B * H * T * D, key = (long)B * G * T * D;
                return new Placement(null, 0, query, query + key, query + 2 * key);
            }
            case KernelLayoutKind.FusedQkv:
                return new Placement(AttentionLayout.FusedQkv(shape), 0, (long)H * D, (long)(H + G) * D, (long)B * T * (H + 2 * G) * D);
            default:
            {
                // Rows 3 elements apart beyond D, heads 5 beyond their rows, sequences 7 beyond their heads; o, dO and
                // the gradients with other paddings (each its own buffer).
                var q = Padded(H, T, D, 3, 5, 7);
                var k = Padded(G, T, D, 1, 2, 9);
                var v = Padded(G, T, D, 6, 0, 0);
                long qSpan = q.Span(B, H, T, D), kSpan = k.Span(B, G, T, D), vSpan = v.Span(B, G, T, D);
                var layout = new AttentionLayout
                {
                    Query = q, Key = k, Value = v, Output = Padded(H, T, D, 2, 1, 0), OutputGradient = Padded(H, T, D, 0, 3, 1),
                    QueryGradient = Padded(H, T, D, 5, 0, 2), KeyGradient = Padded(G, T, D, 4, 4, 4), ValueGradient = Padded(G, T, D, 1, 0, 3),
                };
                return new Placement(layout, 0, qSpan, qSpan + kSpan, qSpan + kSpan + vSpan);
            }
        }
    }

    private static TensorLayout Padded(int heads, int length, int headDim, int rowPad, int headPad, int batchPad)
    {
        long token = headDim + rowPad, head = token * length + headPad;
        return new TensorLayout(head * heads + batchPad, head, token);
    }

    public static TensorLayout Resolved(TensorLayout? layout, int heads, int length, int headDim) =>
        layout ?? TensorLayout.HeadMajor(heads, length, headDim);

    /// <summary>Writes a contiguous [B, heads, T, D] tensor into <paramref name="target"/> from <paramref name="offset"/> in <paramref name="layout"/>.</summary>
    public static void Pack<T>(T[] source, T[] target, long offset, TensorLayout layout, int batch, int heads, int length, int headDim)
    {
        for (int b = 0; b < batch; b++)
            for (int h = 0; h < heads; h++)
                for (int t = 0; t < length; t++)
                    Array.Copy(source, (((long)b * heads + h) * length + t) * headDim,
                        target, offset + b * layout.BatchStride + h * layout.HeadStride + t * layout.TokenStride, headDim);
    }

    /// <summary>Reads a tensor in <paramref name="layout"/> back as contiguous [B, heads, T, D].</summary>
    public static T[] Unpack<T>(T[] source, TensorLayout layout, int batch, int heads, int length, int headDim)
    {
        var result = new T[(long)batch * heads * length * headDim];
        for (int b = 0; b < batch; b++)
            for (int h = 0; h < heads; h++)
                for (int t = 0; t < length; t++)
                    Array.Copy(source, b * layout.BatchStride + h * layout.HeadStride + t * layout.TokenStride,
                        result, (((long)b * heads + h) * length + t) * headDim, headDim);
        return result;
    }

    /// <summary>Key/value heads [B, Hkv, T, D] copied to the query heads of their groups: [B, H, T, D].</summary>
    public static T[] Expand<T>(T[] x, AttentionShape shape)
    {
        int group = shape.GroupSize, rowFloats = shape.Length * shape.HeadDim;
        var result = new T[shape.TensorLength];
        for (int b = 0; b < shape.Batch; b++)
            for (int h = 0; h < shape.Heads; h++)
                Array.Copy(x, ((long)b * shape.KeyValueHeads + h / group) * rowFloats, result, ((long)b * shape.Heads + h) * rowFloats, rowFloats);
        return result;
    }

    /// <summary>Gradients of the expanded heads [B, H, T, D] summed over each group (in float64): [B, Hkv, T, D].</summary>
    public static double[] SumGroups(float[] x, AttentionShape shape)
    {
        int group = shape.GroupSize, rowFloats = shape.Length * shape.HeadDim;
        var result = new double[shape.KeyValueTensorLength];
        for (int b = 0; b < shape.Batch; b++)
            for (int h = 0; h < shape.Heads; h++)
            {
                long from = ((long)b * shape.Heads + h) * rowFloats, to = ((long)b * shape.KeyValueHeads + h / group) * rowFloats;
                for (int e = 0; e < rowFloats; e++)
                    result[to + e] += x[from + e];
            }
        return result;
    }

    public sealed record Inputs<T>(T[] Q, T[] K, T[] V, T[] DO, float[] DRem);

    /// <summary>Standard inputs for the grouped shape: q, dO [B, H, T, D], k, v [B, Hkv, T, D], dRem [B, H, T].</summary>
    public static Inputs<float> Create(AttentionShape shape, int seed)
    {
        var query = TestInputs.Create(InputKind.Standard, shape.Batch, shape.Heads, shape.Length, shape.HeadDim, seed);
        var key = TestInputs.Create(InputKind.Standard, shape.Batch, shape.KeyValueHeads, shape.Length, shape.HeadDim, seed + 1);
        return new Inputs<float>(query.Q, key.K, key.V, query.DO, query.DRem);
    }

    /// <summary>The call's host buffers: q, k, v in one buffer as the placement says (a fused buffer's slices, or one after the other), dO in its layout.</summary>
    public static (TStored[] Qkv, TStored[] DO) Host<TStored>(Inputs<TStored> x, AttentionShape shape, Placement place)
    {
        int B = shape.Batch, H = shape.Heads, G = shape.KeyValueHeads, T = shape.Length, D = shape.HeadDim;
        var qkv = new TStored[place.Floats];
        var layout = place.Layout;
        Pack(x.Q, qkv, place.QOffset, Resolved(layout?.Query, H, T, D), B, H, T, D);
        Pack(x.K, qkv, place.KOffset, Resolved(layout?.Key, G, T, D), B, G, T, D);
        Pack(x.V, qkv, place.VOffset, Resolved(layout?.Value, G, T, D), B, G, T, D);
        var doLayout = Resolved(layout?.OutputGradient ?? layout?.Output, H, T, D);
        var dO = new TStored[doLayout.Span(B, H, T, D)];
        Pack(x.DO, dO, 0, doLayout, B, H, T, D);
        return (qkv, dO);
    }

    /// <summary>
    /// fp32: the forward and backward with the layout and grouped heads against the same instance's kernels on expanded
    /// contiguous heads.
    /// </summary>
    public static void CheckFp32(StickBreakingAttention attention, KernelLayoutKind kind, int keyValueHeads)
    {
        var shape = Shape(keyValueHeads);
        var place = Place(kind, shape);
        var x = Create(shape, seed: 17 * keyValueHeads + (int)kind);
        var options = new StickBreakingOptions { Layout = place.Layout };
        var (qkv, dO) = Host(x, shape, place);
        var (qm, km, vm) = place.Views(qkv);
        var q = qm.Span;
        var k = km.Span;
        var v = vm.Span;

        var expanded = new AttentionShape(shape.Batch, shape.Heads, shape.Length, shape.HeadDim);
        var kE = Expand(x.K, shape);
        var vE = Expand(x.V, shape);
        var forwardE = attention.Forward(x.Q, kE, vE, expanded);
        var gradientsE = attention.Backward(x.Q, kE, vE, x.DO, x.DRem, expanded);

        var forward = attention.Forward(q, k, v, shape, options);
        var gradients = attention.Backward(q, k, v, dO, x.DRem, shape, options);
        int B = shape.Batch, H = shape.Heads, G = shape.KeyValueHeads, T = shape.Length, D = shape.HeadDim;
        var layout = place.Layout;
        var o = Unpack(forward.O, Resolved(layout?.Output, H, T, D), B, H, T, D);
        var dq = Unpack(gradients.DQ, Resolved(layout?.QueryGradient ?? layout?.Query, H, T, D), B, H, T, D);
        var dk = Unpack(gradients.DK, Resolved(layout?.KeyGradient ?? layout?.Key, G, T, D), B, G, T, D);
        var dv = Unpack(gradients.DV, Resolved(layout?.ValueGradient ?? layout?.Value, G, T, D), B, G, T, D);
        var dkE = SumGroups(gradientsE.DK, shape);
        var dvE = SumGroups(gradientsE.DV, shape);
        double dkError = RelativeRms(dk, dkE), dvError = RelativeRms(dv, dvE);
        TestContext.Out.WriteLine($"{kind} Hkv={G}: dk relative RMS {dkError:E2}, dv {dvError:E2} against the expanded heads' sums");
        Assert.Multiple(() =>
        {
            Assert.That(o, Is.EqualTo(forwardE.O), "o, bit for bit");
            Assert.That(forward.Rem, Is.EqualTo(forwardE.Rem), "rem, bit for bit");
            Assert.That(forward.LogRem, Is.EqualTo(forwardE.LogRem), "LogRem, bit for bit");
            Assert.That(dq, Is.EqualTo(gradientsE.DQ), "dq, bit for bit");
            if (shape.GroupSize == 1)
            {
                Assert.That(dk, Is.EqualTo(gradientsE.DK), "dk, bit for bit (one query head per key/value head)");
                Assert.That(dv, Is.EqualTo(gradientsE.DV), "dv, bit for bit (one query head per key/value head)");
            }
            Assert.That(dkError, Is.LessThanOrEqualTo(2e-5), "dk against the sum of the expanded heads' dk");
            Assert.That(dvError, Is.LessThanOrEqualTo(2e-5), "dv against the sum of the expanded heads' dv");
            if (layout is not null)
            {
                Assert.That(Gaps(forward.O, Resolved(layout.Output, H, T, D), B, H, T, D), Is.True, "o's gaps are left zero");
                Assert.That(Gaps(gradients.DK, Resolved(layout.KeyGradient ?? layout.Key, G, T, D), B, G, T, D), Is.True, "dk's gaps are left zero");
            }
        });
    }

    /// <summary>
    /// 16-bit storage on the portable kernels: the same bodies as fp32 with a conversion on load and one rounding on
    /// store, so each output is the fp32 kernels' output for the same (16-bit) inputs, rounded: bit for bit, with the
    /// layout and grouped heads (dk and dv summed over the group in fp32, rounded once).
    /// </summary>
    public static void Check16<T>(StickBreakingAttention portable, KernelLayoutKind kind, int keyValueHeads, Func<float, T> round, Func<T, float> widen)
        where T : unmanaged
    {
        var shape = Shape(keyValueHeads);
        var place = Place(kind, shape);
        var x32 = Create(shape, seed: 29 * keyValueHeads + (int)kind);
        T[] Round(float[] a) => Array.ConvertAll(a, f => round(f));
        var x16 = new Inputs<T>(Round(x32.Q), Round(x32.K), Round(x32.V), Round(x32.DO), x32.DRem);
        float[] Widen(T[] a) => Array.ConvertAll(a, h => widen(h));
        var xw = new Inputs<float>(Widen(x16.Q), Widen(x16.K), Widen(x16.V), Widen(x16.DO), x32.DRem);
        var options = new StickBreakingOptions { Layout = place.Layout };

        var (qkv16, dO16) = Host(x16, shape, place);
        var (qkvw, dOw) = Host(xw, shape, place);
        StickBreakingOutput<T> forward16;
        StickBreakingGradients<T> gradients16;
        if (typeof(T) == typeof(Half))
        {
            var (q, k, v) = place.Views((Half[])(object)qkv16);
            var dO = (Half[])(object)dO16;
            forward16 = (StickBreakingOutput<T>)(object)portable.Forward(q.Span, k.Span, v.Span, shape, options);
            gradients16 = (StickBreakingGradients<T>)(object)portable.Backward(q.Span, k.Span, v.Span, dO, x32.DRem, shape, options);
        }
        else
        {
            var (q, k, v) = place.Views((BFloat16[])(object)qkv16);
            var dO = (BFloat16[])(object)dO16;
            forward16 = (StickBreakingOutput<T>)(object)portable.Forward(q.Span, k.Span, v.Span, shape, options);
            gradients16 = (StickBreakingGradients<T>)(object)portable.Backward(q.Span, k.Span, v.Span, dO, x32.DRem, shape, options);
        }
        var (qw, kw, vw) = place.Views(qkvw);
        var forward32 = portable.Forward(qw.Span, kw.Span, vw.Span, shape, options);
        var gradients32 = portable.Backward(qw.Span, kw.Span, vw.Span, dOw, x32.DRem, shape, options);
        // Compared as bits (widened): both sides in their layouts, gaps included.
        Assert.Multiple(() =>
        {
            Assert.That(Widen(forward16.O), Is.EqualTo(Widen(Round(forward32.O))), "o = round(fp32 o)");
            Assert.That(forward16.LogRem, Is.EqualTo(forward32.LogRem), "LogRem as fp32");
            Assert.That(Widen(gradients16.DQ), Is.EqualTo(Widen(Round(gradients32.DQ))), "dq = round(fp32 dq)");
            Assert.That(Widen(gradients16.DK), Is.EqualTo(Widen(Round(gradients32.DK))), "dk = round(fp32 dk)");
            Assert.That(Widen(gradients16.DV), Is.EqualTo(Widen(Round(gradients32.DV))), "dv = round(fp32 dv)");
        });
    }

    private static bool Gaps<T>(T[] x, TensorLayout layout, int batch, int heads, int length, int headDim)
    {
        var covered = new bool[x.Length];
        for (int b = 0; b < batch; b++)
            for (int h = 0; h < heads; h++)
                for (int t = 0; t < length; t++)
                    Array.Fill(covered, true, (int)(b * layout.BatchStride + h * layout.HeadStride + t * layout.TokenStride), headDim);
        for (int e = 0; e < x.Length; e++)
            if (!covered[e] && !EqualityComparer<T>.Default.Equals(x[e], default))
                return false;
        return true;
    }
}

/// <summary>Layouts and grouped heads on every backend's own kernels (fp32), against expanded contiguous heads.</summary>
public sealed class KernelLayoutTests(string backend) : BackendFixture(backend)
{
    [TestCaseSource(typeof(LayoutChecks), nameof(LayoutChecks.Cases))]
    public void Fp32MatchesExpandedHeads(KernelLayoutKind kind, int keyValueHeads) =>
        LayoutChecks.CheckFp32(Attention, kind, keyValueHeads);
}

/// <summary>
/// Layouts and grouped heads on the CPU accelerator: the CUDA kernels' code (fp32), and the portable 16-bit kernels
/// against the portable fp32 kernels (bit for bit after one rounding).
/// </summary>
[TestFixture]
public sealed class KernelLayoutOnCpuTests : CudaCodeOnCpuFixture
{
    /// <summary>One case (the CUDA kernels' 256-thread groups are slow on the CPU accelerator): every tensor strided, groups of two.</summary>
    [TestCase(KernelLayoutKind.Padded, 2)]
    public void CudaCodeFp32MatchesExpandedHeads(KernelLayoutKind kind, int keyValueHeads) =>
        LayoutChecks.CheckFp32(Attention, kind, keyValueHeads);

    [TestCase(KernelLayoutKind.FusedQkv, 2)]
    public void PortableFp16IsRoundedFp32(KernelLayoutKind kind, int keyValueHeads)
    {
        using var portable = new StickBreakingAttention(Accelerator, null, KernelChoice.Portable);
        LayoutChecks.Check16(portable, kind, keyValueHeads, f => (Half)f, h => (float)h);
    }

    [TestCase(KernelLayoutKind.Padded, 2)]
    public void PortableBf16IsRoundedFp32(KernelLayoutKind kind, int keyValueHeads)
    {
        using var portable = new StickBreakingAttention(Accelerator, null, KernelChoice.Portable);
        LayoutChecks.Check16(portable, kind, keyValueHeads, f => (BFloat16)f, h => (float)h);
    }
}
