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
        var all = Read(args[0]).Where(o => o.TryGetProperty("project", out _)).ToList();
        var ours = all.Where(o => DType(o) == "float32").ToList();
        var ours16 = all.Where(o => DType(o) is "bfloat16" or "float16").ToList();
        var peers = Read(args[1]).Where(o => o.TryGetProperty("peer", out _)).ToList();
        var md = new StringBuilder();
        foreach (var line in args.Skip(4))
            md.AppendLine(line);
        md.AppendLine();
        // The published Triton stick-breaking kernel gets columns only when peers.py could time it.
        bool triton = peers.Any(p => p.GetProperty("peer").GetString() == "triton_stickbreaking" && p.TryGetProperty("fwd_ms", out _));
        md.AppendLine("fp32, B = 4, H = 12, D = 128 (rows of other shapes in the input are listed after):");
        md.AppendLine();
        md.AppendLine("| T | ours fp32 fwd ms | TFLOP/s | ours fp32 bwd ms | TFLOP/s | ours fwd+bwd ms | SDPA fp32 fwd ms | SDPA fp32 fwd+bwd ms | SDPA bf16 fwd ms | SDPA bf16 fwd+bwd ms | naive torch SB fp32 fwd ms |"
            + (triton ? " Triton SB fp32 fwd ms | Triton SB bf16 fwd ms | Triton SB bf16 fwd+bwd ms |" : ""));
        md.AppendLine("|---|---|---|---|---|---|---|---|---|---|---|" + (triton ? "---|---|---|" : ""));
        foreach (var o in ours.OrderBy(o => o.GetProperty("D").GetInt32()).ThenBy(o => o.GetProperty("T").GetInt32()))
        {
            int t = o.GetProperty("T").GetInt32(), d = o.GetProperty("D").GetInt32();
            var cells = new List<string>
            {
                "", t.ToString(CultureInfo.InvariantCulture),
                F(o, "fwd_ms"), F(o, "fwd_tflops"), F(o, "bwd_ms"), F(o, "bwd_tflops"), F(o, "fwdbwd_ms"),
                Peer(peers, "sdpa_causal", "torch.float32", t, d, "fwd_ms"), Peer(peers, "sdpa_causal", "torch.float32", t, d, "fwdbwd_ms"),
                Peer(peers, "sdpa_causal", "torch.bfloat16", t, d, "fwd_ms"), Peer(peers, "sdpa_causal", "torch.bfloat16", t, d, "fwdbwd_ms"),
                Peer(peers, "naive_torch_stickbreaking", "torch.float32", t, d, "fwd_ms"),
            };
            if (triton)
            {
                cells.Add(Peer(peers, "triton_stickbreaking", "torch.float32", t, d, "fwd_ms"));
                cells.Add(Peer(peers, "triton_stickbreaking", "torch.bfloat16", t, d, "fwd_ms"));
                cells.Add(Peer(peers, "triton_stickbreaking", "torch.bfloat16", t, d, "fwdbwd_ms"));
            }
            cells.Add("");
            md.AppendLine(string.Join(" | ", cells).Trim());
        }
        if (ours16.Count > 0)
        {
            // The 16-bit forward against the peers a user would pick instead, from the same run.
            md.AppendLine();
            md.AppendLine("16-bit forward (causal; TFLOP/s count 4 T^2 D / 2 per head):");
            md.AppendLine();
            md.AppendLine("| B | H | T | D | ours bf16 fwd ms | TFLOP/s | ours fp16 fwd ms | TFLOP/s | Triton SB bf16 fwd ms | TFLOP/s | ours bf16 / Triton | SDPA (softmax) bf16 fwd ms | ours fp32 fwd ms |");
            md.AppendLine("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
            foreach (var key in ours16.Select(o => (B: o.GetProperty("B").GetInt32(), H: o.GetProperty("H").GetInt32(),
                         T: o.GetProperty("T").GetInt32(), D: o.GetProperty("D").GetInt32())).Distinct().OrderBy(k => k.D).ThenBy(k => k.T))
            {
                JsonElement? Ours(string dtype) => ours16.Concat(ours).Where(o => DType(o) == dtype && o.GetProperty("T").GetInt32() == key.T
                    && o.GetProperty("D").GetInt32() == key.D && o.GetProperty("H").GetInt32() == key.H).Cast<JsonElement?>().FirstOrDefault();
                string Cell(JsonElement? e, string field) => e is { } v ? F(v, field) : "n/a";
                var bf = Ours("bfloat16");
                string tritonMs = Peer(peers, "triton_stickbreaking", "torch.bfloat16", key.T, key.D, "fwd_ms");
                string ratio = bf is { } b && double.TryParse(tritonMs, NumberStyles.Float, CultureInfo.InvariantCulture, out double tm)
                    ? (b.GetProperty("fwd_ms").GetDouble() / tm).ToString("0.00", CultureInfo.InvariantCulture) : "n/a";
                md.AppendLine(string.Join(" | ", new[]
                {
                    "", key.B.ToString(CultureInfo.InvariantCulture), key.H.ToString(CultureInfo.InvariantCulture),
                    key.T.ToString(CultureInfo.InvariantCulture), key.D.ToString(CultureInfo.InvariantCulture),
                    Cell(bf, "fwd_ms"), Cell(bf, "fwd_tflops"), Cell(Ours("float16"), "fwd_ms"), Cell(Ours("float16"), "fwd_tflops"),
                    tritonMs, Peer(peers, "triton_stickbreaking", "torch.bfloat16", key.T, key.D, "fwd_tflops"), ratio,
                    Peer(peers, "sdpa_causal", "torch.bfloat16", key.T, key.D, "fwd_ms"), Cell(Ours("float32"), "fwd_ms"), "",
                }).Trim());
            }
        }
        if (ours16.Any(o => Timed(o, "bwd_ms")))
        {
            // Training: the 16-bit training forward plus the backward, against the Triton kernel's and SDPA's fwd+bwd.
            md.AppendLine();
            md.AppendLine("16-bit training (causal; fwd = the training forward, which also writes the backward's snapshots; ms):");
            md.AppendLine();
            md.AppendLine("| B | H | T | D | ours bf16 fwd | bwd (pass 1 + pass 2) | fwd+bwd | Triton SB bf16 fwd+bwd | ours bf16 / Triton | ours fp16 fwd+bwd | Triton SB fp16 fwd+bwd | SDPA (softmax) bf16 fwd+bwd |");
            md.AppendLine("|---|---|---|---|---|---|---|---|---|---|---|---|");
            foreach (var key in ours16.Where(o => Timed(o, "bwd_ms")).Select(o => (B: o.GetProperty("B").GetInt32(), H: o.GetProperty("H").GetInt32(),
                         T: o.GetProperty("T").GetInt32(), D: o.GetProperty("D").GetInt32())).Distinct().OrderBy(k => k.D).ThenBy(k => k.T))
            {
                JsonElement? Ours(string dtype) => ours16.Where(o => DType(o) == dtype && Timed(o, "bwd_ms") && o.GetProperty("T").GetInt32() == key.T
                    && o.GetProperty("D").GetInt32() == key.D && o.GetProperty("H").GetInt32() == key.H).Cast<JsonElement?>().FirstOrDefault();
                string Cell(JsonElement? e, string field) => e is { } v ? F(v, field) : "n/a";
                var bf = Ours("bfloat16");
                string tritonMs = Peer(peers, "triton_stickbreaking", "torch.bfloat16", key.T, key.D, "fwdbwd_ms");
                string ratio = bf is { } b && double.TryParse(tritonMs, NumberStyles.Float, CultureInfo.InvariantCulture, out double tm)
                    ? (b.GetProperty("fwdbwd_ms").GetDouble() / tm).ToString("0.00", CultureInfo.InvariantCulture) : "n/a";
                string passes = bf is { } p1 ? $"{F(p1, "bwd_ms")} ({F(p1, "bwd_pass1_ms")} + {F(p1, "bwd_pass2_ms")})" : "n/a";
                md.AppendLine(string.Join(" | ", new[]
                {
                    "", key.B.ToString(CultureInfo.InvariantCulture), key.H.ToString(CultureInfo.InvariantCulture),
                    key.T.ToString(CultureInfo.InvariantCulture), key.D.ToString(CultureInfo.InvariantCulture),
                    Cell(bf, "fwd_training_ms"), passes, Cell(bf, "fwdbwd_ms"), tritonMs, ratio,
                    Cell(Ours("float16"), "fwdbwd_ms"), Peer(peers, "triton_stickbreaking", "torch.float16", key.T, key.D, "fwdbwd_ms"),
                    Peer(peers, "sdpa_causal", "torch.bfloat16", key.T, key.D, "fwdbwd_ms"), "",
                }).Trim());
            }
        }
        md.AppendLine();
        foreach (var p in peers.Where(p => p.TryGetProperty("tflops", out _)))
            md.AppendLine($"- {p.GetProperty("peer").GetString()}: {p.GetProperty("tflops").GetDouble():F1} TFLOP/s (8192^3)");
        File.WriteAllText(args[2], md.ToString());

        try
        {
            Plot(ours, ours16, peers, args[3]);
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

    private static void Plot(List<JsonElement> ours, List<JsonElement> ours16, List<JsonElement> peers, string path)
    {
        var plot = new ScottPlot.Plot();
        ours = ours.Where(o => o.GetProperty("D").GetInt32() == 128).ToList();
        peers = peers.Where(p => !p.TryGetProperty("D", out var d) || d.GetInt32() == 128).ToList();
        foreach (var (dtype, label) in new[] { ("bfloat16", "StickBreaking.ILGPU bf16 forward (tensor cores)"), ("float16", "StickBreaking.ILGPU fp16 forward (tensor cores)") })
            AddSeries(plot, label, ours16.Where(o => DType(o) == dtype && o.GetProperty("D").GetInt32() == 128)
                .Select(o => (T: o.GetProperty("T").GetInt32(), Ms: o.GetProperty("fwd_ms").GetDouble())));
        AddSeries(plot, "StickBreaking.ILGPU bf16 fwd+bwd", ours16.Where(o => DType(o) == "bfloat16" && o.GetProperty("D").GetInt32() == 128 && Timed(o, "fwdbwd_ms"))
            .Select(o => (T: o.GetProperty("T").GetInt32(), Ms: o.GetProperty("fwdbwd_ms").GetDouble())));
        AddSeries(plot, "StickBreaking.ILGPU fp32 forward", ours.Select(o => (T: o.GetProperty("T").GetInt32(), Ms: o.GetProperty("fwd_ms").GetDouble())));
        AddSeries(plot, "StickBreaking.ILGPU fp32 backward", ours.Select(o => (T: o.GetProperty("T").GetInt32(), Ms: o.GetProperty("bwd_ms").GetDouble())));
        foreach (var (peer, dtype, field, label) in new[]
        {
            ("sdpa_causal", "torch.float32", "fwd_ms", "PyTorch SDPA (softmax) fp32 forward"),
            ("sdpa_causal", "torch.bfloat16", "fwd_ms", "PyTorch SDPA (softmax) bf16 forward"),
            ("sdpa_causal", "torch.float32", "fwdbwd_ms", "PyTorch SDPA (softmax) fp32 fwd+bwd"),
            ("naive_torch_stickbreaking", "torch.float32", "fwd_ms", "naive PyTorch stick-breaking fp32 forward"),
            ("triton_stickbreaking", "torch.float32", "fwd_ms", "Triton stick-breaking fp32 (TF32) forward"),
            ("triton_stickbreaking", "torch.bfloat16", "fwd_ms", "Triton stick-breaking bf16 forward"),
            ("triton_stickbreaking", "torch.bfloat16", "fwdbwd_ms", "Triton stick-breaking bf16 fwd+bwd"),
            ("sdpa_causal", "torch.bfloat16", "fwdbwd_ms", "PyTorch SDPA (softmax) bf16 fwd+bwd"),
        })
        {
            AddSeries(plot, label, peers.Where(p => p.GetProperty("peer").GetString() == peer && p.TryGetProperty("dtype", out var d) && d.GetString() == dtype && p.TryGetProperty(field, out _))
                .Select(p => (T: p.GetProperty("T").GetInt32(), Ms: p.GetProperty(field).GetDouble())));
        }
        var xTicks = new ScottPlot.TickGenerators.NumericManual();
        foreach (int t in ours.Concat(ours16.Where(o => o.GetProperty("D").GetInt32() == 128)).Select(o => o.GetProperty("T").GetInt32()).Distinct())
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
        plot.Title("Causal attention on one H200 (ours and the peers in one session)");
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
        Timed(e, field) ? e.GetProperty(field).GetDouble().ToString("0.###", CultureInfo.InvariantCulture) : "";

    /// <summary>Whether the line holds a number for <paramref name="field"/> (--forward-only lines hold null for the backward's).</summary>
    private static bool Timed(JsonElement e, string field) =>
        e.TryGetProperty(field, out var v) && v.ValueKind == JsonValueKind.Number;

    private static string DType(JsonElement e) => e.TryGetProperty("dtype", out var d) ? d.GetString() ?? "" : "float32";

    private static string Peer(List<JsonElement> peers, string peer, string dtype, int t, int headDim, string field)
    {
        var match = peers.FirstOrDefault(p => p.GetProperty("peer").GetString() == peer
            && p.TryGetProperty("dtype", out var d) && d.GetString() == dtype
            && p.TryGetProperty("T", out var pt) && pt.GetInt32() == t
            && (!p.TryGetProperty("D", out var pd) || pd.GetInt32() == headDim));
        string value = match.ValueKind == JsonValueKind.Object ? F(match, field) : "";
        return value.Length > 0 ? value : "n/a";
    }
}
