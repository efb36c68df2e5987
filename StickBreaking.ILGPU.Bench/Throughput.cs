using System;
using System.Globalization;
using System.Linq;
using System.Text.Json;
using StickBreaking.ILGPU.Tests.Infrastructure;
using StickBreaking.ILGPU.Tests.Reference;

namespace StickBreaking.ILGPU.Bench;

/// <summary>
/// <c>--throughput BACKEND B H D T [T ...] [--groups-per-sm N] [--dtype fp32|bf16|fp16[,...]] [--exact-products] [--layout head|token|fused] [--kv-heads N] [--forward-only]</c>: one JSON object a line
/// per length and storage type (forward, inference and training; backward, and each of its two passes alone), for the
/// GPU machine, where <c>python3 scripts/peers.py B H D T ...</c> prints the peers in the same session. On CUDA each line
/// also times the two backward passes alone, and a last line per CUDA kernel gives what the driver compiled
/// (registers and spilled bytes per thread, groups per SM). <c>--groups-per-sm</c> replaces every kernel's own
/// launch bound (a diagnostic). <c>--forward-only</c> times the 16-bit forwards alone (the backward fields are null).
/// </summary>
internal static class Throughput
{
    public static int Run(string[] args)
    {
        if (args.Length < 5)
        {
            Console.Error.WriteLine("usage: --throughput Cuda|OpenCL|Cpu B H D T [T ...]");
            return 2;
        }
        string backend = args[0];
        int? groupsPerSm = null;
        int flag = Array.IndexOf(args, "--groups-per-sm");
        if (flag > 0 && flag + 1 < args.Length)
        {
            groupsPerSm = int.Parse(args[flag + 1], CultureInfo.InvariantCulture);
            args = args[..flag].Concat(args[(flag + 2)..]).ToArray();
        }
        string[] dtypes = ["fp32"];
        int dtypeFlag = Array.IndexOf(args, "--dtype");
        if (dtypeFlag > 0 && dtypeFlag + 1 < args.Length)
        {
            dtypes = args[dtypeFlag + 1].Split(',');
            args = args[..dtypeFlag].Concat(args[(dtypeFlag + 2)..]).ToArray();
        }
        // --exact-products: the 16-bit tensor-core kernels with split (exact) products (StickBreakingOptions.ExactProducts).
        bool exact = args.Contains("--exact-products");
        bool forwardOnly = args.Contains("--forward-only");
        args = args.Where(a => a is not "--exact-products" and not "--forward-only").ToArray();
        // --layout token|fused: [B, T, H, D] tensors, or q, k, v (and dq, dk, dv) as slices of one fused buffer (16-bit rows).
        string layoutName = "head";
        flag = Array.IndexOf(args, "--layout");
        if (flag > 0 && flag + 1 < args.Length)
        {
            layoutName = args[flag + 1];
            args = args[..flag].Concat(args[(flag + 2)..]).ToArray();
        }
        // --kv-heads N: grouped-query attention, N key/value heads (16-bit rows).
        int? kvHeads = null;
        flag = Array.IndexOf(args, "--kv-heads");
        if (flag > 0 && flag + 1 < args.Length)
        {
            kvHeads = int.Parse(args[flag + 1], CultureInfo.InvariantCulture);
            args = args[..flag].Concat(args[(flag + 2)..]).ToArray();
        }
        int[] n = args.Skip(1).Select(a => int.Parse(a, CultureInfo.InvariantCulture)).ToArray();
        if ((layoutName != "head" || kvHeads is not null) && dtypes.Contains("fp32"))
        {
            Console.Error.WriteLine("--layout and --kv-heads time the 16-bit rows only: pass --dtype bf16 and/or fp16 without fp32.");
            return 2;
        }
        var (context, accelerator, reason) = Backends.Open(backend);
        if (accelerator is null)
        {
            Console.Error.WriteLine($"{backend}: {reason}");
            return 3;
        }
        using (context)
        using (accelerator)
        using (var attention = new StickBreakingAttention(accelerator) { CudaGroupsPerMultiprocessorOverride = groupsPerSm })
        {
            foreach (int t in n.Skip(3))
            {
                var shape = new AttentionShape(n[0], n[1], t, n[2]);
                var shape16 = shape with { KeyValueHeads = kvHeads ?? shape.Heads };
                AttentionLayout? layout = layoutName switch
                {
                    "token" => AttentionLayout.TokenMajor(shape16),
                    "fused" => AttentionLayout.FusedQkv(shape16),
                    _ => null,
                };
                foreach (string dtype in dtypes.Where(d => d is "bf16" or "fp16"))
                {
                    var inputs16 = TestInputs.Standard(shape.Batch, shape.Heads, shape.Length, shape.HeadDim, seed: 1);
                    using var run16 = new Attention16Run(attention, shape16, inputs16, bf16: dtype == "bf16",
                        new StickBreakingOptions { ExactProducts = exact, Layout = layout });
                    int reps16 = t >= 8192 ? 10 : 20;
                    double fwd16 = MedianMs(attention, () => run16.Forward(training: false), reps16);
                    double fwdTrain16 = MedianMs(attention, () => run16.Forward(training: true), reps16);
                    double? bwd16 = null, pass1of16 = null, pass2of16 = null;
                    if (!forwardOnly)
                    {
                        bwd16 = MedianMs(attention, run16.Backward, reps16);
                        attention.BackwardPasses = 1;
                        pass1of16 = MedianMs(attention, run16.Backward, reps16);
                        attention.BackwardPasses = 2;
                        pass2of16 = MedianMs(attention, run16.Backward, reps16);
                        attention.BackwardPasses = 3;
                    }
                    double flops = 4.0 * t * t * shape.HeadDim / 2 * shape.HeadCount;
                    Console.WriteLine(JsonSerializer.Serialize(new
                    {
                        project = "StickBreaking.ILGPU", backend, device = accelerator.Name, dtype = run16.DType,
                        B = shape.Batch, H = shape.Heads, Hkv = shape16.KeyValueHeads, layout = layoutName, T = t, D = shape.HeadDim,
                        tensor_cores = attention.UsesTensorCores, tensor_core_backward = attention.UsesTensorCoreBackward, exact_products = exact,
                        fwd_ms = fwd16, fwd_tflops = flops / fwd16 / 1e9, fwd_training_ms = fwdTrain16,
                        bwd_ms = bwd16, bwd_tflops = 2.5 * flops / bwd16 / 1e9, bwd_pass1_ms = pass1of16, bwd_pass2_ms = pass2of16,
                        fwdbwd_ms = fwdTrain16 + bwd16,
                    }));
                }
                if (!dtypes.Contains("fp32"))
                    continue;
                var inputs = TestInputs.Standard(shape.Batch, shape.Heads, shape.Length, shape.HeadDim, seed: 1);
                using var run = new DeviceRun(attention, shape, inputs);
                int reps = t >= 8192 ? 5 : 10;
                double fwd = run.MedianMs(() => run.Forward(training: false), reps);
                double fwdTrain = run.MedianMs(() => run.Forward(training: true), reps);
                double bwd = run.MedianMs(run.Backward, reps);
                double? pass1 = null, pass2 = null;
                if (attention.UsesCudaKernels)
                {
                    attention.BackwardPasses = 1;
                    pass1 = run.MedianMs(run.Backward, reps);
                    attention.BackwardPasses = 2;
                    pass2 = run.MedianMs(run.Backward, reps);
                    attention.BackwardPasses = 3;
                }
                Console.WriteLine(JsonSerializer.Serialize(new
                {
                    project = "StickBreaking.ILGPU",
                    backend,
                    device = accelerator.Name,
                    dtype = "float32",
                    B = shape.Batch, H = shape.Heads, T = t, D = shape.HeadDim,
                    fwd_ms = fwd,
                    fwd_tflops = run.ForwardFlops / fwd / 1e9,
                    fwd_training_ms = fwdTrain,
                    bwd_ms = bwd,
                    bwd_tflops = run.BackwardFlops / bwd / 1e9,
                    bwd_pass1_ms = pass1,
                    bwd_pass2_ms = pass2,
                    fwdbwd_ms = fwdTrain + bwd,
                    workspace_mib = StickBreakingWorkspace.BytesFor(shape) / 1048576.0,
                    groups_per_sm_override = groupsPerSm,
                }));
            }
            foreach (var (name, r) in Launch.CudaDriver.Loaded.OrderBy(k => k.Key))
            {
                Console.WriteLine(JsonSerializer.Serialize(new
                {
                    kernel = name, registers = r.Registers, local_bytes = r.LocalBytes, shared_bytes = r.SharedBytes,
                    groups_per_sm = r.MinGroupsPerMultiprocessor, resident_groups_per_sm = r.ResidentGroupsPerMultiprocessor,
                }));
            }
        }
        return 0;
    }

    /// <summary>Median wall time in ms of <paramref name="action"/> followed by a synchronisation, after a warm-up call.</summary>
    private static double MedianMs(StickBreakingAttention attention, Action action, int repetitions)
    {
        action();
        attention.Accelerator.Synchronize();
        var times = new double[repetitions];
        for (int i = 0; i < repetitions; i++)
        {
            long start = System.Diagnostics.Stopwatch.GetTimestamp();
            action();
            attention.Accelerator.Synchronize();
            times[i] = System.Diagnostics.Stopwatch.GetElapsedTime(start).TotalMilliseconds;
        }
        Array.Sort(times);
        return times[repetitions / 2];
    }
}
