using System;
using System.Collections.Generic;
using System.Linq;
using ILGPU.Runtime;
using StickBreaking.ILGPU.Tests.Infrastructure;
using StickBreaking.ILGPU.Tests.Reference;

namespace StickBreaking.ILGPU.Bench;

/// <summary>
/// The README's main job: on every available accelerator, verify the forward and backward against the
/// float64 reference on a small shape, then time them (a shape sized to the backend), and print a table.
/// </summary>
internal static class MainJob
{
    private static readonly AttentionShape VerifyShape = new(1, 2, 100, 64);

    /// <summary>The decode checked against float64: 4 query heads per key/value head, caches of 300 and 257 keys.</summary>
    private static readonly DecodeShape DecodeVerifyShape = new(2, 8, 2, 1, 300, 128);

    public static int Run()
    {
        var rows = new List<string[]>();
        var decodeRows = new List<string[]>();
        var decodeSkips = new List<string>();
        bool allGood = true;
        var ran = new List<string>();
        foreach (string backend in Backends.All)
        {
            var (context, accelerator, reason) = Backends.Open(backend);
            if (accelerator is null)
            {
                Console.WriteLine($"{backend}: skipped ({reason})");
                continue;
            }
            using (context)
            using (accelerator)
            using (var attention = new StickBreakingAttention(accelerator))
            {
                string kernels = attention.UsesCudaKernels
                    ? $"CUDA kernels for D <= 128 (forward{(attention.UsesCudaBackwardKernels ? " and backward" : "; portable backward")}), portable kernels above"
                    : "portable kernels";
                Console.WriteLine($"{backend}: {accelerator.Name}, group size {attention.GroupSize}, {kernels}");
                var (forwardError, gradientError) = Verify(attention);
                bool good = forwardError <= 2e-5 && gradientError <= 2e-5;
                allGood &= good;
                var errors16 = new[] { true, false }.ToDictionary(bf16 => bf16, bf16 => Verify16(attention, bf16));
                allGood &= errors16.Values.All(e => e.O <= 2 && e.Gradients <= 2);
                ran.Add(backend);
                // CUDA: the shape of the peers' figures. The CPU accelerator and PoCL (an OpenCL CPU device) are
                // orders of magnitude slower: a small shape keeps the whole job within a couple of minutes.
                var timed = accelerator.AcceleratorType == AcceleratorType.Cuda
                    ? new[] { new AttentionShape(4, 12, 1024, 128), new AttentionShape(4, 12, 4096, 128) }
                    : new[] { new AttentionShape(1, 2, 128, 64) };
                foreach (var shape in timed)
                {
                    var inputs = TestInputs.Standard(shape.Batch, shape.Heads, shape.Length, shape.HeadDim, seed: 1);
                    using var run = new DeviceRun(attention, shape, inputs);
                    int reps = accelerator.AcceleratorType == AcceleratorType.Cuda ? 10 : 3;
                    double fwd = run.MedianMs(() => run.Forward(training: false), reps);
                    run.Forward(training: true);
                    double bwd = run.MedianMs(run.Backward, reps);
                    rows.Add([backend, shape.ToString(), "forward", $"{fwd:F3}", Gflops(run.ForwardFlops, fwd), $"{forwardError:0.0E+0}", VerifyShape.ToString(), good ? "ok" : "FAIL"]);
                    rows.Add([backend, shape.ToString(), "backward", $"{bwd:F3}", Gflops(run.BackwardFlops, bwd), $"{gradientError:0.0E+0}", VerifyShape.ToString(), good ? "ok" : "FAIL"]);
                    foreach (bool bf16 in new[] { true, false })
                    {
                        using var run16 = new Attention16Run(attention, shape, inputs, bf16);
                        double fwd16 = run.MedianMs(() => run16.Forward(training: false), reps);
                        run16.Forward(training: true);
                        double bwd16 = run.MedianMs(run16.Backward, reps);
                        string name = bf16 ? "bf16" : "fp16";
                        string kernel = attention.UsesTensorCores && shape.HeadDim is 64 or 128 ? ", tensor cores" : "";
                        var (o16, grads16) = errors16[bf16];
                        rows.Add([backend, shape.ToString(), $"forward {name}{kernel}", $"{fwd16:F3}", Gflops(run.ForwardFlops, fwd16),
                            $"{o16:0.00}x floor", VerifyShape.ToString(), o16 <= 2 ? "ok" : "FAIL"]);
                        rows.Add([backend, shape.ToString(), $"backward {name}", $"{bwd16:F3}", Gflops(run.BackwardFlops, bwd16),
                            $"{grads16:0.00}x floor", VerifyShape.ToString(), grads16 <= 2 ? "ok" : "FAIL"]);
                    }
                }

                // Decode: one query per sequence and head against a full cache. CUDA: 1 GB of bf16 K and V (the peers'
                // heads and length at B = 8); elsewhere a cache the simulators read in seconds. A device that cannot run
                // it says why (NotSupportedException) and is listed under the table.
                double decodeError, decodeRatio;
                try
                {
                    (decodeError, decodeRatio) = VerifyDecode(attention);
                }
                catch (NotSupportedException e)
                {
                    decodeSkips.Add($"{backend}: decode not run: {e.Message}");
                    continue;
                }
                bool decodeGood = decodeError <= 2e-5 && decodeRatio <= 2;
                allGood &= decodeGood;
                var decodeShape = accelerator.AcceleratorType == AcceleratorType.Cuda
                    ? new DecodeShape(8, 32, 8, 1, 32768, 128)
                    : new DecodeShape(1, 4, 2, 1, 512, 64);
                int? decodeRuns = accelerator.AcceleratorType == AcceleratorType.Cuda ? null : 1;
                foreach (string dtype in new[] { "fp32", "bf16" })
                {
                    var (callMs, kernelMs) = dtype == "fp32"
                        ? DecodeBench.Time<float>(attention, decodeShape, decodeRuns)
                        : DecodeBench.Time<BFloat16>(attention, decodeShape, decodeRuns);
                    double bytes = 2.0 * decodeShape.CacheLength * (dtype == "fp32" ? 4 : 2);
                    decodeRows.Add([backend, $"B={decodeShape.Batch} Hq={decodeShape.QueryHeads} Hkv={decodeShape.KeyValueHeads} L={decodeShape.Capacity} D={decodeShape.HeadDim}",
                        dtype, attention.LastDecodeKernel ?? "", $"{callMs:F4}", $"{kernelMs:F4}", Gflops(bytes / 1e3, kernelMs),
                        dtype == "fp32" ? $"{decodeError:0.0E+0}" : $"{decodeRatio:0.00}x floor", decodeGood ? "ok" : "FAIL"]);
                }
            }
        }
        Print(["backend", "timed shape", "pass", "ms", "GFLOP/s", "max error", "error measured at", "verified"], rows);
        Console.WriteLine();
        Print(["backend", "decode shape", "storage", "kernel", "ms per call", "ms of kernels", "GB/s of K, V", "max error", "verified"], decodeRows);
        decodeSkips.ForEach(Console.WriteLine);
        Console.WriteLine("ms: median of 10 runs on CUDA, 3 elsewhere, after a warm-up. GFLOP/s: 2 T^2 D per (batch, head) for the");
        Console.WriteLine("  causal forward, 2.5 times that for the backward (1 TFLOP/s = 1000 GFLOP/s).");
        Console.WriteLine($"max error, against float64 at the shape in 'error measured at' (a smaller one than the timed shape): forward,");
        Console.WriteLine($"  the max abs error of o and rem; backward, the largest relative RMS error of dq, dk, dv. Tolerance 2e-5.");
        Console.WriteLine("  fp16/bf16 forward: the max abs error of o against float64 on the same rounded inputs, as a multiple of the");
        Console.WriteLine("  floor no 16-bit output can beat (the error of rounding the exact o to the storage type); at most 2x, and");
        Console.WriteLine("  rem and LogRem (fp32) within 2e-5. fp16/bf16 backward: the largest relative RMS error of dq, dk, dv as a");
        Console.WriteLine("  multiple of its floor (the relative RMS of rounding the exact gradient); at most 2x.");
        Console.WriteLine($"decode: ms per call is the public device-level Decode (it reads the cache lengths back), ms of kernels the");
        Console.WriteLine($"  decode and merge kernels alone (median of 5 batches of 20 calls on CUDA, of 1 elsewhere). max error, at {DecodeVerifyShape}: fp32,");
        Console.WriteLine("  the max abs error of o and rem against float64 (2e-5); bf16, o's max abs error against float64 on the same");
        Console.WriteLine("  rounded inputs as a multiple of its rounding floor (at most 2x), rem and LogRem within 2e-5.");
        Console.WriteLine(allGood
            ? $"verified on every backend present: {string.Join(", ", ran)}."
            : "FAILED: a backend's error is above the tolerance.");
        return allGood ? 0 : 1;
    }

