using System;
using System.Diagnostics;
using System.Globalization;
using System.Runtime.InteropServices;
using System.Text.Json;
using ILGPU;
using ILGPU.Runtime;
using ILGPU.Runtime.Cuda;
using StickBreaking.ILGPU.Tests.Infrastructure;
using StickBreaking.ILGPU.Tests.Reference;

namespace StickBreaking.ILGPU.Bench;

/// <summary>
/// <c>--soak [BACKEND] [CALLS] [B H T D]</c> (default Cuda, 10000 calls, B=2 H=8 T=1024 D=64): a training forward
/// and a backward at the device level, CALLS times, with one set of buffers and one workspace. Every call's o,
/// rem, LogRem, dq, dk, dv are compared bitwise with the first call's (the kernels are deterministic), into host
/// arrays allocated once. Reports the time per call (forward + backward + synchronisation; the copies and the
/// comparison are not timed), device memory before and after (free memory on CUDA, through
/// <see cref="CudaAccelerator.GetFreeMemory"/>), managed memory (GC.GetTotalMemory after a full collection) and
/// managed bytes allocated per call, and the process working set. Exit code 0: every call matched; 1: a
/// mismatch (the first few are printed); 2: bad arguments; 3: backend absent.
/// </summary>
internal static class Soak
{
    public static int Run(string[] args)
    {
        string backend = args.Length > 0 ? args[0] : Backends.Cuda;
        int calls, b, h, t, d;
        try
        {
            calls = args.Length > 1 ? Parse(args[1]) : 10000;
            (b, h, t, d) = args.Length >= 6 ? (Parse(args[2]), Parse(args[3]), Parse(args[4]), Parse(args[5])) : (2, 8, 1024, 64);
            if (args.Length is not (0 or 1 or 2 or 6) || calls < 2)
                throw new FormatException("expected [BACKEND] [CALLS >= 2] [B H T D]");
        }
        catch (FormatException ex)
        {
            Console.Error.WriteLine($"usage: --soak [Cuda|OpenCL|Cpu] [CALLS] [B H T D]: {ex.Message}");
            return 2;
        }
        var shape = new AttentionShape(b, h, t, d);
        shape.Validate("shape");
        var (context, accelerator, reason) = Backends.Open(backend);
        if (accelerator is null)
        {
            Console.Error.WriteLine($"{backend}: {reason}");
            return 3;
        }
        using (context)
        using (accelerator)
        using (var attention = new StickBreakingAttention(accelerator))
            return Loop(backend, accelerator, attention, shape, calls);
    }

    private static int Parse(string s) => int.Parse(s, NumberStyles.Integer, CultureInfo.InvariantCulture);

