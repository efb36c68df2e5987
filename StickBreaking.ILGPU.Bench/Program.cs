using System;
using System.Linq;
using BenchmarkDotNet.Configs;
using BenchmarkDotNet.Jobs;
using BenchmarkDotNet.Running;
using BenchmarkDotNet.Toolchains.InProcess.Emit;
using StickBreaking.ILGPU.Bench;

// dotnet run -c Release --project StickBreaking.ILGPU.Bench                 verify + time on every accelerator
// ... -- --throughput Cuda 4 12 128 1024 4096                               JSON lines for peers.py's comparison
// ... -- --report ours.jsonl peers.jsonl out.md out.png [lines]              table + log-log plot from one GPU run
// ... -- --soak [Cuda] [10000] [2 8 1024 64]                                 forward + backward N times, bitwise against call 1
// ... -- --decode Cuda 32 32 8 128 32768 [n] [--dtype bf16] [--chunks N]      decode against a key/value cache, JSON (TB/s of K, V read)
// ... -- --bdn [BenchmarkDotNet arguments, e.g. --filter '*']                the BenchmarkDotNet suites, in process
if (args.Length == 0)
    return MainJob.Run();
if (args[0] == "--throughput")
    return Throughput.Run(args[1..]);
if (args[0] == "--decode")
    return DecodeBench.Run(args[1..]);
if (args[0] == "--soak")
    return Soak.Run(args[1..]);
if (args[0] == "--report")
    return Report.Run(args[1..]);
if (args[0] == "--bdn")
{
    // AsDefault: jobs given on the command line (--job short, --job dry) inherit the in-process toolchain, so no SDK is needed.
    var config = DefaultConfig.Instance.AddJob(Job.Default.WithToolchain(InProcessEmitToolchain.Instance).AsDefault());
    BenchmarkSwitcher.FromAssembly(typeof(MainJob).Assembly).Run(args[1..], config);
    return 0;
}
Console.Error.WriteLine($"unknown arguments: {string.Join(' ', args)}; see Program.cs for the modes.");
return 2;
