using ILGPU;

namespace StickBreaking.ILGPU.Kernels;

/// <summary>Cooperative loads of a [rows, DimChunk] slice of a [T, D] head into shared memory, zero-filled at every edge.</summary>
internal static class TileLoad
{
    /// <summary>Head dimensions staged in shared memory at a time.</summary>
    public const int DimChunk = 16;
    /// <summary>Row stride of a staged chunk, padded against bank conflicts.</summary>
    public const int ChunkStride = DimChunk + 1;

    /// <summary>
    /// chunk[r, dd] = x[head, first + r, c0 + dd] for r &lt; <paramref name="rows"/>, dd &lt; DimChunk; 0 where the
    /// row is at or past <paramref name="length"/> or the column at or past <paramref name="headDim"/>.
    /// </summary>
    public static void Rows(ArrayView<float> x, ArrayView<float> chunk, long headBase, int first, int rows,
        int length, int headDim, int c0, int tid, int groupSize)
    {
        for (int e = tid; e < rows * DimChunk; e += groupSize)
        {
            int r = e / DimChunk, dd = e - r * DimChunk;
            int row = first + r, d = c0 + dd;
            chunk[r * ChunkStride + dd] = row < length && d < headDim ? x[headBase + (long)row * headDim + d] : 0f;
        }
    }
}
