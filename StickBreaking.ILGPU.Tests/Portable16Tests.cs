using System;
using System.Collections.Generic;
using System.Linq;
using ILGPU;
using ILGPU.Runtime;
using NUnit.Framework;
using StickBreaking.ILGPU.Kernels.Common;
using StickBreaking.ILGPU.Kernels.Portable;
using StickBreaking.ILGPU.Launch;
using StickBreaking.ILGPU.Tests.Infrastructure;
using StickBreaking.ILGPU.Tests.Reference;
using static StickBreaking.ILGPU.Tests.Rounding;
using static StickBreaking.ILGPU.Tests.Infrastructure.Errors;

namespace StickBreaking.ILGPU.Tests;

/// <summary>
/// The portable kernels on 16-bit storage (fp16 and bf16 bits: <see cref="KernelSet.Forward16"/>,
/// <see cref="KernelSet.Backward16"/>), launched through <see cref="KernelLauncher"/> as the library launches them,
/// on every backend. Inputs are rounded to the storage type first and the float64 reference runs on the ROUNDED
/// values, so that only the kernels' own error is measured.
/// <para>
/// Tolerances. o: max(2 floor, 1 ulp of the storage type at |o|max), the floor being max |round(o) - o| (no
/// 16-bit output can beat it; the kernel computes in fp32 and rounds once). rem and LogRem are fp32: 2e-5 (plus
/// 1e-6 |LogRem| where the stick is used up). dq, dk, dv: relative RMS within twice the floor, the relative RMS of
/// round(g) - g of the exact gradients g. On OpenCL the 16-bit passes accumulate in the fp32
/// <c>AccumulatorScratch</c> (docs/design.md), which these tests allocate there only.
/// </para>
/// </summary>
public sealed class Portable16Tests(string backend) : BackendFixture(backend)
{
    private static readonly int[] Lengths = [1, 15, 65, 130];
    private static readonly int[] HeadDims = [16, 50, 64];

    public static IEnumerable<TestCaseData> Cases()
    {
        // Every length with every head dimension in Standard inputs; storage, visibility and dRem alternate so that
        // each occurs with every length and head dimension without the full product.
        int n = 0;
        foreach (int t in Lengths)
            foreach (int d in HeadDims)
            {
                bool bf16 = n % 2 == 0, attend = n / 2 % 2 == 0, zeroDRem = n % 3 == 0;
                n++;
                yield return Case(bf16, InputKind.Standard, t, d, attend, zeroDRem, sliced: false);
            }
        yield return Case(true, InputKind.Saturated, 130, 64, false, false, sliced: false);
        yield return Case(false, InputKind.Saturated, 65, 16, true, true, sliced: false);
        yield return Case(false, InputKind.UsedUp, 130, 16, true, false, sliced: false);
        yield return Case(true, InputKind.UsedUp, 130, 50, false, true, sliced: false);
        // Shared memory capped: the head dimension split over the grid's z (column slices of every output).
        yield return Case(true, InputKind.Standard, 65, 64, true, false, sliced: true);
        yield return Case(false, InputKind.Standard, 130, 50, false, false, sliced: true);
    }

    private static TestCaseData Case(bool bf16, InputKind kind, int t, int d, bool attend, bool zeroDRem, bool sliced) =>
        new TestCaseData(bf16, kind, t, d, attend, zeroDRem, sliced).SetArgDisplayNames(bf16 ? "bf16" : "fp16", kind.ToString(),
            $"T={t}", $"D={d}", attend ? "AttendCurrent" : "Strict", zeroDRem ? "dRem=0" : "dRem", sliced ? "sliced" : "whole");

