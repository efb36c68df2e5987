using ILGPU;
using ILGPU.Runtime;

namespace StickBreaking.ILGPU.Kernels.Common;

/// <summary>Cooperative loads of a [rows, DimChunk] slice of a [T, D] head into shared memory, zero-filled at every edge.</summary>
internal static class TileLoad
{
    /// <summary>Head dimensions staged in shared memory at a time.</summary>
    public const int DimChunk = 16;
    /// <summary>Row stride of a staged chunk, padded against bank conflicts.</summary>
    public const int ChunkStride = DimChunk + 1;

    /// <summary>
    /// chunk[r, dd] = x[head, first + r, c0 + dd] for r &lt; <paramref name="rows"/>, dd &lt; DimChunk; 0 where the
    /// row is at or past <paramref name="length"/> or the column at or past <paramref name="headDim"/>; each element
    /// converted from its storage to fp32.
    /// </summary>
    public static void Rows<T, TElement>(ArrayView<T> x, ArrayView<float> chunk, long headBase, int first, int rows,
        int length, int headDim, int c0, int tid, int groupSize)
        where T : unmanaged
        where TElement : struct, IElement<T>
    {
        for (int e = tid; e < rows * DimChunk; e += groupSize)
        {
            int r = e / DimChunk, dd = e - r * DimChunk;
            int row = first + r, d = c0 + dd;
            chunk[r * ChunkStride + dd] = row < length && d < headDim ? default(TElement).Load(x[headBase + (long)row * headDim + d]) : 0f;
        }
    }
}

/// <summary>
/// The two products both portable backward passes rebuild per (block of query rows, key tile): z[r, j] = q_r . k_j and
/// g[r, j] = dO_r . v_j (unscaled), over all of D, staged <see cref="TileLoad.DimChunk"/> dimensions at a time.
/// Rows and keys past T are staged as zeros. Ends with a barrier: z and g are ready for every thread.
/// </summary>
internal static class BackwardDots
{
    public static void Run<TStored, TElement>(BackwardArgs<TStored> a, ArrayView<float> qChunk, ArrayView<float> doChunk,
        ArrayView<float> kChunk, ArrayView<float> vChunk, ArrayView<float> z, ArrayView<float> g, long headBase,
        int row0, int rows, int key0, int keyTile, int tid, int groupSize)
        where TStored : unmanaged
        where TElement : struct, IElement<TStored>
    {
        const int DimChunk = TileLoad.DimChunk, ChunkStride = TileLoad.ChunkStride;
        int T = a.Length, D = a.HeadDim;
        for (int e = tid; e < rows * keyTile; e += groupSize)
        {
            z[e] = 0f;
            g[e] = 0f;
        }
        for (int c0 = 0; c0 < D; c0 += DimChunk)
        {
            Group.Barrier();
            TileLoad.Rows<TStored, TElement>(a.Q, qChunk, headBase, row0, rows, T, D, c0, tid, groupSize);
            TileLoad.Rows<TStored, TElement>(a.DO, doChunk, headBase, row0, rows, T, D, c0, tid, groupSize);
            TileLoad.Rows<TStored, TElement>(a.K, kChunk, headBase, key0, keyTile, T, D, c0, tid, groupSize);
            TileLoad.Rows<TStored, TElement>(a.V, vChunk, headBase, key0, keyTile, T, D, c0, tid, groupSize);
            Group.Barrier();
            for (int e = tid; e < rows * keyTile; e += groupSize)
            {
                int r = e / keyTile, j = e - r * keyTile;
                float qk = z[e], dov = g[e];
                for (int dd = 0; dd < DimChunk; dd++)
                {
                    qk += qChunk[r * ChunkStride + dd] * kChunk[j * ChunkStride + dd];
                    dov += doChunk[r * ChunkStride + dd] * vChunk[j * ChunkStride + dd];
                }
                z[e] = qk;
                g[e] = dov;
            }
        }
        Group.Barrier();
    }
}

