using System;
using System.Diagnostics;
using System.Linq;
using ILGPU;
using ILGPU.Runtime;
using ILGPU.Runtime.Cuda;
using NUnit.Framework;
using StickBreaking.ILGPU.Tests.Infrastructure;
using StickBreaking.ILGPU.Tests.Reference;
using Half = System.Half;
using static StickBreaking.ILGPU.Tests.Rounding;

namespace StickBreaking.ILGPU.Tests;

/// <summary>The storage type of a decode test.</summary>
/// <summary>
/// Queries behind a key/value cache (docs/math.md, "Queries behind a cache", "Split and merge", "Grouped-query heads") on
/// every backend, for fp32, fp16 and bf16 storage: against the float64 reference written from the definition on the same
/// (rounded) cache, against the library's own full forward on the whole sequence (its last n rows), split into 2 and 5
/// chunks against no split, the public merge of two and five parts against the unsplit result, NaN in slots past each
/// sequence's length and in keys no query sees (never reaching an output), and bad inputs (each an exception naming the
/// argument, nothing enqueued). Tolerances: fp32 2e-5 max abs; 16-bit o within 2x its rounding floor (or 1.5 ulp of the
/// largest |o|), rem and LogRem 2e-5.
/// </summary>
public sealed class DecodeTests(string backend) : BackendFixture(backend)
{
    /// <summary>One test shape: lengths per sequence (each below the capacity unless equal is wanted).</summary>
    public sealed record Case(int B, int Hq, int Hkv, int N, int Capacity, int D, int[] Lengths, bool AttendCurrent)
    {
        public DecodeShape Shape => new(B, Hq, Hkv, N, Capacity, D);

        public override string ToString() =>
            $"B={B} Hq={Hq} Hkv={Hkv} n={N} cap={Capacity} D={D} L=[{string.Join(",", Lengths)}]{(AttendCurrent ? " current" : "")}";
    }

    private static readonly Case[] Cases =
    [
        new(2, 4, 1, 1, 70, 16, [53, 31], false),   // MQA decode, lengths differ, capacity above both
        new(2, 4, 2, 3, 64, 32, [40, 57], true),    // GQA chunked prefill
        new(1, 2, 2, 4, 50, 16, [45], false),       // Hkv = Hq
        new(2, 3, 3, 1, 40, 50, [33, 1], false),    // a sequence of one token: its query sees nothing
        new(1, 8, 2, 2, 80, 64, [77], false),       // 4 query heads per kv head, D = 64
    ];

    private static readonly object[] CaseSource =
        (from c in Cases from s in Enum.GetValues<StorageType>() select new object[] { c, s }).ToArray();

    [TestCaseSource(nameof(CaseSource))]
    public void MatchesFloat64FromTheDefinition(Case c, StorageType storage)
    {
        var x = Make(c, storage, seed: c.Capacity + c.D);
        var got = Run(Attention, c, storage, x);
        var exact = DecodeReference.Forward(ToDouble(x.Q), ToDouble(x.K), ToDouble(x.V), c.Lengths, null, c.B, c.Hq, c.Hkv, c.N,
            c.Capacity, c.D, 1.0 / Math.Sqrt(c.D), c.AttendCurrent);
        CheckClose(got, exact, storage, $"{Backend} {storage} {c}");
    }