    /// <summary>
    /// GFLOP/s as a plain decimal with three significant figures at most, never an exponent: the CPU accelerator
    /// (a simulator, about 0.01) and CUDA (about 20,000) then read on one scale.
    /// </summary>
    private static string Gflops(double flops, double ms)
    {
        double g = flops / ms / 1e6;
        int decimals = g >= 100 ? 0 : Math.Clamp(2 - (int)Math.Floor(Math.Log10(g)), 0, 9);
        return g.ToString("F" + decimals, System.Globalization.CultureInfo.InvariantCulture);
    }

    /// <summary>Max abs error of o and rem, and the largest relative RMS error of dq, dk, dv.</summary>
    private static (double Forward, double Gradients) Verify(StickBreakingAttention attention)
    {
        var s = VerifyShape;
        var x = TestInputs.Standard(s.Batch, s.Heads, s.Length, s.HeadDim, seed: 42);
        double scale = StickBreakingOptions.Default.ScaleFor(s.HeadDim);
        double[] q = TestInputs.ToDouble(x.Q), k = TestInputs.ToDouble(x.K), v = TestInputs.ToDouble(x.V);
        var expected = Float64Reference.Forward(q, k, v, s.Batch, s.Heads, s.Length, s.HeadDim, scale, false);
        var expectedGrads = Float64Reference.Backward(q, k, v, TestInputs.ToDouble(x.DO), TestInputs.ToDouble(x.DRem),
            s.Batch, s.Heads, s.Length, s.HeadDim, scale, false);
        var output = attention.Forward(x.Q, x.K, x.V, s);
        var grads = attention.Backward(x.Q, x.K, x.V, x.DO, x.DRem, s);
        double forward = Math.Max(Errors.MaxAbs(output.O, expected.O), Errors.MaxAbs(output.Rem, expected.Rem));
        double gradients = new[] { Errors.RelativeRms(grads.DQ, expectedGrads.DQ), Errors.RelativeRms(grads.DK, expectedGrads.DK), Errors.RelativeRms(grads.DV, expectedGrads.DV) }.Max();
        return (forward, gradients);
    }

