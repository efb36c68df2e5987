using System;
using System.Diagnostics;
using System.Globalization;
using System.Linq;
using System.Text.Json;
using ILGPU;
using ILGPU.Runtime;
using Half = System.Half;
using StickBreaking.ILGPU.Tests.Infrastructure;

namespace StickBreaking.ILGPU.Bench;

/// <summary>
/// <c>--decode BACKEND B Hq Hkv D L [n] [--dtype bf16|fp16|fp32] [--chunks N] [--portable] [--groups-per-sm N] [--groups-per-sm N]</c> (--portable: the portable kernel where the warp kernel would serve; --groups-per-sm: a launch bound in place of the kernel's own): queries behind a key/value cache of L
/// keys per sequence (all B at length L, capacity L), one JSON line: the median ms of the public device-level call (which
/// reads the lengths back before it enqueues) and of the kernels alone, the K + V bytes read per ms as TB/s, and the key
/// chunks the split chose. Inputs are random values in [-0.25, 0.25] filled on the device. (Wire it in Program.cs:
/// <c>if (args[0] == "--decode") return DecodeBench.Run(args[1..]);</c>.)
/// </summary>
internal static class DecodeBench
{
    public static int Run(string[] args)
    {
        string dtype = "bf16";
        int? chunks = null;
        int flag = Array.IndexOf(args, "--dtype");
        if (flag > 0 && flag + 1 < args.Length)
        {
            dtype = args[flag + 1];
            args = args[..flag].Concat(args[(flag + 2)..]).ToArray();
        }
        flag = Array.IndexOf(args, "--chunks");
        if (flag > 0 && flag + 1 < args.Length)
        {
            chunks = int.Parse(args[flag + 1], CultureInfo.InvariantCulture);
            args = args[..flag].Concat(args[(flag + 2)..]).ToArray();
        }
        if (args.Length < 6 || dtype is not ("bf16" or "fp16" or "fp32"))
        {
            Console.Error.WriteLine("usage: --decode Cuda|OpenCL|Cpu B Hq Hkv D L [n] [--dtype bf16|fp16|fp32] [--chunks N] [--portable] [--groups-per-sm N]");
            return 2;
        }
        int? groupsPerSm = null;
        flag = Array.IndexOf(args, "--groups-per-sm");
        if (flag > 0 && flag + 1 < args.Length)
        {
            groupsPerSm = int.Parse(args[flag + 1], CultureInfo.InvariantCulture);
            args = args[..flag].Concat(args[(flag + 2)..]).ToArray();
        }
        bool portable = args.Contains("--portable");
        args = args.Where(a => a != "--portable").ToArray();
        int[] x = args.Skip(1).Select(a => int.Parse(a, CultureInfo.InvariantCulture)).ToArray();
        var shape = new DecodeShape(x[0], x[1], x[2], x.Length > 5 ? x[5] : 1, x[4], x[3]);
        var (context, accelerator, reason) = Backends.Open(args[0]);
        if (accelerator is null)
        {
            Console.Error.WriteLine($"{args[0]}: {reason}");
            return 3;
        }
        using (context)
        using (accelerator)
        using (var attention = new StickBreakingAttention(accelerator) { DecodeChunksOverride = chunks, UseWarpDecode = !portable, CudaGroupsPerMultiprocessorOverride = groupsPerSm })
        {
            var (publicMs, kernelMs) = dtype switch
            {
                "fp32" => Time<float>(attention, shape),
                "fp16" => Time<Half>(attention, shape),
                _ => Time<BFloat16>(attention, shape),
            };
            int elementBytes = dtype == "fp32" ? 4 : 2;
            double bytes = 2.0 * shape.CacheLength * elementBytes;
            Console.WriteLine(JsonSerializer.Serialize(new
            {
                project = "StickBreaking.ILGPU", mode = "decode", backend = args[0], device = accelerator.Name, dtype,
                B = shape.Batch, Hq = shape.QueryHeads, Hkv = shape.KeyValueHeads, n = shape.Queries, L = shape.Capacity, D = shape.HeadDim,
                chunks = attention.LastDecodeChunks, kernel = attention.LastDecodeKernel, public_ms = publicMs, kernels_ms = kernelMs,
                public_tbs = bytes / publicMs / 1e9, kernels_tbs = bytes / kernelMs / 1e9,
            }));
        }
        return 0;
    }