    [TestCaseSource(nameof(Cases))]
    public void MatchesReferenceOnRoundedInputs(bool bf16, InputKind kind, int length, int headDim, bool attendCurrent,
        bool zeroDRem, bool sliced)
    {
        int batch = 1, heads = kind == InputKind.Standard ? 1 : 2;
        var shape = new AttentionShape(batch, heads, length, headDim);
        var x = TestInputs.Create(kind, batch, heads, length, headDim, seed: 11 * length + headDim + (bf16 ? 1 : 0));
        var q = RoundBits(x.Q, bf16); var k = RoundBits(x.K, bf16); var v = RoundBits(x.V, bf16); var dO = RoundBits(x.DO, bf16);
        float[] dRem = zeroDRem ? new float[x.DRem.Length] : x.DRem;
        double scale = 1.0 / Math.Sqrt(headDim);
        var expected = Float64Reference.Forward(q.Values, k.Values, v.Values, batch, heads, length, headDim, scale, attendCurrent);
        var gradients = Float64Reference.Backward(q.Values, k.Values, v.Values, dO.Values, TestInputs.ToDouble(dRem),
            batch, heads, length, headDim, scale, attendCurrent);

        var run = Run16(bf16, shape, q.Bits, k.Bits, v.Bits, dO.Bits, dRem, (float)scale, attendCurrent, sliced);

        double floor = expected.O.Max(e => Math.Abs(ToDouble(FromDouble(e, bf16), bf16) - e));
        double oTolerance = Math.Max(2 * floor, Ulp(expected.O.Max(Math.Abs), bf16));
        double oError = Errors.MaxAbs(Floats(run.O, bf16), expected.O);
        double remError = Errors.MaxAbs(run.Rem, expected.Rem);
        double logRemExcess = expected.LogRem.Select((e, i) => Math.Abs(run.LogRem[i] - e) - 1e-6 * Math.Abs(e)).Max();
        var (dqError, dqFloor) = GradientError(run.DQ, gradients.DQ, bf16);
        var (dkError, dkFloor) = GradientError(run.DK, gradients.DK, bf16);
        var (dvError, dvFloor) = GradientError(run.DV, gradients.DV, bf16);
        TestContext.Out.WriteLine($"{Backend} {(bf16 ? "bf16" : "fp16")} {kind} T={length} D={headDim}: o error {oError:E2} " +
            $"(floor {floor:E2}, tolerance {oTolerance:E2}), rem {remError:E2}, LogRem excess {logRemExcess:E2}; rel RMS " +
            $"dq {dqError:E2} (floor {dqFloor:E2}), dk {dkError:E2} (floor {dkFloor:E2}), dv {dvError:E2} (floor {dvFloor:E2})");
        Assert.Multiple(() =>
        {
            Assert.That(oError, Is.LessThanOrEqualTo(oTolerance), "O");
            Assert.That(remError, Is.LessThanOrEqualTo(2e-5), "Rem");
            Assert.That(logRemExcess, Is.LessThanOrEqualTo(2e-5), "LogRem");
            Assert.That(dqError, Is.LessThanOrEqualTo(2 * dqFloor), "DQ");
            Assert.That(dkError, Is.LessThanOrEqualTo(2 * dkFloor), "DK");
            Assert.That(dvError, Is.LessThanOrEqualTo(2 * dvFloor), "DV");
        });
    }

    /// <summary>
    /// One body: the 16-bit kernels compute exactly what the fp32 instantiation computes on the same (rounded) values,
    /// then round once, so each 16-bit output is bit for bit the rounding of the fp32 kernel's; rem and LogRem are
    /// identical. And repeat runs are bitwise identical.
    /// </summary>
    [TestCase(true, 130, 50, false, false)]
    [TestCase(false, 97, 64, true, false)]
    [TestCase(true, 65, 64, true, true)]
    public void RoundsTheFp32KernelsResultsAndRepeats(bool bf16, int length, int headDim, bool attendCurrent, bool sliced)
    {
        var shape = new AttentionShape(1, 2, length, headDim);
        var x = TestInputs.Create(InputKind.Standard, 1, 2, length, headDim, seed: 3 * length + headDim);
        var q = RoundBits(x.Q, bf16); var k = RoundBits(x.K, bf16); var v = RoundBits(x.V, bf16); var dO = RoundBits(x.DO, bf16);
        float scale = (float)(1.0 / Math.Sqrt(headDim));
        var first = Run16(bf16, shape, q.Bits, k.Bits, v.Bits, dO.Bits, x.DRem, scale, attendCurrent, sliced);
        var second = Run16(bf16, shape, q.Bits, k.Bits, v.Bits, dO.Bits, x.DRem, scale, attendCurrent, sliced);
        var fp32 = Run(ForwardKernel.Launch, (BackwardQueryKernel.Launch, BackwardKeyKernel.Launch), shape,
            Floats(q.Bits, bf16), Floats(k.Bits, bf16), Floats(v.Bits, bf16), Floats(dO.Bits, bf16), x.DRem, scale,
            attendCurrent, sliced, scratch: false);
        ushort[] Rounded(float[] values) => values.Select(f => FromDouble(f, bf16)).ToArray();
        Assert.Multiple(() =>
        {
            Assert.That(first.O, Is.EqualTo(Rounded(fp32.O)).AsCollection, "O = round(fp32 O)");
            Assert.That(first.Rem, Is.EqualTo(fp32.Rem).AsCollection, "Rem = fp32 Rem");
            Assert.That(first.LogRem, Is.EqualTo(fp32.LogRem).AsCollection, "LogRem = fp32 LogRem");
            Assert.That(first.DQ, Is.EqualTo(Rounded(fp32.DQ)).AsCollection, "DQ = round(fp32 DQ)");
            Assert.That(first.DK, Is.EqualTo(Rounded(fp32.DK)).AsCollection, "DK = round(fp32 DK)");
            Assert.That(first.DV, Is.EqualTo(Rounded(fp32.DV)).AsCollection, "DV = round(fp32 DV)");
            Assert.That(second.O, Is.EqualTo(first.O).AsCollection, "O repeats");
            Assert.That(second.Rem, Is.EqualTo(first.Rem).AsCollection, "Rem repeats");
            Assert.That(second.LogRem, Is.EqualTo(first.LogRem).AsCollection, "LogRem repeats");
            Assert.That(second.DQ, Is.EqualTo(first.DQ).AsCollection, "DQ repeats");
            Assert.That(second.DK, Is.EqualTo(first.DK).AsCollection, "DK repeats");
            Assert.That(second.DV, Is.EqualTo(first.DV).AsCollection, "DV repeats");
        });
    }