    /// <summary>
    /// The 16-bit forward's max abs error of o against float64 on the same rounded inputs, as a multiple of the
    /// rounding floor (infinite when rem or LogRem is off by more than 2e-5), and the 16-bit backward's largest
    /// relative RMS error of dq, dk, dv, each as a multiple of its floor.
    /// </summary>
    private static (double O, double Gradients) Verify16(StickBreakingAttention attention, bool bf16)
    {
        var s = VerifyShape;
        var x = TestInputs.Standard(s.Batch, s.Heads, s.Length, s.HeadDim, seed: 42);
        double Round(float f) => bf16 ? (float)(BFloat16)f : (double)(System.Half)f;
        double[] q = x.Q.Select(Round).ToArray(), k = x.K.Select(Round).ToArray(), v = x.V.Select(Round).ToArray();
        var expected = Float64Reference.Forward(q, k, v, s.Batch, s.Heads, s.Length, s.HeadDim, StickBreakingOptions.Default.ScaleFor(s.HeadDim), false);
        float[] o, rem, logRem;
        if (bf16)
        {
            var y = attention.Forward(x.Q.Select(f => (BFloat16)f).ToArray(), x.K.Select(f => (BFloat16)f).ToArray(), x.V.Select(f => (BFloat16)f).ToArray(), s);
            (o, rem, logRem) = (y.O.Select(b => (float)b).ToArray(), y.Rem, y.LogRem);
        }
        else
        {
            var y = attention.Forward(x.Q.Select(f => (System.Half)f).ToArray(), x.K.Select(f => (System.Half)f).ToArray(), x.V.Select(f => (System.Half)f).ToArray(), s);
            (o, rem, logRem) = (y.O.Select(h => (float)h).ToArray(), y.Rem, y.LogRem);
        }
        double oRatio = OverRoundingFloor(o, rem, logRem, expected, Round);

        var exact = Float64Reference.Backward(q, k, v, x.DO.Select(Round).ToArray(), TestInputs.ToDouble(x.DRem),
            s.Batch, s.Heads, s.Length, s.HeadDim, StickBreakingOptions.Default.ScaleFor(s.HeadDim), false);
        float[] dq, dk, dv;
        if (bf16)
        {
            var g = attention.Backward(x.Q.Select(f => (BFloat16)f).ToArray(), x.K.Select(f => (BFloat16)f).ToArray(),
                x.V.Select(f => (BFloat16)f).ToArray(), x.DO.Select(f => (BFloat16)f).ToArray(), x.DRem, s);
            (dq, dk, dv) = (g.DQ.Select(b => (float)b).ToArray(), g.DK.Select(b => (float)b).ToArray(), g.DV.Select(b => (float)b).ToArray());
        }
        else
        {
            var g = attention.Backward(x.Q.Select(f => (System.Half)f).ToArray(), x.K.Select(f => (System.Half)f).ToArray(),
                x.V.Select(f => (System.Half)f).ToArray(), x.DO.Select(f => (System.Half)f).ToArray(), x.DRem, s);
            (dq, dk, dv) = (g.DQ.Select(h => (float)h).ToArray(), g.DK.Select(h => (float)h).ToArray(), g.DV.Select(h => (float)h).ToArray());
        }
        double Ratio(float[] actual, double[] e) =>
            Errors.RelativeRms(actual, e) / Errors.RelativeRms(e.Select(d => (float)Round((float)d)).ToArray(), e);
        return (oRatio, new[] { Ratio(dq, exact.DQ), Ratio(dk, exact.DK), Ratio(dv, exact.DV) }.Max());
    }