    private static void Fill(Index1D i, ArrayView<byte> x, int seed)
    {
        // Whole 16-bit words in [-0.25, 0.25] as bf16 or fp16 bits, or fp32 (every 4 bytes): the bytes of a float's upper half
        // are a valid bf16 and near-valid fp16; for timing only the absence of NaN matters.
        uint h = (uint)i.X * 2654435761u ^ (uint)seed * 40503u;
        h ^= h >> 15;
        h *= 2246822519u;
        h ^= h >> 13;
        x[i] = (byte)(i.X % 2 == 0 ? h & 0xFF : 0x3C | (h & 0x80));   // high byte: exponent near 2^-3 (fp16 0x3C.., bf16 0x3C..)
    }

    /// <summary>
    /// Median ms per decode of <paramref name="shape"/> (every cache full): through the public device-level call (which
    /// reads the lengths back), and of its kernels alone; 5 batches of <paramref name="runs"/> calls each (null: 20 for
    /// caches of 2^28 elements and more, else 200).
    /// </summary>
    internal static (double PublicMs, double KernelMs) Time<T>(StickBreakingAttention attention, DecodeShape shape, int? runs = null)
        where T : unmanaged
    {
        var acc = attention.Accelerator;
        var fill = acc.LoadAutoGroupedStreamKernel<Index1D, ArrayView<byte>, int>(Fill);
        using var q = acc.Allocate1D<T>(shape.QueryLength);
        using var k = acc.Allocate1D<T>(shape.CacheLength);
        using var v = acc.Allocate1D<T>(shape.CacheLength);
        using var lengths = acc.Allocate1D(Enumerable.Repeat(shape.Capacity, shape.Batch).ToArray());
        using var o = acc.Allocate1D<T>(shape.QueryLength);
        using var rem = acc.Allocate1D<float>(shape.RowCount);
        using var logRem = acc.Allocate1D<float>(shape.RowCount);
        foreach (var (buffer, seed) in new[] { (q.View.AsContiguous(), 1), (k.View.AsContiguous(), 2), (v.View.AsContiguous(), 3) })
        {
            var bytes = buffer.Cast<byte>();
            for (long at = 0; at < bytes.Length; at += 1 << 30)   // an Index1D grid holds at most 2^31 - 1 threads
            {
                var piece = bytes.SubView(at, Math.Min(1L << 30, bytes.Length - at));
                fill((int)piece.Length, piece, seed + (int)(at >> 30));
            }
        }
        acc.Synchronize();
        ArrayView<T> qv = q.View, kv = k.View, vv = v.View, ov = o.View;
        void Public()
        {
            if (typeof(T) == typeof(float))
                attention.Decode(acc.DefaultStream, shape, qv.Cast<float>(), kv.Cast<float>(), vv.Cast<float>(), lengths.View, ov.Cast<float>(), rem.View, logRem.View);
            else if (typeof(T) == typeof(Half))
                attention.Decode(acc.DefaultStream, shape, qv.Cast<Half>(), kv.Cast<Half>(), vv.Cast<Half>(), lengths.View, ov.Cast<Half>(), rem.View, logRem.View);
            else
                attention.Decode(acc.DefaultStream, shape, qv.Cast<BFloat16>(), kv.Cast<BFloat16>(), vv.Cast<BFloat16>(), lengths.View, ov.Cast<BFloat16>(), rem.View, logRem.View);
        }
        void Kernels() => attention.DecodeUnchecked(acc.DefaultStream, shape, qv, kv, vv, lengths.View, shape.Capacity, ov, rem.View, logRem.View);
        int calls = runs ?? (shape.CacheLength >= 1L << 28 ? 20 : 200);
        return (Median(acc, Public, calls), Median(acc, Kernels, calls));
    }

    /// <summary>Median over 5 batches of <paramref name="runs"/> back-to-back calls, ms per call.</summary>
    private static double Median(Accelerator acc, Action call, int runs)
    {
        call();
        acc.Synchronize();
        var times = new double[5];
        for (int t = 0; t < times.Length; t++)
        {
            var watch = Stopwatch.StartNew();
            for (int r = 0; r < runs; r++)
                call();
            acc.Synchronize();
            times[t] = watch.Elapsed.TotalMilliseconds / runs;
        }
        Array.Sort(times);
        return times[times.Length / 2];
    }
}