    [TestCase(StorageType.Fp32, 1, false)]
    [TestCase(StorageType.Fp32, 5, true)]
    [TestCase(StorageType.Bf16, 3, false)]
    [TestCase(StorageType.Fp16, 1, true)]
    public void LastRowsOfTheLibraryForwardOnTheWholeSequence(StorageType storage, int n, bool attendCurrent)
    {
        // Hq = Hkv, capacity = L: the cache is the whole sequence's k and v; the queries are its last n rows.
        const int L = 45, H = 2, D = 32;
        var c = new Case(1, H, H, n, L, D, [L], attendCurrent);
        var whole = TestInputs.Standard(1, H, L, D, seed: 41);
        float[] qWhole = Round(whole.Q, storage), k = Round(whole.K, storage), v = Round(whole.V, storage);
        var q = new float[H * n * D];
        for (int h = 0; h < H; h++)
            Array.Copy(qWhole, (h * L + L - n) * D, q, h * n * D, n * D);
        var got = Run(Attention, c, storage, new Inputs(q, k, v));
        var shape = new AttentionShape(1, H, L, D);
        var options = new StickBreakingOptions { AttendCurrent = attendCurrent };
        float[] fo, frem, flog;
        switch (storage)
        {
            case StorageType.Fp32:
                var y = Attention.Forward(qWhole, k, v, shape, options);
                (fo, frem, flog) = (y.O, y.Rem, y.LogRem);
                break;
            case StorageType.Fp16:
                var yh = Attention.Forward(ToHalf(qWhole), ToHalf(k), ToHalf(v), shape, options);
                (fo, frem, flog) = (Widen(yh.O), yh.Rem, yh.LogRem);
                break;
            default:
                var yb = Attention.Forward(ToBf16(qWhole), ToBf16(k), ToBf16(v), shape, options);
                (fo, frem, flog) = (Widen(yb.O), yb.Rem, yb.LogRem);
                break;
        }
        var exact = Float64Reference.Forward(ToDouble(qWhole), ToDouble(k), ToDouble(v), 1, H, L, D, 1.0 / Math.Sqrt(D), attendCurrent);
        var lastO = new double[H * n * D];
        var lastRem = new double[H * n];
        var lastLog = new double[H * n];
        var forwardO = new float[H * n * D];
        var forwardRem = new float[H * n];
        var forwardLog = new float[H * n];
        for (int h = 0; h < H; h++)
        {
            Array.Copy(fo, (h * L + L - n) * D, forwardO, h * n * D, n * D);
            Array.Copy(frem, h * L + L - n, forwardRem, h * n, n);
            Array.Copy(flog, h * L + L - n, forwardLog, h * n, n);
            Array.Copy(exact.O, (h * L + L - n) * D, lastO, h * n * D, n * D);
            Array.Copy(exact.Rem, h * L + L - n, lastRem, h * n, n);
            Array.Copy(exact.LogRem, h * L + L - n, lastLog, h * n, n);
        }
        // The library's forward (last n rows) is one more 16-bit result near the same exact values: decode within the
        // tolerance of it, taking the forward's own rounding as the floor's second share.
        double floor = storage == StorageType.Fp32 ? 0 : lastO.Max(e => Math.Abs(RoundTrip(e, storage) - e));
        double ulp = storage == StorageType.Fp32 ? 0 : Ulp(lastO.Max(Math.Abs), storage);
        double oTolerance = storage == StorageType.Fp32 ? 2e-5 : Math.Max(2 * floor, 1.5 * ulp);
        double oError = MaxAbs(got.O, forwardO);
        TestContext.Out.WriteLine($"{Backend} {storage} n={n}: |decode - forward| o {oError:E2} (tolerance {oTolerance:E2}), " +
            $"rem {MaxAbs(got.Rem, forwardRem):E2}, LogRem {MaxAbs(got.LogRem, forwardLog):E2}");
        Assert.Multiple(() =>
        {
            Assert.That(oError, Is.LessThanOrEqualTo(oTolerance), "o against the forward's last rows");
            Assert.That(MaxAbs(got.Rem, forwardRem), Is.LessThanOrEqualTo(2e-5), "rem against the forward's last rows");
            Assert.That(MaxAbs(got.LogRem, forwardLog), Is.LessThanOrEqualTo(2e-5), "LogRem against the forward's last rows");
        });
        CheckClose(got, new ReferenceForward(lastO, lastRem, lastLog), storage, $"{Backend} {storage} n={n} against float64");
    }

    [TestCase(StorageType.Fp32, 2)]
    [TestCase(StorageType.Fp32, 5)]
    [TestCase(StorageType.Bf16, 2)]
    [TestCase(StorageType.Fp16, 5)]
    [TestCase(StorageType.Bf16, 10)]   // the merge's batches of eight parts, then the rest one by one
    [TestCase(StorageType.Fp32, 14)]
    public void SplitIntoChunksMatchesNoSplit(StorageType storage, int chunks)
    {
        var c = new Case(2, 4, 2, 2, 72, 32, [70, 23], false);
        var x = Make(c, storage, seed: 7 * chunks);
        var whole = RunChunks(c, storage, x, 1);
        var split = RunChunks(c, storage, x, chunks);
        Assert.That(Attention.LastDecodeChunks, Is.EqualTo(chunks), "chunks run");
        var again = RunChunks(c, storage, x, chunks);
        var exact = DecodeReference.Forward(ToDouble(x.Q), ToDouble(x.K), ToDouble(x.V), c.Lengths, null, c.B, c.Hq, c.Hkv, c.N,
            c.Capacity, c.D, 1.0 / Math.Sqrt(c.D), c.AttendCurrent);
        CheckClose(split, exact, storage, $"{Backend} {storage} {chunks} chunks");
        double ulp = storage == StorageType.Fp32 ? 0 : Ulp(exact.O.Max(Math.Abs), storage);
        Assert.Multiple(() =>
        {
            Assert.That(MaxAbs(split.O, whole.O), Is.LessThanOrEqualTo(storage == StorageType.Fp32 ? 2e-5 : ulp), "o split vs whole");
            Assert.That(MaxAbs(split.Rem, whole.Rem), Is.LessThanOrEqualTo(2e-5), "rem split vs whole");
            Assert.That(MaxAbs(split.LogRem, whole.LogRem), Is.LessThanOrEqualTo(2e-5), "LogRem split vs whole");
            Assert.That(Bits(again.O), Is.EqualTo(Bits(split.O)), "repeat: o bitwise");
            Assert.That(Bits(again.LogRem), Is.EqualTo(Bits(split.LogRem)), "repeat: LogRem bitwise");
        });
    }