    private static int Loop(string backend, Accelerator accelerator, StickBreakingAttention attention, AttentionShape shape, int calls)
    {
        Console.WriteLine($"soak: {backend} '{accelerator.Name}', {shape}, {calls} calls of a training forward + backward " +
            $"(CUDA kernels: {attention.UsesCudaKernels}, CUDA backward: {attention.UsesCudaBackwardKernels}), " +
            $"workspace {StickBreakingWorkspace.BytesFor(shape) / 1048576.0:0.##} MiB");
        var x = TestInputs.Standard(shape.Batch, shape.Heads, shape.Length, shape.HeadDim, seed: 1);
        var stream = accelerator.DefaultStream;
        using var q = accelerator.Allocate1D(x.Q);
        using var k = accelerator.Allocate1D(x.K);
        using var v = accelerator.Allocate1D(x.V);
        using var dO = accelerator.Allocate1D(x.DO);
        using var dRem = accelerator.Allocate1D(x.DRem);
        using var workspace = new StickBreakingWorkspace(accelerator, shape);
        var outputs = new[]
        {
            ("o", accelerator.Allocate1D<float>(shape.TensorLength)), ("rem", accelerator.Allocate1D<float>(shape.RowCount)),
            ("logRem", accelerator.Allocate1D<float>(shape.RowCount)), ("dq", accelerator.Allocate1D<float>(shape.TensorLength)),
            ("dk", accelerator.Allocate1D<float>(shape.TensorLength)), ("dv", accelerator.Allocate1D<float>(shape.TensorLength)),
        };
        try
        {
            var (o, rem, logRem, dq, dk, dv) = (outputs[0].Item2, outputs[1].Item2, outputs[2].Item2, outputs[3].Item2, outputs[4].Item2, outputs[5].Item2);
            void Step()
            {
                attention.Forward(stream, shape, q.View, k.View, v.View, o.View, rem.View, logRem.View, null, workspace);
                attention.Backward(stream, shape, q.View, k.View, v.View, dO.View, dRem.View, logRem.View, workspace, dq.View, dk.View, dv.View);
                stream.Synchronize();
            }

            // Call 1: the baseline (and the kernels' compilation).
            Step();
            var baseline = new float[outputs.Length][];
            var current = new float[outputs.Length][];
            for (int i = 0; i < outputs.Length; i++)
            {
                baseline[i] = outputs[i].Item2.GetAsArray1D();
                current[i] = new float[baseline[i].Length];
            }
            foreach (var a in baseline)
            {
                foreach (float f in a)
                {
                    if (!float.IsFinite(f))
                    {
                        Console.WriteLine("soak: the first call's results are not all finite");
                        return 1;
                    }
                }
            }

            var before = Snapshot(accelerator);
            var times = new double[calls - 1];
            long mismatches = 0;
            int progressEvery = Math.Max(1, calls / 10);
            var total = Stopwatch.StartNew();
            for (int call = 2; call <= calls; call++)
            {
                long start = Stopwatch.GetTimestamp();
                Step();
                times[call - 2] = Stopwatch.GetElapsedTime(start).TotalMilliseconds;
                for (int i = 0; i < outputs.Length; i++)
                {
                    outputs[i].Item2.View.CopyToCPU(stream, current[i].AsSpan());
                }
                stream.Synchronize();
                for (int i = 0; i < outputs.Length; i++)
                {
                    var got = MemoryMarshal.Cast<float, int>(current[i].AsSpan());
                    var want = MemoryMarshal.Cast<float, int>(baseline[i].AsSpan());
                    if (!got.SequenceEqual(want))
                    {
                        mismatches++;
                        if (mismatches <= 5)
                        {
                            int at = 0;
                            while (got[at] == want[at])
                                at++;
                            Console.WriteLine($"soak: MISMATCH call {call}, {outputs[i].Item1}[{at}] = {current[i][at]:R}, first call {baseline[i][at]:R}");
                        }
                    }
                }
                if (call % progressEvery == 0 || call == calls)
                    Console.WriteLine($"soak: {call}/{calls} calls, {total.Elapsed.TotalSeconds:0.0} s, mismatches {mismatches}");
            }
            var after = Snapshot(accelerator);

            Array.Sort(times);
            double mean = 0;
            foreach (double ms in times)
                mean += ms / times.Length;
            double Percentile(double p) => times[Math.Min(times.Length - 1, (int)(p * times.Length))];
            long allocatedPerCall = (after.AllocatedBytes - before.AllocatedBytes) / (calls - 1);
            Console.WriteLine($"soak: ms per call (forward + backward + sync): mean {mean:0.###}, p50 {Percentile(0.5):0.###}, " +
                $"p99 {Percentile(0.99):0.###}, max {times[^1]:0.###}");
            Console.WriteLine($"soak: device memory total {accelerator.MemorySize}, free before {Show(before.DeviceFree)} after {Show(after.DeviceFree)}");
            Console.WriteLine($"soak: managed heap before {before.ManagedBytes} after {after.ManagedBytes}; allocated per call {allocatedPerCall} bytes " +
                "(copies and comparison included: host arrays are reused)");
            Console.WriteLine($"soak: working set before {before.WorkingSet} after {after.WorkingSet}");
            Console.WriteLine(JsonSerializer.Serialize(new
            {
                mode = "soak", backend, device = accelerator.Name, B = shape.Batch, H = shape.Heads, T = shape.Length, D = shape.HeadDim,
                calls, mismatches, ms_mean = mean, ms_p50 = Percentile(0.5), ms_p99 = Percentile(0.99), ms_max = times[^1],
                device_total = accelerator.MemorySize, device_free_before = before.DeviceFree, device_free_after = after.DeviceFree,
                managed_before = before.ManagedBytes, managed_after = after.ManagedBytes, allocated_per_call = allocatedPerCall,
                working_set_before = before.WorkingSet, working_set_after = after.WorkingSet,
            }));
            Console.WriteLine(mismatches == 0 ? $"soak: OK, {calls} calls bitwise identical" : $"soak: FAILED, {mismatches} mismatching outputs");
            return mismatches == 0 ? 0 : 1;
        }
        finally
        {
            foreach (var (_, buffer) in outputs)
                buffer.Dispose();
        }
    }

    private readonly record struct Memory(long? DeviceFree, long ManagedBytes, long AllocatedBytes, long WorkingSet);

    private static Memory Snapshot(Accelerator accelerator)
    {
        long managed = GC.GetTotalMemory(forceFullCollection: true);
        long? free = null;
        if (accelerator is CudaAccelerator cuda)
        {
            cuda.Bind();   // the driver's cuMemGetInfo reads the current context
            free = cuda.GetFreeMemory();
        }
        return new Memory(free, managed, GC.GetTotalAllocatedBytes(precise: true), Environment.WorkingSet);
    }

    private static string Show(long? bytes) => bytes is long b ? b.ToString(CultureInfo.InvariantCulture) : "n/a (not CUDA)";
}