    /// <summary>
    /// Non-finite k and v of a key no row sees (the last one, without AttendCurrent) reach no output: masks select,
    /// never multiply, in the 16-bit specializations as in fp32; the key's own dk and dv are zero.
    /// </summary>
    [TestCase(true)]
    [TestCase(false)]
    public void UnseenNonFiniteKeyReachesNoOutput(bool bf16)
    {
        int length = 40, headDim = 16;
        var shape = new AttentionShape(1, 1, length, headDim);
        var x = TestInputs.Create(InputKind.Standard, 1, 1, length, headDim, seed: 41);
        var q = RoundBits(x.Q, bf16); var k = RoundBits(x.K, bf16); var v = RoundBits(x.V, bf16); var dO = RoundBits(x.DO, bf16);
        int last = length - 1;
        for (int d = 0; d < headDim; d++)
        {
            k.Bits[last * headDim + d] = FromDouble(d % 2 == 0 ? double.NaN : double.NegativeInfinity, bf16);
            v.Bits[last * headDim + d] = FromDouble(d % 2 == 0 ? double.PositiveInfinity : double.NaN, bf16);
        }
        var run = Run16(bf16, shape, q.Bits, k.Bits, v.Bits, dO.Bits, x.DRem, 0.25f, attendCurrent: false, sliced: false);
        bool Finite(ushort[] bits) => bits.All(b => double.IsFinite(ToDouble(b, bf16)));
        Assert.Multiple(() =>
        {
            Assert.That(Finite(run.O) && run.Rem.All(float.IsFinite) && run.LogRem.All(float.IsFinite), "forward outputs finite");
            Assert.That(Finite(run.DQ) && Finite(run.DK) && Finite(run.DV), "gradients finite");
            Assert.That(Enumerable.Range(0, headDim).All(d => ToDouble(run.DK[last * headDim + d], bf16) == 0
                && ToDouble(run.DV[last * headDim + d], bf16) == 0), "the unseen key's dk and dv are zero");
        });
    }

    private sealed record Result<T>(T[] O, float[] Rem, float[] LogRem, T[] DQ, T[] DK, T[] DV);

    private Result<ushort> Run16(bool bf16, AttentionShape shape, ushort[] q, ushort[] k, ushort[] v, ushort[] dO,
        float[] dRem, float scale, bool attendCurrent, bool sliced)
    {
        var kernels = new KernelSet(Accelerator, KernelChoice.Portable);
        return Run(kernels.Forward16(shape.HeadDim, bf16), kernels.Backward16(shape.HeadDim, bf16), shape,
            q, k, v, dO, dRem, scale, attendCurrent, sliced, scratch: true);
    }

