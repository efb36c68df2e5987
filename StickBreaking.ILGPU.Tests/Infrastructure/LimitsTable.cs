using System;
using System.Text;
using StickBreaking.ILGPU.Launch;

namespace StickBreaking.ILGPU.Tests.Infrastructure;

/// <summary>
/// The largest T a call runs for a given (B, H, D) and device memory, from the library's own memory formulas
/// and limits; docs/limits.md's table is this function's output (checked by a test).
/// </summary>
internal static class LimitsTable
{
    /// <summary>Groups along grid Y on CUDA devices (and ILGPU's CPU accelerator).</summary>
    public const int CudaGridY = 65535;

    /// <summary>
    /// The largest T for (B, H, D) whose call fits <paramref name="memoryBytes"/>, and what stops it there:
    /// "memory", "grid" (rows per group times the grid's Y limit) or "floats per tensor".
    /// </summary>
    public static (int Length, string LimitedBy) LargestLength(int b, int h, int d, long memoryBytes, bool training, int rowsPerBlock)
    {
        long grid = Math.Min((long)CudaGridY * rowsPerBlock, AttentionShape.MaxLength);
        long tensor = AttentionShape.MaxTensorLength / ((long)b * h * d);
        long upper = Math.Min(grid, tensor);
        long Bytes(long t)
        {
            var shape = new AttentionShape(b, h, (int)t, d);
            return training ? Guards.HostBackwardBytes(shape) : Guards.HostForwardBytes(shape);
        }
        if (Bytes(upper) <= memoryBytes)
            return ((int)upper, grid <= tensor ? "grid" : "floats per tensor");
        long lo = 0, hi = upper;   // Bytes(lo) fits (or lo = 0), Bytes(hi) does not
        while (hi - lo > 1)
        {
            long mid = lo + (hi - lo) / 2;
            if (Bytes(mid) <= memoryBytes)
                lo = mid;
            else
                hi = mid;
        }
        return ((int)lo, "memory");
    }

    public static readonly (int B, int H, int D)[] Shapes = [(1, 1, 128), (4, 12, 128), (4, 16, 64), (8, 32, 128)];

    public static readonly (string Name, long Bytes)[] Memories = [("80 GB", 80_000_000_000), ("141 GB", 141_000_000_000)];

    /// <summary>The markdown table in docs/limits.md (CUDA kernels: 64 rows per group, D up to 128).</summary>
    public static string Markdown()
    {
        var text = new StringBuilder();
        text.Append("| B | H | D |");
        foreach (var (name, _) in Memories)
            text.Append($" inference, {name} | training, {name} |");
        text.Append('\n').Append("| --- | --- | --- |");
        foreach (var _ in Memories)
            text.Append(" --- | --- |");
        text.Append('\n');
        foreach (var (b, h, d) in Shapes)
        {
            text.Append($"| {b} | {h} | {d} |");
            foreach (var (_, bytes) in Memories)
            {
                foreach (bool training in new[] { false, true })
                {
                    var (t, by) = LargestLength(b, h, d, bytes, training, rowsPerBlock: 64);
                    text.Append($" {t:N0} ({by}) |");
                }
            }
            text.Append('\n');
        }
        return text.ToString();
    }
}