    [TestCase(StorageType.Fp32, 2)]
    [TestCase(StorageType.Fp32, 5)]
    [TestCase(StorageType.Bf16, 2)]
    [TestCase(StorageType.Fp16, 5)]
    public void PublicMergeOfPartsMatchesTheUnsplitResult(StorageType storage, int parts)
    {
        // One sequence of L keys cut into `parts` caches (as on several devices), nearest part last in the sequence; each
        // part's Decode is told how many keys follow it (keysAfter), and the parts are merged nearest first.
        var c = new Case(1, 4, 2, 2, 64, 16, [64], true);
        var x = Make(c, storage, seed: 3 + parts);
        var whole = RunChunks(c, storage, x, 1);
        int[] cuts = Enumerable.Range(0, parts + 1).Select(p => c.Capacity - p * c.Capacity / parts).ToArray();   // cuts[0] = L
        (float[] O, float[] Rem, float[] LogRem) total = (Array.Empty<float>(), Array.Empty<float>(), Array.Empty<float>());
        for (int p = 0; p < parts; p++)
        {
            int hi = cuts[p], lo = cuts[p + 1], len = hi - lo;
            var part = new Case(1, c.Hq, c.Hkv, c.N, len, c.D, [len], c.AttendCurrent);
            var k = new float[c.Hkv * len * c.D];
            var v = new float[k.Length];
            for (int kv = 0; kv < c.Hkv; kv++)
            {
                Array.Copy(x.K, (kv * c.Capacity + lo) * c.D, k, kv * len * c.D, len * c.D);
                Array.Copy(x.V, (kv * c.Capacity + lo) * c.D, v, kv * len * c.D, len * c.D);
            }
            var y = Run(Attention, part, storage, new Inputs(x.Q, k, v), keysAfter: [c.Capacity - hi]);
            if (p == 0)
            {
                total = y;
                continue;
            }
            total = MergeHost(storage, total, y, c.D);
        }
        double ulp = storage == StorageType.Fp32 ? 0 : Ulp(whole.O.Max(MathF.Abs), storage);
        double oTolerance = storage == StorageType.Fp32 ? 2e-5 : (parts + 1) * ulp;   // each 16-bit part and merge rounds once
        TestContext.Out.WriteLine($"{Backend} {storage} {parts} parts: |merged - whole| o {MaxAbs(total.O, whole.O):E2}, LogRem {MaxAbs(total.LogRem, whole.LogRem):E2}");
        Assert.Multiple(() =>
        {
            Assert.That(MaxAbs(total.O, whole.O), Is.LessThanOrEqualTo(oTolerance), "o");
            Assert.That(MaxAbs(total.Rem, whole.Rem), Is.LessThanOrEqualTo(2e-5), "rem");
            Assert.That(MaxAbs(total.LogRem, whole.LogRem), Is.LessThanOrEqualTo(2e-5), "LogRem");
        });
    }

    [TestCase(StorageType.Fp32, 1)]
    [TestCase(StorageType.Bf16, 1)]
    [TestCase(StorageType.Fp32, 3)]
    [TestCase(StorageType.Fp16, 3)]
    public void NaNInSlotsNoQuerySeesReachesNoOutput(StorageType storage, int chunks)
    {
        // Slots past each length are NaN (Make), and so are k and v of the last key present, which no query sees
        // without AttendCurrent (query i sees keys below L - n + i <= L - 1).
        var c = new Case(2, 2, 1, 3, 48, 16, [40, 29], false);
        var x = Make(c, storage, seed: 19);
        for (int b = 0; b < c.B; b++)
        {
            int at = ((b * c.Hkv) * c.Capacity + c.Lengths[b] - 1) * c.D;
            for (int d = 0; d < c.D; d++)
            {
                x.K[at + d] = float.NaN;
                x.V[at + d] = float.PositiveInfinity;
            }
        }
        var got = RunChunks(c, storage, x, chunks);
        Assert.That(got.O.Concat(got.Rem).Concat(got.LogRem).All(float.IsFinite), Is.True, "every output finite");
        var exact = DecodeReference.Forward(ToDouble(x.Q), ToDouble(x.K), ToDouble(x.V), c.Lengths, null, c.B, c.Hq, c.Hkv, c.N,
            c.Capacity, c.D, 1.0 / Math.Sqrt(c.D), c.AttendCurrent);
        CheckClose(got, exact, storage, $"{Backend} {storage} poisoned, {chunks} chunks");
    }

    [Test]
    public void DeviceLevelGivesTheHostLevelBits()
    {
        var c = new Case(2, 4, 2, 2, 40, 32, [37, 12], false);
        var x = Make(c, StorageType.Bf16, seed: 23);
        var host = Run(Attention, c, StorageType.Bf16, x);
        var acc = Accelerator;
        using var q = acc.Allocate1D(ToBf16(x.Q));
        using var k = acc.Allocate1D(ToBf16(x.K));
        using var v = acc.Allocate1D(ToBf16(x.V));
        using var lengths = acc.Allocate1D(c.Lengths);
        using var o = acc.Allocate1D<BFloat16>(c.Shape.QueryLength);
        using var rem = acc.Allocate1D<float>(c.Shape.RowCount);
        using var logRem = acc.Allocate1D<float>(c.Shape.RowCount);
        Attention.Decode(acc.DefaultStream, c.Shape, q.View, k.View, v.View, lengths.View, o.View, rem.View, logRem.View);
        acc.Synchronize();
        Assert.Multiple(() =>
        {
            Assert.That(o.GetAsArray1D().Select(b => (float)b), Is.EqualTo(host.O));
            Assert.That(rem.GetAsArray1D(), Is.EqualTo(host.Rem));
            Assert.That(logRem.GetAsArray1D(), Is.EqualTo(host.LogRem));
        });
    }

