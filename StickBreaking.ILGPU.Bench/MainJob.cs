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

    public static int Run()
    {
        var rows = new List<string[]>();
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
            }
        }
        Print(["backend", "timed shape", "pass", "ms", "GFLOP/s", "max error", "error measured at", "verified"], rows);
        Console.WriteLine("ms: median of 10 runs on CUDA, 3 elsewhere, after a warm-up. GFLOP/s: 2 T^2 D per (batch, head) for the");
        Console.WriteLine("  causal forward, 2.5 times that for the backward (1 TFLOP/s = 1000 GFLOP/s).");
        Console.WriteLine($"max error, against float64 at the shape in 'error measured at' (a smaller one than the timed shape): forward,");
        Console.WriteLine($"  the max abs error of o and rem; backward, the largest relative RMS error of dq, dk, dv. Tolerance 2e-5.");
        Console.WriteLine("  fp16/bf16 forward: the max abs error of o against float64 on the same rounded inputs, as a multiple of the");
        Console.WriteLine("  floor no 16-bit output can beat (the error of rounding the exact o to the storage type); at most 2x, and");
        Console.WriteLine("  rem and LogRem (fp32) within 2e-5. fp16/bf16 backward: the largest relative RMS error of dq, dk, dv as a");
        Console.WriteLine("  multiple of its floor (the relative RMS of rounding the exact gradient); at most 2x.");
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
        double floor = expected.O.Max(e => Math.Abs(Round((float)e) - e));
        double oRatio = Errors.MaxAbs(rem, expected.Rem) > 2e-5 || Errors.MaxAbs(logRem, expected.LogRem) > 2e-5
            ? double.PositiveInfinity
            : Errors.MaxAbs(o, expected.O) / floor;

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
