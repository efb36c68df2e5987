using ILGPU;
using ILGPU.Runtime;

namespace StickBreaking.ILGPU.Kernels.Common;

/// <summary>
/// The rows of one head of one tensor: row t starts at element <c>Base + t * Token</c> (D contiguous). The kernels
/// take it from <see cref="AttentionRows"/> once per head, so that every index of q, k, v, o, dO, dq, dk, dv is the
/// head's base plus <c>t * Token</c> plus d, in 64-bit arithmetic, for every layout (docs/math.md, "Layouts and grouped heads").
/// </summary>
internal readonly struct HeadRows
{
    /// <summary>Index of element 0 of row 0 of the head.</summary>
    public readonly long Base;
    /// <summary>Elements from one row (token) to the next.</summary>
    public readonly long Token;

    public HeadRows(long headBase, long token)
    {
        Base = headBase;
        Token = token;
    }

    /// <summary>Query head <paramref name="head"/> (b * Hq + h) of a query-side tensor (q, o, dO, dq).</summary>
    public static HeadRows Query(AttentionRows rows, RowStrides x, int head) => new(rows.QueryBase(x, head), x.Token);

    /// <summary>The key/value head that query head <paramref name="head"/> reads, in a key/value-side tensor (k, v).</summary>
    public static HeadRows KeyOfQuery(AttentionRows rows, RowStrides x, int head) => new(rows.KeyBaseOfQuery(x, head), x.Token);

    /// <summary>Key/value head <paramref name="keyHead"/> (b * Hkv + g) of a key/value-side tensor (k, v, dk, dv).</summary>
    public static HeadRows Key(AttentionRows rows, RowStrides x, int keyHead) => new(rows.KeyBase(x, keyHead), x.Token);

    /// <summary>A contiguous [T, D] head <paramref name="head"/> of a [heads, T, D] buffer (the 16-bit outputs' fp32 scratch).</summary>
    public static HeadRows Contiguous(int head, int length, int headDim) => new((long)head * length * headDim, headDim);

    /// <summary>Index of element 0 of row <paramref name="t"/>.</summary>
    public long Row(int t) => Base + t * Token;
}

/// <summary>Cooperative loads of a [rows, DimChunk] slice of a [T, D] head into shared memory, zero-filled at every edge.</summary>
internal static class TileLoad
{
    /// <summary>Head dimensions staged in shared memory at a time.</summary>
    public const int DimChunk = 16;
    /// <summary>Row stride of a staged chunk, padded against bank conflicts.</summary>
    public const int ChunkStride = DimChunk + 1;

    /// <summary>
    /// chunk[r, dd] = x[row first + r of <paramref name="head"/>, c0 + dd] for r &lt; <paramref name="rows"/>, dd &lt; DimChunk; 0 where the
    /// row is at or past <paramref name="length"/> or the column at or past <paramref name="headDim"/>; each element
    /// converted from its storage to fp32.
    /// </summary>
    public static void Rows<T, TElement>(ArrayView<T> x, ArrayView<float> chunk, HeadRows head, int first, int rows,
        int length, int headDim, int c0, int tid, int groupSize)
        where T : unmanaged
        where TElement : struct, IElement<T>
    {
        for (int e = tid; e < rows * DimChunk; e += groupSize)
        {
            int r = e / DimChunk, dd = e - r * DimChunk;
            int row = first + r, d = c0 + dd;
            chunk[r * ChunkStride + dd] = row < length && d < headDim ? default(TElement).Load(x[head.Row(row) + d]) : 0f;
        }
    }
}