    [Test]
    public void BadInputsAreRefusedNamingTheArgument()
    {
        var c = new Case(2, 4, 2, 2, 16, 8, [10, 16], false);
        var shape = c.Shape;
        var q = new float[shape.QueryLength];
        var k = new float[shape.CacheLength];
        var acc = Accelerator;
        using var dq = acc.Allocate1D<float>(shape.QueryLength);
        using var dk = acc.Allocate1D<float>(shape.CacheLength);
        using var dLengths = acc.Allocate1D(new[] { 10, 17 });
        using var o = acc.Allocate1D<float>(shape.QueryLength);
        using var rows = acc.Allocate1D<float>(2 * shape.RowCount);
        var rem = rows.View.SubView(0, shape.RowCount);
        var logRem = rows.View.SubView(shape.RowCount, shape.RowCount);
        Assert.Multiple(() =>
        {
            Assert.That(Assert.Throws<ArgumentOutOfRangeException>(() => Attention.Decode(q, k, k, [10, 16], shape with { KeyValueHeads = 3 }))!.ParamName, Is.EqualTo("shape"), "Hq not a multiple of Hkv");
            Assert.That(Assert.Throws<ArgumentOutOfRangeException>(() => Attention.Decode(q, k, k, [10, 16], shape with { Queries = 17 }))!.ParamName, Is.EqualTo("shape"), "n > capacity");
            Assert.That(Assert.Throws<ArgumentOutOfRangeException>(() => Attention.Decode(q, k, k, [10, 17], shape))!.ParamName, Is.EqualTo("cacheLengths"), "length above capacity");
            Assert.That(Assert.Throws<ArgumentOutOfRangeException>(() => Attention.Decode(q, k, k, [1, 16], shape))!.ParamName, Is.EqualTo("cacheLengths"), "n > L");
            Assert.That(Assert.Throws<ArgumentOutOfRangeException>(() => Attention.Decode(q, k, k, [-1, 16], shape))!.ParamName, Is.EqualTo("cacheLengths"), "negative length");
            Assert.That(Assert.Throws<ArgumentException>(() => Attention.Decode(q.AsSpan(1), k, k, [10, 16], shape))!.ParamName, Is.EqualTo("q"), "q length");
            Assert.That(Assert.Throws<ArgumentException>(() => Attention.Decode(q, k, k.AsSpan(1), [10, 16], shape))!.ParamName, Is.EqualTo("vCache"), "vCache length");
            Assert.That(Assert.Throws<ArgumentException>(() => Attention.Decode(q, k, k, [10], shape))!.ParamName, Is.EqualTo("cacheLengths"), "cacheLengths length");
            Assert.That(Assert.Throws<ArgumentOutOfRangeException>(() => Attention.Decode(acc.DefaultStream, shape, dq.View, dk.View, dk.View, dLengths.View,
                o.View, rem, logRem))!.ParamName, Is.EqualTo("cacheLengths"), "device length above capacity");
            Assert.That(Assert.Throws<ArgumentException>(() => Attention.Decode(acc.DefaultStream, shape, dq.View, dk.View, dk.View, dLengths.View,
                dq.View, rem, logRem))!.ParamName, Is.EqualTo("o"), "o overlaps q");
            Assert.That(Assert.Throws<ArgumentException>(() => Attention.Decode(acc.DefaultStream, shape, dq.View, dk.View, dk.View, dLengths.View,
                o.View.SubView(1, shape.QueryLength - 1), rem, logRem))!.ParamName, Is.EqualTo("o"), "o length");
            Assert.That(Assert.Throws<ArgumentException>(() => Attention.Merge(new float[32], new float[4], new float[32], new float[3], 8))!.ParamName, Is.EqualTo("logRemFar"), "merge rows");
            Assert.That(Assert.Throws<ArgumentException>(() => Attention.Merge(new float[31], new float[4], new float[32], new float[4], 8))!.ParamName, Is.EqualTo("oNear"), "merge o length");
        });
        // Still usable after the refusals.
        var good = Make(c, StorageType.Fp32, seed: 2);
        var y = Run(Attention, c, StorageType.Fp32, good);
        Assert.That(y.O.All(float.IsFinite), Is.True);
    }

    [TestCase(StorageType.Bf16, 1)]
    [TestCase(StorageType.Fp32, 3)]
    [TestCase(StorageType.Fp16, 2)]
    public void GroupsOf256PrefetchTheNextTile(StorageType storage, int chunks)
    {
        // With 256 threads a group stages a whole tile in two 16-byte words per thread and loads the next tile into
        // registers while it works on this one (the GPU path); the CPU accelerator's own groups of 32 never do.
        if (Accelerator.MaxNumThreadsPerGroup < 256)
            Assert.Ignore("groups of 256 threads are not available here");
        var c = new Case(2, 4, 2, 1, 150, 32, [150, 61], false);   // D = 32: tiles of 64 keys, 4 or 8 words a key
        var x = Make(c, storage, seed: 17);
        (float[] O, float[] Rem, float[] LogRem) got;
        Attention.DecodeGroupSizeOverride = 256;
        Attention.DecodeChunksOverride = chunks;
        try
        {
            got = Run(Attention, c, storage, x);
        }
        finally
        {
            Attention.DecodeGroupSizeOverride = null;
            Attention.DecodeChunksOverride = null;
        }
        var exact = DecodeReference.Forward(ToDouble(x.Q), ToDouble(x.K), ToDouble(x.V), c.Lengths, null, c.B, c.Hq, c.Hkv, c.N,
            c.Capacity, c.D, 1.0 / Math.Sqrt(c.D), c.AttendCurrent);
        CheckClose(got, exact, storage, $"{Backend} {storage} groups of 256, {chunks} chunks");
    }

