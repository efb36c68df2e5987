using System;
using System.Collections.Generic;
using System.Globalization;
using System.IO;
using System.Linq;
using System.Text;
using System.Text.Json;

namespace StickBreaking.ILGPU.Bench;

/// <summary>
/// <c>--report OURS.jsonl PEERS.jsonl OUT.md OUT.png [header lines...]</c>: turns one GPU run's JSON lines
/// (this project's <c>--throughput</c> and <c>peers.py</c>) into the table of docs/performance.md and a
/// log-log plot of time against T. Runs anywhere; only the JSON comes from a machine with an NVIDIA GPU.
/// </summary>
internal static class Report
{
    public static int Run(string[] args)
    {
        if (args.Length < 4)
        {
            Console.Error.WriteLine("usage: --report OURS.jsonl PEERS.jsonl OUT.md OUT.png [header lines...]");
            return 2;
        }
        var ours = Read(args[0]).Where(o => o.TryGetProperty("project", out _)).ToList();
        var peers = Read(args[1]).Where(o => o.TryGetProperty("peer", out _)).ToList();
        var md = new StringBuilder();
        foreach (var line in args.Skip(4))
            md.AppendLine(line);
        md.AppendLine();
        // The published Triton stick-breaking kernel gets columns only when peers.py could time it.
        bool triton = peers.Any(p => p.GetProperty("peer").GetString() == "triton_stickbreaking" && p.TryGetProperty("fwd_ms", out _));
        md.AppendLine("| T | ours fp32 fwd ms | TFLOP/s | ours fp32 bwd ms | TFLOP/s | ours fwd+bwd ms | SDPA fp32 fwd ms | SDPA fp32 fwd+bwd ms | SDPA bf16 fwd ms | SDPA bf16 fwd+bwd ms | naive torch SB fp32 fwd ms |"
            + (triton ? " Triton SB fp32 fwd ms | Triton SB bf16 fwd ms | Triton SB bf16 fwd+bwd ms |" : ""));
        md.AppendLine("|---|---|---|---|---|---|---|---|---|---|---|" + (triton ? "---|---|---|" : ""));
        foreach (var o in ours.OrderBy(o => o.GetProperty("T").GetInt32()))
        {
            int t = o.GetProperty("T").GetInt32();
            var cells = new List<string>
            {
                "", t.ToString(CultureInfo.InvariantCulture),
                F(o, "fwd_ms"), F(o, "fwd_tflops"), F(o, "bwd_ms"), F(o, "bwd_tflops"), F(o, "fwdbwd_ms"),
                Peer(peers, "sdpa_causal", "torch.float32", t, "fwd_ms"), Peer(peers, "sdpa_causal", "torch.float32", t, "fwdbwd_ms"),
                Peer(peers, "sdpa_causal", "torch.bfloat16", t, "fwd_ms"), Peer(peers, "sdpa_causal", "torch.bfloat16", t, "fwdbwd_ms"),
                Peer(peers, "naive_torch_stickbreaking", "torch.float32", t, "fwd_ms"),
            };
            if (triton)
            {
                cells.Add(Peer(peers, "triton_stickbreaking", "torch.float32", t, "fwd_ms"));
                cells.Add(Peer(peers, "triton_stickbreaking", "torch.bfloat16", t, "fwd_ms"));
                cells.Add(Peer(peers, "triton_stickbreaking", "torch.bfloat16", t, "fwdbwd_ms"));
            }
            cells.Add("");
            md.AppendLine(string.Join(" | ", cells).Trim());
        }
        md.AppendLine();
        foreach (var p in peers.Where(p => p.TryGetProperty("tflops", out _)))
            md.AppendLine($"- {p.GetProperty("peer").GetString()}: {p.GetProperty("tflops").GetDouble():F1} TFLOP/s (8192^3)");
        File.WriteAllText(args[2], md.ToString());

        try
        {
            Plot(ours, peers, args[3]);
        }
        catch (Exception ex) when (ex is TypeInitializationException or DllNotFoundException)
        {
            // scripts/publish-gpu.sh drops SkiaSharp's native library from its folder; the table is still written.
            Console.WriteLine($"wrote {args[2]}; no plot: SkiaSharp's native library cannot be loaded here ({ex.GetBaseException().Message.Split('\n')[0]}). Run --report where the project is built.");
            return 1;
        }
        Console.WriteLine($"wrote {args[2]} and {args[3]}");
        return 0;
    }

