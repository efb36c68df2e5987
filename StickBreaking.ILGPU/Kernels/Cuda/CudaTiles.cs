namespace StickBreaking.ILGPU.Kernels.Cuda;

/// <summary>
/// The tile every CUDA register-tile kernel (forward and both backward passes) works on, declared once: a group
/// of <see cref="GroupSize"/> threads owns <see cref="BlockRows"/> query rows and walks tiles of
/// <see cref="KeyTile"/> keys. Thread tid holds rows ty*4+i and keys tx*4+j of a tile (ty = tid / 16,
/// tx = tid % 16): <see cref="Segments"/> threads per row, two rows per warp of <see cref="WarpSize"/>.
/// Each kernel's own launch (shared memory, launch bound) is its <c>Launch</c> description.
/// </summary>
internal static class CudaTiles
{
    /// <summary>Threads per group.</summary>
    public const int GroupSize = 256;
    /// <summary>Query rows per group (and per tile).</summary>
    public const int BlockRows = 64;
    /// <summary>Keys per tile.</summary>
    public const int KeyTile = 64;
    /// <summary>The largest head dimension the register tiles hold.</summary>
    public const int MaxHeadDim = 128;
    /// <summary>Segments (of 4 keys) per row of a key tile: the 16 threads of a row.</summary>
    public const int Segments = 16;
    /// <summary>Threads per warp the row scans assume (two rows per warp).</summary>
    public const int WarpSize = 32;
}