    [TestCase(StorageType.Bf16)]
    [TestCase(StorageType.Fp32)]
    public void LongCacheWithTheChosenSplit(StorageType storage)
    {
        // A cache long enough that a GPU splits it (the chunk count the instance picks for its accelerator).
        var c = new Case(2, 8, 2, 1, 1100, 128, [1024, 700], false);
        var x = Make(c, storage, seed: 31);
        var got = Run(Attention, c, storage, x);
        TestContext.Out.WriteLine($"{Backend}: {Attention.LastDecodeChunks} chunks");
        var exact = DecodeReference.Forward(ToDouble(x.Q), ToDouble(x.K), ToDouble(x.V), c.Lengths, null, c.B, c.Hq, c.Hkv, c.N,
            c.Capacity, c.D, 1.0 / Math.Sqrt(c.D), c.AttendCurrent);
        CheckClose(got, exact, storage, $"{Backend} {storage} {c}");
    }

    private static void Fill(Index1D i, ArrayView<ushort> x, int seed)
    {
        uint h = (uint)i.X * 2654435761u ^ (uint)seed * 40503u;
        h ^= h >> 15;
        h *= 2246822519u;
        h ^= h >> 13;
        float f = ((h & 0xFFFF) / 65536f - 0.5f) * 0.5f;
        x[i] = (ushort)(Interop.FloatAsInt(f) >> 16);   // bf16 bits (truncated), in [-0.25, 0.25]
    }

    /// <summary>
    /// CUDA only: ms and TB/s of K + V read at the target shapes (bf16, D = 128), through the public device-level call (which
    /// reads the lengths back first) and through the kernels alone, for the chosen split and a sweep of chunk counts.
    /// </summary>
    [Test]
    public void TimingOnCuda()
    {
        if (Backend != Backends.Cuda)
            Assert.Ignore("CUDA only");
        var acc = Accelerator;
        var fill = acc.LoadAutoGroupedStreamKernel<Index1D, ArrayView<ushort>, int>(Fill);
        (int B, int Hq, int Hkv, int L, int n)[] shapes = [(32, 32, 8, 32768, 1), (1, 32, 8, 32768, 1), (32, 12, 12, 8192, 1), (1, 32, 8, 32768, 4), (8, 32, 8, 32768, 1)];
        foreach (var (B, Hq, Hkv, L, n) in shapes)
        {
            var shape = new DecodeShape(B, Hq, Hkv, n, L, 128);
            using var q = acc.Allocate1D<ushort>(shape.QueryLength);
            using var k = acc.Allocate1D<ushort>(shape.CacheLength);
            using var v = acc.Allocate1D<ushort>(shape.CacheLength);
            using var lengths = acc.Allocate1D(Enumerable.Repeat(L, B).ToArray());
            using var o = acc.Allocate1D<ushort>(shape.QueryLength);
            using var rem = acc.Allocate1D<float>(shape.RowCount);
            using var logRem = acc.Allocate1D<float>(shape.RowCount);
            fill((int)q.Length, q.View, 1);
            fill((int)k.Length, k.View, 2);
            fill((int)v.Length, v.View, 3);
            acc.Synchronize();
            double bytes = 2.0 * shape.CacheLength * 2;
            var qb = ((ArrayView<ushort>)q.View).Cast<BFloat16>();
            var kb = ((ArrayView<ushort>)k.View).Cast<BFloat16>();
            var vb = ((ArrayView<ushort>)v.View).Cast<BFloat16>();
            var ob = ((ArrayView<ushort>)o.View).Cast<BFloat16>();
            double Time(Action call, int runs)
            {
                call();
                acc.Synchronize();
                var watch = Stopwatch.StartNew();
                for (int r = 0; r < runs; r++)
                    call();
                acc.Synchronize();
                return watch.Elapsed.TotalMilliseconds / runs;
            }
            int runs = B >= 8 ? 20 : 200;
            double publicMs = Time(() => Attention.Decode(acc.DefaultStream, shape, qb, kb, vb, lengths.View, ob, rem.View, logRem.View), runs);
            int chosen = Attention.LastDecodeChunks;
            double kernelMs = Time(() => Attention.DecodeUnchecked(acc.DefaultStream, shape, qb, kb, vb, lengths.View, L, ob, rem.View, logRem.View), runs);
            TestContext.Out.WriteLine($"bf16 {shape}: public call {publicMs:F3} ms ({bytes / publicMs / 1e9:F2} TB/s), kernels alone " +
                $"{kernelMs:F3} ms ({bytes / kernelMs / 1e9:F2} TB/s), {chosen} chunks chosen");
            Assert.That(rem.GetAsArray1D().All(float.IsFinite), "finite rem");
            foreach (int chunks in new[] { 1, 2, 4, 8, 16, 32, 64, 128 })
            {
                Attention.DecodeChunksOverride = chunks;
                try
                {
                    double ms = Time(() => Attention.DecodeUnchecked(acc.DefaultStream, shape, qb, kb, vb, lengths.View, L, ob, rem.View, logRem.View), runs);
                    TestContext.Out.WriteLine($"    {chunks,4} chunks: {ms:F3} ms ({bytes / ms / 1e9:F2} TB/s)");
                }
                finally
                {
                    Attention.DecodeChunksOverride = null;
                }
            }
        }
    }

    // ------------------------------------------------------------------------------------------------

    internal sealed record Inputs(float[] Q, float[] K, float[] V);