    private static void Plot(List<JsonElement> ours, List<JsonElement> peers, string path)
    {
        var plot = new ScottPlot.Plot();
        AddSeries(plot, "StickBreaking.ILGPU fp32 forward", ours.Select(o => (T: o.GetProperty("T").GetInt32(), Ms: o.GetProperty("fwd_ms").GetDouble())));
        AddSeries(plot, "StickBreaking.ILGPU fp32 backward", ours.Select(o => (T: o.GetProperty("T").GetInt32(), Ms: o.GetProperty("bwd_ms").GetDouble())));
        foreach (var (peer, dtype, field, label) in new[]
        {
            ("sdpa_causal", "torch.float32", "fwd_ms", "PyTorch SDPA (softmax) fp32 forward"),
            ("sdpa_causal", "torch.bfloat16", "fwd_ms", "PyTorch SDPA (softmax) bf16 forward"),
            ("sdpa_causal", "torch.float32", "fwdbwd_ms", "PyTorch SDPA (softmax) fp32 fwd+bwd"),
            ("naive_torch_stickbreaking", "torch.float32", "fwd_ms", "naive PyTorch stick-breaking fp32 forward"),
            ("triton_stickbreaking", "torch.float32", "fwd_ms", "Triton stick-breaking fp32 forward"),
        })
        {
            AddSeries(plot, label, peers.Where(p => p.GetProperty("peer").GetString() == peer && p.TryGetProperty("dtype", out var d) && d.GetString() == dtype && p.TryGetProperty(field, out _))
                .Select(p => (T: p.GetProperty("T").GetInt32(), Ms: p.GetProperty(field).GetDouble())));
        }
        var xTicks = new ScottPlot.TickGenerators.NumericManual();
        foreach (int t in ours.Select(o => o.GetProperty("T").GetInt32()).Distinct())
            xTicks.AddMajor(Math.Log2(t), t.ToString(CultureInfo.InvariantCulture));
        plot.Axes.Bottom.TickGenerator = xTicks;
        var yTicks = new ScottPlot.TickGenerators.NumericManual();
        for (int decade = -2; decade <= 4; decade++)
        {
            yTicks.AddMajor(decade, Math.Pow(10, decade).ToString("G", CultureInfo.InvariantCulture));
            for (int m = 2; m < 10; m++)
                yTicks.AddMinor(decade + Math.Log10(m));
        }
        plot.Axes.Left.TickGenerator = yTicks;
        plot.XLabel("T (tokens), B=4 H=12 D=128");
        plot.YLabel("ms (log scale)");
        plot.Title("Causal attention on one H200, one run");
        plot.ShowLegend(ScottPlot.Alignment.UpperLeft);
        plot.SavePng(path, 900, 600);
    }

    private static void AddSeries(ScottPlot.Plot plot, string label, IEnumerable<(int T, double Ms)> points)
    {
        var list = points.OrderBy(p => p.T).ToList();
        if (list.Count == 0)
            return;
        var scatter = plot.Add.Scatter(list.Select(p => Math.Log2(p.T)).ToArray(), list.Select(p => Math.Log10(p.Ms)).ToArray());
        scatter.LegendText = label;
    }

    private static List<JsonElement> Read(string path) =>
        File.ReadLines(path).Where(l => l.TrimStart().StartsWith('{'))
            .Select(l => JsonDocument.Parse(l).RootElement.Clone()).ToList();

    private static string F(JsonElement e, string field) =>
        e.TryGetProperty(field, out var v) ? v.GetDouble().ToString("0.###", CultureInfo.InvariantCulture) : "";

    private static string Peer(List<JsonElement> peers, string peer, string dtype, int t, string field)
    {
        var match = peers.FirstOrDefault(p => p.GetProperty("peer").GetString() == peer
            && p.TryGetProperty("dtype", out var d) && d.GetString() == dtype
            && p.TryGetProperty("T", out var pt) && pt.GetInt32() == t);
        string value = match.ValueKind == JsonValueKind.Object ? F(match, field) : "";
        return value.Length > 0 ? value : "n/a";
    }
}