/// <summary>
/// Where the kernels keep their per-group output accumulators (forward O, backward dq, dk and dv).
/// <para>
/// CUDA and the CPU accelerator: in the dynamic shared memory the host requests. OpenCL: directly in the
/// group's own slice of the output tensor in global memory, because ILGPU 1.5.3's OpenCL backend cannot give
/// a work-group its dynamic shared memory safely. It declares one program-scope variable
/// <c>local float* shared_var_N;</c> (a single instance in global memory, shared by every work-group),
/// each work-group stores its own <c>dynamic_shared_memory</c> kernel argument into it on entry, and every
/// access reads the pointer back from it. Where work-groups run concurrently (PoCL's CPU device runs one per
/// worker thread, each with its own local buffer) a group picks up another group's pointer and accumulates
/// into that group's local memory: wrong, run-to-run different outputs as soon as two groups overlap. Static
/// shared arrays (<see cref="SharedMemory.Allocate{T}(int)"/> in the kernel itself) are declared inside the
/// kernel function and are not affected.
/// </para>
/// <para>
/// The output slices of the groups are disjoint (each group owns its rows or keys and its column slice), each
/// group zeroes its slice before accumulating, and the zeroing, every accumulation step and the final pass
/// are separated by <see cref="Group.Barrier"/>, which ILGPU emits on OpenCL as
/// <c>work_group_barrier(CLK_GLOBAL_MEM_FENCE)</c>: the fence global memory needs. On a CPU OpenCL device
/// global and local memory are the same RAM.
/// </para>
/// <para>
/// With 16-bit storage (<see cref="IElement{T}.Wide"/> false) the output cannot hold a running fp32 sum: there the
/// accumulator is the arguments' fp32 <c>AccumulatorScratch</c>, indexed as the output, rounded into the output at
/// the end (<see cref="IElement{T}.Accumulator"/> picks the view; docs/design.md).
/// </para>
/// <para>
/// ILGPU does not fold <see cref="Accelerator.CurrentType"/> in its IR (the PTX and the OpenCL C compare two
/// constants; ptxas and the OpenCL compiler fold them), so the kernels branch on <see cref="InOutput"/> around
/// each accumulator access and never select between a global and a shared view: a select would make every
/// CUDA access generic (<c>cvta</c> + <c>ld</c>) instead of <c>ld.shared</c>. The shared branch also keeps the
/// dynamic allocation in the OpenCL kernel, which ILGPU requires since the host requests dynamic shared
/// memory on every backend.
/// </para>
/// </summary>
internal static class OutputAccumulator
{
    /// <summary>True where the accumulators live in the output tensors (OpenCL); a constant per backend.</summary>
    public static bool InOutput => Accelerator.CurrentType == AcceleratorType.OpenCL;

    /// <summary>
    /// acc[r, c] += sum_j w[r, j] x[key0 + j, col0 + c] over this group's <paramref name="cols"/> columns, x staged
    /// <see cref="TileLoad.DimChunk"/> columns at a time: o += A v in the forward, dq += dz k in backward pass 1.
    /// Only the keys the row sees are summed (<see cref="StickMath.VisibleKeys"/>): a key it cannot see has w = 0,
    /// but 0 times a NaN or infinite x is NaN (masks select, never multiply). The accumulator is
    /// <paramref name="shared"/> (row stride <paramref name="columnsPerGroup"/>) or, where <see cref="InOutput"/>,
    /// <paramref name="global"/> from <paramref name="outBase"/> (row stride D).
    /// </summary>
    public static void AddWeightedKeys<TStored, TElement>(ArrayView<TStored> x, ArrayView<float> chunk, ArrayView<float> w,
        ArrayView<float> global, ArrayView<float> shared, long headBase, long outBase, int row0, int rows, int key0,
        int keyTile, int length, int headDim, int col0, int cols, int columnsPerGroup, int attendCurrent, int tid, int groupSize)
        where TStored : unmanaged
        where TElement : struct, IElement<TStored>
    {
        const int DimChunk = TileLoad.DimChunk, ChunkStride = TileLoad.ChunkStride;
        bool inOutput = InOutput;
        for (int c = 0; c < cols; c += DimChunk)
        {
            Group.Barrier();
            TileLoad.Rows<TStored, TElement>(x, chunk, headBase, key0, keyTile, length, headDim, col0 + c, tid, groupSize);
            Group.Barrier();
            for (int e = tid; e < rows * DimChunk; e += groupSize)
            {
                int r = e / DimChunk, dd = e - r * DimChunk;
                if (c + dd < cols && (!inOutput || row0 + r < length))
                {
                    int slot = r * columnsPerGroup + c + dd;
                    long outAt = outBase + (long)r * headDim + c + dd;
                    float sum = inOutput ? global[outAt] : shared[slot];
                    int visible = StickMath.VisibleKeys(row0 + r, key0, keyTile, length, attendCurrent);
                    for (int j = 0; j < visible; j++)
                        sum += w[r * keyTile + j] * chunk[j * ChunkStride + dd];
                    if (inOutput)
                        global[outAt] = sum;
                    else
                        shared[slot] = sum;
                }
            }
        }
        Group.Barrier();
    }

    /// <summary>
    /// Zeroes a group's slice of an output used as its accumulator (OpenCL): rows [<paramref name="first"/>,
    /// first + <paramref name="rows"/>) that lie below <paramref name="length"/>, columns [0, <paramref name="cols"/>)
    /// from <paramref name="outBase"/>, row stride <paramref name="headDim"/>.
    /// </summary>
    public static void ZeroOutput(ArrayView<float> output, long outBase, int first, int rows, int length, int headDim,
        int cols, int tid, int groupSize)
    {
        for (int e = tid; e < rows * cols; e += groupSize)
        {
            int r = e / cols, c = e - r * cols;
            if (first + r < length)
                output[outBase + (long)r * headDim + c] = 0f;
        }
    }

    /// <summary>Zeroes the first <paramref name="count"/> floats of a shared accumulator.</summary>
    public static void ZeroShared(ArrayView<float> accumulator, int count, int tid, int groupSize)
    {
        for (int e = tid; e < count; e += groupSize)
            accumulator[e] = 0f;
    }
}