    /// <summary>Standard inputs rounded to the storage; slots past each sequence's length are NaN.</summary>
    internal static Inputs Make(Case c, StorageType storage, int seed)
    {
        var normal = new Random(seed);
        double N() => Math.Sqrt(-2 * Math.Log(1 - normal.NextDouble())) * Math.Cos(2 * Math.PI * normal.NextDouble());
        float[] Fill(long count, Func<double> next) => Round(Enumerable.Range(0, (int)count).Select(_ => (float)next()).ToArray(), storage);
        var shape = c.Shape;
        var q = Fill(shape.QueryLength, () => 0.25 * (N() + 1));
        var k = Fill(shape.CacheLength, () => 0.25 * (N() - 1));
        var v = Fill(shape.CacheLength, () => 0.25 * N());
        for (int b = 0; b < c.B; b++)
            for (int kv = 0; kv < c.Hkv; kv++)
                for (int j = c.Lengths[b]; j < c.Capacity; j++)
                    for (int d = 0; d < c.D; d++)
                    {
                        long at = (((long)b * c.Hkv + kv) * c.Capacity + j) * c.D + d;
                        k[at] = float.NaN;
                        v[at] = float.NaN;
                    }
        return new Inputs(q, k, v);
    }

    private (float[] O, float[] Rem, float[] LogRem) RunChunks(Case c, StorageType storage, Inputs x, int chunks)
    {
        Attention.DecodeChunksOverride = chunks;
        try
        {
            return Run(Attention, c, storage, x);
        }
        finally
        {
            Attention.DecodeChunksOverride = null;
        }
    }

    internal static (float[] O, float[] Rem, float[] LogRem) Run(StickBreakingAttention attention, Case c, StorageType storage, Inputs x,
        int[]? keysAfter = null)
    {
        var options = new StickBreakingOptions { AttendCurrent = c.AttendCurrent };
        switch (storage)
        {
            case StorageType.Fp32:
                var y = attention.Decode(x.Q, x.K, x.V, c.Lengths, c.Shape, options, keysAfter);
                return (y.O, y.Rem, y.LogRem);
            case StorageType.Fp16:
                var yh = attention.Decode(ToHalf(x.Q), ToHalf(x.K),
                    ToHalf(x.V), c.Lengths, c.Shape, options, keysAfter);
                return (Widen(yh.O), yh.Rem, yh.LogRem);
            default:
                var yb = attention.Decode(ToBf16(x.Q), ToBf16(x.K),
                    ToBf16(x.V), c.Lengths, c.Shape, options, keysAfter);
                return (Widen(yb.O), yb.Rem, yb.LogRem);
        }
    }

    private (float[] O, float[] Rem, float[] LogRem) MergeHost(StorageType storage, (float[] O, float[] Rem, float[] LogRem) near,
        (float[] O, float[] Rem, float[] LogRem) far, int headDim)
    {
        switch (storage)
        {
            case StorageType.Fp32:
                var y = Attention.Merge(near.O, near.LogRem, far.O, far.LogRem, headDim);
                return (y.O, y.Rem, y.LogRem);
            case StorageType.Fp16:
                var yh = Attention.Merge(ToHalf(near.O), near.LogRem, ToHalf(far.O), far.LogRem, headDim);
                return (Widen(yh.O), yh.Rem, yh.LogRem);
            default:
                var yb = Attention.Merge(ToBf16(near.O), near.LogRem, ToBf16(far.O), far.LogRem, headDim);
                return (Widen(yb.O), yb.Rem, yb.LogRem);
        }
    }

    internal static void CheckClose((float[] O, float[] Rem, float[] LogRem) got, ReferenceForward exact, StorageType storage, string what)
    {
        double oTolerance = 2e-5;
        double floor = 0;
        if (storage != StorageType.Fp32)
        {
            floor = exact.O.Max(e => Math.Abs(RoundTrip(e, storage) - e));
            oTolerance = Math.Max(2 * floor, 1.5 * Ulp(exact.O.Max(Math.Abs), storage));
        }
        double oError = MaxAbs(got.O, exact.O);
        TestContext.Out.WriteLine($"{what}: o {oError:E2}{(floor > 0 ? $" ({oError / floor:F2} x floor)" : "")}, " +
            $"rem {MaxAbs(got.Rem, exact.Rem):E2}, LogRem {MaxAbs(got.LogRem, exact.LogRem):E2}");
        Assert.Multiple(() =>
        {
            Assert.That(oError, Is.LessThanOrEqualTo(oTolerance), "o");
            Assert.That(MaxAbs(got.Rem, exact.Rem), Is.LessThanOrEqualTo(2e-5), "rem");
            // LogRem in the hundreds is an fp32 sum of hundreds of terms (the rule of Forward16ApiTests).
            Assert.That(MaxAbs(got.LogRem, exact.LogRem), Is.LessThanOrEqualTo(2e-5 + 1e-6 * exact.LogRem.Max(Math.Abs)), "LogRem");
        });
    }

    /// <summary>Max abs difference; NaN anywhere counts as infinite.</summary>
    internal static double MaxAbs(float[] a, double[] b)
    {
        Assert.That(a.Length, Is.EqualTo(b.Length), "lengths");
        double max = 0;
        for (int i = 0; i < a.Length; i++)
        {
            double e = Math.Abs(a[i] - b[i]);
            max = double.IsNaN(e) ? double.PositiveInfinity : Math.Max(max, e);
        }
        return max;
    }

    private static double MaxAbs(float[] a, float[] b) => MaxAbs(a, b.Select(f => (double)f).ToArray());

    internal static double[] ToDouble(float[] x) => x.Select(f => (double)f).ToArray();

    internal static int[] Bits(float[] x) => x.Select(BitConverter.SingleToInt32Bits).ToArray();
}