    /// <summary>
    /// A training forward (snapshots written) and both backward passes, as the library enqueues them. With
    /// <paramref name="sliced"/> the shared memory is capped so that each kernel splits D over the grid's z. With
    /// <paramref name="scratch"/> the fp32 accumulator scratch is given where the kernels need it (OpenCL).
    /// </summary>
    private Result<T> Run<T>(KernelLaunch<ForwardArgs<T>> forward,
        (KernelLaunch<BackwardArgs<T>> Query, KernelLaunch<BackwardArgs<T>> Key) backward, AttentionShape shape,
        T[] q, T[] k, T[] v, T[] dO, float[] dRem, float scale, bool attendCurrent, bool sliced, bool scratch)
        where T : unmanaged
    {
        var acc = Accelerator;
        // Sliced: room for 16 columns of the forward, 16 of the dq pass and so 32 of the dk/dv pass (its static part
        // is smaller, its columns take twice as much).
        int? forwardLimit = sliced ? ForwardKernel.StaticSharedBytes + 16 * 4 * ForwardKernel.DynamicFloatsPerColumn + 64 : null;
        int? backwardLimit = sliced ? BackwardQueryKernel.StaticSharedBytes + 16 * 4 * BackwardQueryKernel.DynamicFloatsPerColumn + 64 : null;
        var forwardLauncher = new KernelLauncher(acc, forwardLimit);
        var backwardLauncher = new KernelLauncher(acc, backwardLimit);
        long n = shape.TensorLength;
        int tiles = Snapshots.TileCount(shape.Length);
        using var qb = acc.Allocate1D(q);
        using var kb = acc.Allocate1D(k);
        using var vb = acc.Allocate1D(v);
        using var dOb = acc.Allocate1D(dO);
        using var dRemb = acc.Allocate1D(dRem);
        using var o = acc.Allocate1D<T>(n);
        using var dq = acc.Allocate1D<T>(n);
        using var dk = acc.Allocate1D<T>(n);
        using var dv = acc.Allocate1D<T>(n);
        using var rem = acc.Allocate1D<float>(shape.RowCount);
        using var logRem = acc.Allocate1D<float>(shape.RowCount);
        using var accSnapshots = acc.Allocate1D<float>(shape.RowCount * tiles);
        using var prefixSnapshots = acc.Allocate1D<float>(shape.RowCount * tiles);
        // What the host must provide: on OpenCL only, B*H*T*D floats for the forward, 2*B*H*T*D for the backward.
        bool needsScratch = scratch && acc.AcceleratorType == AcceleratorType.OpenCL;
        using var scratchBuffer = acc.Allocate1D<float>(needsScratch ? 2 * n : 1);
        var stream = acc.DefaultStream;
        var forwardArgs = new ForwardArgs<T>
        {
            Q = qb.View, K = kb.View, V = vb.View, O = o.View, Rem = rem.View, LogRem = logRem.View,
            AccumulatorScratch = needsScratch ? scratchBuffer.View.SubView(0, n) : ArrayView<float>.Empty,
            AccSnapshots = accSnapshots.View, WriteSnapshots = 1, SnapshotTiles = tiles,
            Rows = AttentionRows.Contiguous(shape.Heads, shape.KeyValueHeads, shape.Length, shape.HeadDim), Length = shape.Length, HeadDim = shape.HeadDim, AttendCurrent = attendCurrent ? 1 : 0, Scale = scale,
        };
        forwardLauncher.Launch(forward, stream, shape, forwardArgs);
        var backwardArgs = new BackwardArgs<T>
        {
            Q = qb.View, K = kb.View, V = vb.View, DO = dOb.View, DRem = dRemb.View, LogRem = logRem.View,
            AccSnapshots = accSnapshots.View, PrefixSnapshots = prefixSnapshots.View,
            DQ = dq.View, DK = dk.View, DV = dv.View,
            AccumulatorScratch = needsScratch ? scratchBuffer.View : ArrayView<float>.Empty,
            Rows = AttentionRows.Contiguous(shape.Heads, shape.KeyValueHeads, shape.Length, shape.HeadDim), Length = shape.Length, HeadDim = shape.HeadDim, AttendCurrent = attendCurrent ? 1 : 0, SnapshotTiles = tiles,
            Scale = scale,
        };
        backwardLauncher.Launch(backward.Query, stream, shape, backwardArgs);
        backwardLauncher.Launch(backward.Key, stream, shape, backwardArgs);
        stream.Synchronize();
        return new Result<T>(o.GetAsArray1D(), rem.GetAsArray1D(), logRem.GetAsArray1D(),
            dq.GetAsArray1D(), dk.GetAsArray1D(), dv.GetAsArray1D());
    }

    /// <summary>Relative RMS error of 16-bit gradients against the exact ones, and the floor: that of round(exact).</summary>
    private static (double Error, double Floor) GradientError(ushort[] actual, double[] exact, bool bf16) =>
        (RelativeRms(actual.Select(b => ToDouble(b, bf16)).ToArray(), exact),
         RelativeRms(exact.Select(e => ToDouble(FromDouble(e, bf16), bf16)).ToArray(), exact));
}
