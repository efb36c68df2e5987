using System;
using System.Collections.Generic;
using System.Diagnostics;
using System.IO;
using System.Linq;
using System.Text.Json;
using NUnit.Framework;

namespace StickBreaking.ILGPU.Tests.Infrastructure;

/// <summary>
/// Runs cases that could end the process (an assertion in ILGPU, an exception on its threads) in a child
/// process: the test executable itself, filtered to the [Explicit] <see cref="ChildProcessProbe"/> test, with the
/// backend and the cases in environment variables. The child writes one JSON line when a case starts and one
/// when it ends, so a case that kills the child is named (with the exit code), and the child is started again
/// for the cases after it. One child runs every case when none kills it (each start costs a few seconds).
/// </summary>
internal static class ChildProcess
{
    public const string BackendVariable = "STICKBREAKING_PROBE_BACKEND";
    public const string CasesVariable = "STICKBREAKING_PROBE_CASES";
    public const string OutVariable = "STICKBREAKING_PROBE_OUT";

    /// <summary>What one case did in the child: the exception it threw, and whether the call after it was right.</summary>
    public sealed record Outcome(string Case, string? Type, string? Param, string? Message, string? After, string? Died);

    /// <summary>Runs <paramref name="cases"/> on <paramref name="backend"/> in as few child processes as possible.</summary>
    public static Dictionary<string, Outcome> Run(string backend, IReadOnlyList<string> cases)
    {
        var outcomes = new Dictionary<string, Outcome>();
        var remaining = cases.ToList();
        while (remaining.Count > 0)
        {
            string outFile = Path.Combine(Path.GetTempPath(), $"stickbreaking-probe-{Guid.NewGuid():N}.jsonl");
            var (exitCode, log) = Start(backend, remaining, outFile);
            string? started = null;
            if (File.Exists(outFile))
            {
                foreach (string line in File.ReadAllLines(outFile))
                {
                    var record = JsonSerializer.Deserialize<Dictionary<string, string?>>(line)!;
                    string name = record["case"]!;
                    if (record["phase"] == "start")
                        started = name;
                    else
                    {
                        outcomes[name] = new Outcome(name, record["type"], record["param"], record["message"], record["after"], null);
                        started = null;
                    }
                }
                File.Delete(outFile);
            }
            remaining.RemoveAll(outcomes.ContainsKey);
            if (remaining.Count == 0)
                break;
            // The child ended inside a case (or before the first): that case failed; go on with the rest.
            string dead = started ?? remaining[0];
            string tail = log.Length > 3000 ? log[^3000..] : log;
            outcomes[dead] = new Outcome(dead, null, null, null, null,
                $"the child process ended in this case with exit code {exitCode}; its output ended with:\n{tail}");
            remaining.Remove(dead);
        }
        return outcomes;
    }

    private static (int ExitCode, string Log) Start(string backend, IReadOnlyList<string> cases, string outFile)
    {
        string dll = typeof(ChildProcess).Assembly.Location;
        string appHost = Path.Combine(Path.GetDirectoryName(dll)!, Path.GetFileNameWithoutExtension(dll) + (OperatingSystem.IsWindows() ? ".exe" : ""));
        var info = File.Exists(appHost)
            ? new ProcessStartInfo(appHost)
            : new ProcessStartInfo(Environment.GetEnvironmentVariable("DOTNET_HOST_PATH") ?? "dotnet") { ArgumentList = { "exec", dll } };
        info.ArgumentList.Add("--filter");
        info.ArgumentList.Add($"FullyQualifiedName={typeof(ChildProcessProbe).FullName}.{nameof(ChildProcessProbe.Run)}");
        info.Environment[BackendVariable] = backend;
        info.Environment[CasesVariable] = string.Join(',', cases);
        info.Environment[OutVariable] = outFile;
        info.Environment.Remove("STICKBREAKING_BACKENDS");
        info.RedirectStandardOutput = true;
        info.RedirectStandardError = true;
        info.WorkingDirectory = Path.GetTempPath();
        using var process = Process.Start(info)!;
        var stdout = process.StandardOutput.ReadToEndAsync();
        var stderr = process.StandardError.ReadToEndAsync();
        if (!process.WaitForExit(TimeSpan.FromMinutes(5)))
        {
            process.Kill(entireProcessTree: true);
            process.WaitForExit();
        }
        string log = stdout.Result + stderr.Result;
        TestContext.Progress.WriteLine($"[{backend}] child process for {cases.Count} case(s): exit code {process.ExitCode}");
        return (process.ExitCode, log);
    }
}

/// <summary>The child's side of <see cref="ChildProcess"/>: explicit, so it runs only when a parent selects it.</summary>
[TestFixture]
public sealed class ChildProcessProbe
{
    [Test, Explicit("run by the misuse tests in a child process")]
    public void Run()
    {
        string? backend = Environment.GetEnvironmentVariable(ChildProcess.BackendVariable);
        string? cases = Environment.GetEnvironmentVariable(ChildProcess.CasesVariable);
        string? outFile = Environment.GetEnvironmentVariable(ChildProcess.OutVariable);
        if (backend is null || cases is null || outFile is null)
            Assert.Ignore("only a parent test runs this, in a child process");
        using var writer = new StreamWriter(outFile, append: true) { AutoFlush = true };
        var (context, accelerator, reason) = Backends.Open(backend);
        if (accelerator is null)
            throw new InvalidOperationException($"{backend} absent in the child: {reason}");
        using var _ = context;
        using var __ = accelerator;
        using var attention = new StickBreakingAttention(accelerator);
        foreach (string name in cases.Split(','))
        {
            writer.WriteLine(JsonSerializer.Serialize(new Dictionary<string, string?> { ["case"] = name, ["phase"] = "start" }));
            Exception? thrown = null;
            try
            {
                MisuseCases.Run(name, backend, accelerator, attention);
            }
            catch (Exception ex)
            {
                thrown = ex;
            }
            string after;
            try
            {
                after = MisuseCases.CorrectCall(accelerator, attention);
            }
            catch (Exception ex)
            {
                after = $"the call after it threw {ex.GetType().Name}: {ex.Message}";
            }
            writer.WriteLine(JsonSerializer.Serialize(new Dictionary<string, string?>
            {
                ["case"] = name, ["phase"] = "done", ["type"] = thrown?.GetType().FullName,
                ["param"] = thrown switch { ArgumentException a => a.ParamName, ObjectDisposedException o => o.ObjectName, _ => null },
                ["message"] = thrown?.Message, ["after"] = after,
            }));
        }
    }
}