/// <summary>The decode reference itself: for Hq = Hkv its rows are the last n rows of the float64 forward on the whole sequence.</summary>
public sealed class DecodeReferenceTests
{
    [TestCase(1, false)]
    [TestCase(4, true)]
    [TestCase(7, false)]
    public void LastRowsOfTheFloat64Forward(int n, bool attendCurrent)
    {
        const int L = 30, H = 2, D = 8;
        var x = TestInputs.Standard(1, H, L, D, seed: 5);
        double[] qWhole = TestInputs.ToDouble(x.Q), k = TestInputs.ToDouble(x.K), v = TestInputs.ToDouble(x.V);
        var q = new double[H * n * D];
        for (int h = 0; h < H; h++)
            Array.Copy(qWhole, (h * L + L - n) * D, q, h * n * D, n * D);
        var whole = Float64Reference.Forward(qWhole, k, v, 1, H, L, D, 0.3, attendCurrent);
        var decode = DecodeReference.Forward(q, k, v, [L], null, 1, H, H, n, L, D, 0.3, attendCurrent);
        for (int h = 0; h < H; h++)
            for (int i = 0; i < n; i++)
            {
                Assert.That(decode.LogRem[h * n + i], Is.EqualTo(whole.LogRem[h * L + L - n + i]).Within(1e-12));
                for (int d = 0; d < D; d++)
                    Assert.That(decode.O[(h * n + i) * D + d], Is.EqualTo(whole.O[(h * L + L - n + i) * D + d]).Within(1e-12));
            }
    }
}

/// <summary>The decode and merge kernels compile to PTX for SM_90 without a GPU, with no local memory.</summary>
public sealed class DecodePtxTests
{
    [TestCase(typeof(float), typeof(StickBreaking.ILGPU.Kernels.Common.Fp32Element))]
    [TestCase(typeof(ushort), typeof(StickBreaking.ILGPU.Kernels.Common.Fp16Storage))]
    [TestCase(typeof(ushort), typeof(StickBreaking.ILGPU.Kernels.Common.Bf16Storage))]
    public void DecodeKernelUsesNoLocalMemory(Type stored, Type element) =>
        _ = Check(typeof(StickBreaking.ILGPU.Kernels.Decode.DecodeKernel).GetMethod("Kernel")!.MakeGenericMethod(stored, element), $"decode.{element.Name}");

    /// <summary>
    /// The warp decode: no local memory; the 16-bit lanes' q . k on the tensor cores (mma.sync of their type, and none of
    /// the other), with no local memory once the loader's rewrite (PtxOperandSlots) made the inline PTX's operand slots
    /// registers, and their staging ring (declared in the PTX, filled by cp.async); the fp32 lane without any mma or ring.
    /// </summary>
    [TestCase(typeof(float), typeof(StickBreaking.ILGPU.Kernels.Decode.Fp32Lane), null)]
    [TestCase(typeof(ushort), typeof(StickBreaking.ILGPU.Kernels.Decode.Fp16Lane), "f16")]
    [TestCase(typeof(ushort), typeof(StickBreaking.ILGPU.Kernels.Decode.Bf16Lane), "bf16")]
    public void WarpDecodeKernelUsesNoLocalMemory(Type stored, Type lane, string? mmaType)
    {
        var kernel = typeof(StickBreaking.ILGPU.Kernels.Decode.DecodeWarpKernel).GetMethod("Kernel")!.MakeGenericMethod(stored, lane);
        if (mmaType is null)
        {
            string ptx = Check(kernel, $"warpdecode.{lane.Name}");
            Assert.That(ptx, Does.Not.Contain("mma.sync"));
            Assert.That(ptx, Does.Not.Contain("sbDecodeRing"), "the fp32 lanes load into registers, no ring");
            return;
        }
        string raw = Compile(kernel, $"warpdecode.{lane.Name}");
        Assert.That(StickBreaking.ILGPU.Launch.PtxOperandSlots.TryPromote(raw, out string promoted), Is.True, "the loader's rewrite applies");
        if (Environment.GetEnvironmentVariable("STICKBREAKING_PTX_DIR") is { Length: > 0 } dir)
            System.IO.File.WriteAllText(System.IO.Path.Combine(dir, $"warpdecode.{lane.Name}.promoted.ptx"), promoted);
        Assert.That(promoted, Does.Contain($"mma.sync.aligned.m16n8k16.row.col.f32.{mmaType}.{mmaType}.f32"));
        Assert.That(promoted, Does.Not.Contain(mmaType == "f16" ? ".bf16.bf16" : ".f16.f16"));
        // The staging ring: declared once in the PTX, its size the emulation's, filled by cp.async.
        Assert.That(System.Text.RegularExpressions.Regex.Matches(promoted, @"\.shared \.align 16 \.b8 sbDecodeRing\[(\d+)\];")
            .Select(m => int.Parse(m.Groups[1].Value, System.Globalization.CultureInfo.InvariantCulture)),
            Is.EqualTo(new[] { StickBreaking.ILGPU.Kernels.Decode.DecodeRing.EmulatedBytes }), "one ring declaration of the ring's size");
        Assert.That(promoted, Does.Contain("cp.async.cg.shared.global [sbS]"));
        Assert.That(promoted, Does.Contain("cp.async.wait_group"));
        Assert.That(System.Text.RegularExpressions.Regex.Matches(promoted, @"\.local\b"), Is.Empty, "local memory");
    }

