namespace StickBreaking.ILGPU.Kernels.Common;

/// <summary>
/// The granularity of the backward's snapshots (docs/math.md, "Snapshots"): the forward writes its running log-stick
/// sum <c>acc</c> per (row, key tile) and the first backward pass writes the prefix <c>P</c> per (row, key
/// tile). Every kernel that reads or writes them walks keys in tiles of this size, aligned at key 0.
/// </summary>
internal static class Snapshots
{
    /// <summary>Keys per tile; a snapshot costs one float per row per tile.</summary>
    public const int KeyTile = 32;

    /// <summary>Number of key tiles for a sequence of <paramref name="length"/> tokens.</summary>
    public static int TileCount(int length) => (length + KeyTile - 1) / KeyTile;

    /// <summary>
    /// Index of snapshot (row, tile) of head <paramref name="head"/>: tile-major within a head ([head][tile][row]), so
    /// that the rows a warp holds at one tile are adjacent (coalesced stores in the forward and the first backward
    /// pass, coalesced loads in the second: a row-major [row][tile] layout cost the training forward about 3 % at T = 4096).
    /// </summary>
    public static long Index(int head, int row, int tile, int length, int tiles) =>
        ((long)head * tiles + tile) * length + row;
}