    /// <summary>
    /// The decode at <see cref="DecodeVerifyShape"/> against the float64 reference (docs/math.md, "Queries behind a cache"):
    /// fp32's max abs error of o and rem, and bf16's max abs error of o as a multiple of its rounding floor (infinite when
    /// rem or LogRem is off by more than 2e-5).
    /// </summary>
    private static (double Fp32, double Bf16) VerifyDecode(StickBreakingAttention attention)
    {
        var s = DecodeVerifyShape;
        int[] lengths = [s.Capacity, 257];
        float[] q = TestInputs.Standard(s.Batch, s.QueryHeads, s.Queries, s.HeadDim, seed: 7).Q;
        var cache = TestInputs.Standard(s.Batch, s.KeyValueHeads, s.Capacity, s.HeadDim, seed: 8);
        double scale = StickBreakingOptions.Default.ScaleFor(s.HeadDim);
        ReferenceForward Exact(Func<float, double> round) =>
            DecodeReference.Forward(q.Select(round).ToArray(), cache.K.Select(round).ToArray(), cache.V.Select(round).ToArray(),
                lengths, null, s.Batch, s.QueryHeads, s.KeyValueHeads, s.Queries, s.Capacity, s.HeadDim, scale, false);
        var expected = Exact(f => f);
        var fp32 = attention.Decode(q, cache.K, cache.V, lengths, s);
        double fp32Error = Math.Max(Errors.MaxAbs(fp32.O, expected.O), Errors.MaxAbs(fp32.Rem, expected.Rem));

        static double Round(float f) => (float)(BFloat16)f;
        static BFloat16[] Bf16(float[] x) => x.Select(f => (BFloat16)f).ToArray();
        var bf16 = attention.Decode(Bf16(q), Bf16(cache.K), Bf16(cache.V), lengths, s);
        return (fp32Error, OverRoundingFloor(bf16.O.Select(b => (float)b).ToArray(), bf16.Rem, bf16.LogRem, Exact(Round), Round));
    }

    /// <summary>
    /// A 16-bit output's max abs error of o against <paramref name="expected"/> (float64 on the same rounded inputs), as a
    /// multiple of the floor no 16-bit output can beat (rounding the exact o with <paramref name="round"/>); infinite when
    /// rem or LogRem is off by more than 2e-5.
    /// </summary>
    private static double OverRoundingFloor(float[] o, float[] rem, float[] logRem, ReferenceForward expected, Func<float, double> round)
    {
        if (Errors.MaxAbs(rem, expected.Rem) > 2e-5 || Errors.MaxAbs(logRem, expected.LogRem) > 2e-5)
            return double.PositiveInfinity;
        double floor = expected.O.Max(e => Math.Abs(round((float)e) - e));
        return Errors.MaxAbs(o, expected.O) / floor;
    }

    private static void Print(string[] header, List<string[]> rows)
    {
        var all = rows.Prepend(header).ToList();
        int[] widths = Enumerable.Range(0, header.Length).Select(c => all.Max(r => r[c].Length)).ToArray();
        foreach (var (row, i) in all.Select((r, i) => (r, i)))
        {
            Console.WriteLine("| " + string.Join(" | ", row.Select((cell, c) => cell.PadRight(widths[c]))) + " |");
            if (i == 0)
                Console.WriteLine("|" + string.Join("|", widths.Select(w => new string('-', w + 2))) + "|");
        }
    }
}