/// <summary>
/// The two products both portable backward passes rebuild per (block of query rows, key tile): z[r, j] = q_r . k_j and
/// g[r, j] = dO_r . v_j (unscaled), over all of D, staged <see cref="TileLoad.DimChunk"/> dimensions at a time.
/// Rows and keys past T are staged as zeros. Ends with a barrier: z and g are ready for every thread. q and dO are
/// read from the rows of the query head (<c>q</c>, <c>dO</c>), k and v from those of the key/value head it reads
/// (<c>k</c>, <c>v</c>).
/// </summary>
internal static class BackwardDots
{
    public static void Run<TStored, TElement>(BackwardArgs<TStored> a, ArrayView<float> qChunk, ArrayView<float> doChunk,
        ArrayView<float> kChunk, ArrayView<float> vChunk, ArrayView<float> z, ArrayView<float> g,
        HeadRows q, HeadRows dO, HeadRows k, HeadRows v, int row0, int rows, int key0, int keyTile, int tid, int groupSize)
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
            TileLoad.Rows<TStored, TElement>(a.Q, qChunk, q, row0, rows, T, D, c0, tid, groupSize);
            TileLoad.Rows<TStored, TElement>(a.DO, doChunk, dO, row0, rows, T, D, c0, tid, groupSize);
            TileLoad.Rows<TStored, TElement>(a.K, kChunk, k, key0, keyTile, T, D, c0, tid, groupSize);
            TileLoad.Rows<TStored, TElement>(a.V, vChunk, v, key0, keyTile, T, D, c0, tid, groupSize);
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
/// accumulator is the arguments' fp32 <c>AccumulatorScratch</c>, indexed as a contiguous [heads, T, D] tensor of its own
/// (<see cref="AccumulatorRows"/>; never with the output's strides, which may leave gaps or interleave heads), rounded into the output at
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
    /// acc[r, c] += sum_j w[r, j] x[key0 + j, col0 + c] over this group's <paramref name="cols"/> columns, x (the rows
    /// <paramref name="keys"/>) staged <see cref="TileLoad.DimChunk"/> columns at a time: o += A v in the forward,
    /// dq += dz k in backward pass 1. Only the keys the row sees are summed (<see cref="StickMath.VisibleKeys"/>): a key it
    /// cannot see has w = 0, but 0 times a NaN or infinite x is NaN (masks select, never multiply). The accumulator is
    /// <paramref name="shared"/> (row stride <paramref name="columnsPerGroup"/>) or, where <see cref="InOutput"/>,
    /// <paramref name="global"/> from <paramref name="outBase"/> (the group's element [row0, col0]), row stride
    /// <paramref name="outToken"/>.
    /// </summary>
    public static void AddWeightedKeys<TStored, TElement>(ArrayView<TStored> x, ArrayView<float> chunk, ArrayView<float> w,
        ArrayView<float> global, ArrayView<float> shared, HeadRows keys, long outBase, long outToken, int row0, int rows, int key0,
        int keyTile, int length, int headDim, int col0, int cols, int columnsPerGroup, int attendCurrent, int tid, int groupSize)
        where TStored : unmanaged
        where TElement : struct, IElement<TStored>
    {
        const int DimChunk = TileLoad.DimChunk, ChunkStride = TileLoad.ChunkStride;
        bool inOutput = InOutput;
        for (int c = 0; c < cols; c += DimChunk)
        {
            Group.Barrier();
            TileLoad.Rows<TStored, TElement>(x, chunk, keys, key0, keyTile, length, headDim, col0 + c, tid, groupSize);
            Group.Barrier();
            for (int e = tid; e < rows * DimChunk; e += groupSize)
            {
                int r = e / DimChunk, dd = e - r * DimChunk;
                if (c + dd < cols && (!inOutput || row0 + r < length))
                {
                    int slot = r * columnsPerGroup + c + dd;
                    long outAt = outBase + r * outToken + c + dd;
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
    /// Where a group that accumulates in global memory (<see cref="InOutput"/>) keeps its running sums of one output:
    /// the output's own rows <paramref name="output"/> when the storage is fp32 (<paramref name="wide"/>), else a
    /// contiguous [T, D] head <paramref name="scratchHead"/> of the fp32 scratch (indexed on its own, never with the
    /// output's strides).
    /// </summary>
    public static HeadRows AccumulatorRows(bool wide, HeadRows output, int scratchHead, int length, int headDim) =>
        wide ? output : HeadRows.Contiguous(scratchHead, length, headDim);

    /// <summary>
    /// Zeroes a group's slice of an output used as its accumulator (OpenCL): rows [<paramref name="first"/>,
    /// first + <paramref name="rows"/>) that lie below <paramref name="length"/>, columns [0, <paramref name="cols"/>)
    /// from <paramref name="outBase"/> (the slice's element [first, 0]), row stride <paramref name="outToken"/>.
    /// </summary>
    public static void ZeroOutput(ArrayView<float> output, long outBase, long outToken, int first, int rows, int length,
        int cols, int tid, int groupSize)
    {
        for (int e = tid; e < rows * cols; e += groupSize)
        {
            int r = e / cols, c = e - r * cols;
            if (first + r < length)
                output[outBase + r * outToken + c] = 0f;
        }
    }

    /// <summary>Zeroes the first <paramref name="count"/> floats of a shared accumulator.</summary>
    public static void ZeroShared(ArrayView<float> accumulator, int count, int tid, int groupSize)
    {
        for (int e = tid; e < count; e += groupSize)
            accumulator[e] = 0f;
    }
}