    [TestCase(typeof(ushort), typeof(StickBreaking.ILGPU.Kernels.Common.Bf16Storage))]
    public void MergeKernelUsesNoLocalMemory(Type stored, Type element) =>
        _ = Check(typeof(StickBreaking.ILGPU.Kernels.Decode.MergeKernel).GetMethod("Kernel")!.MakeGenericMethod(typeof(float),
            typeof(StickBreaking.ILGPU.Kernels.Common.Fp32Element), stored, element), $"merge.{element.Name}");

    private static string Check(System.Reflection.MethodInfo kernel, string name)
    {
        string ptx = Compile(kernel, name);
        Assert.That(System.Text.RegularExpressions.Regex.Matches(ptx, @"\.local\b"), Is.Empty, "local memory");
        return ptx;
    }

    private static string Compile(System.Reflection.MethodInfo kernel, string name)
    {
        string ptx = Ptx.Compile(kernel);
        if (Environment.GetEnvironmentVariable("STICKBREAKING_PTX_DIR") is { Length: > 0 } dir)
            System.IO.File.WriteAllText(System.IO.Path.Combine(dir, $"{name}.ptx"), ptx);
        Assert.That(ptx, Does.Contain(".entry"));
        return ptx;
    }
}

/// <summary>
/// The warp decode kernel (<see cref="StickBreaking.ILGPU.Kernels.Decode.DecodeWarpKernel"/>: D = 64 and 128 on CUDA) run
/// by the CPU accelerator with 32-thread warps, through the public Decode: against the float64 reference from the
/// definition, split into chunks (partial rounds of keys at every chunk's far end), and with NaN in slots and keys no
/// query sees. Each test asserts that the warp kernel is what ran.
/// </summary>
public sealed class WarpDecodeTests : CudaCodeOnCpuFixture
{
    private static readonly DecodeTests.Case[] Cases =
    [
        new(2, 4, 1, 1, 70, 64, [53, 31], false),    // MQA decode: one block of four query heads
        new(2, 4, 2, 3, 64, 128, [40, 57], true),    // GQA chunked prefill: six rows, blocks of four and two
        new(2, 3, 3, 1, 40, 128, [33, 1], false),    // Hq = Hkv, one row; a sequence of one token sees nothing
    ];

    private static readonly object[] CaseSource =
        (from c in Cases from s in Enum.GetValues<StorageType>() from chunks in new[] { 1, 3 } select new object[] { c, s, chunks }).ToArray();

    [TestCaseSource(nameof(CaseSource))]
    public void MatchesFloat64FromTheDefinition(DecodeTests.Case c, StorageType storage, int chunks)
    {
        var x = DecodeTests.Make(c, storage, seed: c.Capacity + c.D + chunks);
        var got = Run(c, storage, x, chunks);
        var exact = DecodeReference.Forward(DecodeTests.ToDouble(x.Q), DecodeTests.ToDouble(x.K), DecodeTests.ToDouble(x.V), c.Lengths,
            null, c.B, c.Hq, c.Hkv, c.N, c.Capacity, c.D, 1.0 / Math.Sqrt(c.D), c.AttendCurrent);
        DecodeTests.CheckClose(got, exact, storage, $"warp decode {storage} {c} {chunks} chunks");
    }

    [TestCase(StorageType.Bf16, 1)]
    [TestCase(StorageType.Fp32, 2)]
    public void NaNInSlotsNoQuerySeesReachesNoOutput(StorageType storage, int chunks)
    {
        var c = new DecodeTests.Case(2, 4, 1, 3, 48, 64, [40, 29], false);
        var x = DecodeTests.Make(c, storage, seed: 19);
        for (int b = 0; b < c.B; b++)
        {
            int at = ((b * c.Hkv) * c.Capacity + c.Lengths[b] - 1) * c.D;
            for (int d = 0; d < c.D; d++)
            {
                x.K[at + d] = float.NaN;
                x.V[at + d] = float.PositiveInfinity;
            }
        }
        var got = Run(c, storage, x, chunks);
        Assert.That(got.O.Concat(got.Rem).Concat(got.LogRem).All(float.IsFinite), Is.True, "every output finite");
        var exact = DecodeReference.Forward(DecodeTests.ToDouble(x.Q), DecodeTests.ToDouble(x.K), DecodeTests.ToDouble(x.V), c.Lengths,
            null, c.B, c.Hq, c.Hkv, c.N, c.Capacity, c.D, 1.0 / Math.Sqrt(c.D), c.AttendCurrent);
        DecodeTests.CheckClose(got, exact, storage, $"warp decode {storage} poisoned, {chunks} chunks");
    }

    [Test]
    public void OtherHeadDimensionsRunThePortableKernel()
    {
        var c = new DecodeTests.Case(1, 2, 1, 1, 20, 32, [20], false);
        Run(c, StorageType.Bf16, DecodeTests.Make(c, StorageType.Bf16, seed: 1), 1, expectWarp: false);
    }

    private (float[] O, float[] Rem, float[] LogRem) Run(DecodeTests.Case c, StorageType storage, DecodeTests.Inputs x, int chunks,
        bool expectWarp = true)
    {
        Attention.DecodeChunksOverride = chunks;
        try
        {
            var y = DecodeTests.Run(Attention, c, storage, x);
            Assert.That(Attention.LastDecodeKernel, expectWarp ? Does.StartWith("warp decode") : Does.Not.StartWith("warp"), "kernel run");
            Assert.That(Attention.LastDecodeChunks, Is.EqualTo(chunks), "chunks run");
            return y;
        }
        finally
        {
            Attention.DecodeChunksOverride = null;
        }
    }
}
