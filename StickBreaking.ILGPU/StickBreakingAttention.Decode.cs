using System;
using System.Runtime.InteropServices;
using Half = System.Half;
using ILGPU;
using ILGPU.Runtime;
using StickBreaking.ILGPU.Kernels.Decode;
using StickBreaking.ILGPU.Launch;

namespace StickBreaking.ILGPU;

public sealed partial class StickBreakingAttention
{
    private MemoryBuffer1D<float, Stride1D.Dense>? decodeScratch;
    private int[] decodeLengths = [], decodeKeysAfter = [];
    private string? decodeUnsupported;   // why this accelerator cannot run the decode kernels ("" when it can), asked once

    /// <summary>
    /// Tests and benchmarks only: the number of key chunks every decode call splits each sequence into, in place of the
    /// one chosen from the shape and the accelerator (null: chosen). Capped at one chunk per key present.
    /// </summary>
    internal int? DecodeChunksOverride { get; set; }

    /// <summary>Tests and benchmarks only: false runs the portable decode kernel where the warp kernel would serve.</summary>
    internal bool UseWarpDecode { get; set; } = true;

    /// <summary>
    /// Tests only: threads per group of the decode kernel in place of the launch plan's (the CPU accelerator runs 32; a GPU's
    /// 256 takes the kernel's register-prefetch path, which the tests so reach on the CPU accelerator too).
    /// </summary>
    internal int? DecodeGroupSizeOverride { get; set; }

    /// <summary>The name of the kernel the last decode call ran (tests and benchmarks).</summary>
    internal string? LastDecodeKernel { get; private set; }

    /// <summary>The number of key chunks the last decode call ran (tests and benchmarks).</summary>
    internal int LastDecodeChunks { get; private set; }

    // ------------------------------------------------------------------------------------------------
    // Host level

    /// <summary>
    /// Queries behind a key/value cache on host arrays (docs/math.md, "Queries behind a cache"): the n queries of each
    /// sequence are its last n positions, and its first L keys and values are in the cache (L = <paramref name="cacheLengths"/>[b],
    /// at most the capacity; slots past L are never read). Query i sees keys j &lt; L - n + i (j &lt;= L - n + i with
    /// AttendCurrent). n = 1 is decoding one token, n &gt; 1 chunked prefill. Query head h reads key/value head
    /// h / (Hq / Hkv). Returns o <c>[B, Hq, n, D]</c>, rem and LogRem <c>[B, Hq, n]</c>. Blocks until the result is on the host.
    /// </summary>
    /// <param name="q">Queries, <c>[B, Hq, n, D]</c>.</param>
    /// <param name="kCache">Key cache, <c>[B, Hkv, Capacity, D]</c>.</param>
    /// <param name="vCache">Value cache, <c>[B, Hkv, Capacity, D]</c>.</param>
    /// <param name="cacheLengths">Keys present per sequence, <c>[B]</c>: n to Capacity (with <paramref name="keysAfter"/>, 0 to Capacity).</param>
    /// <param name="shape">The sizes.</param>
    /// <param name="options">Scale and visibility; <c>null</c> for the defaults.</param>
    /// <param name="keysAfter">
    /// For one part of a context split across devices (see <see cref="Merge(ReadOnlySpan{float}, ReadOnlySpan{float}, ReadOnlySpan{float}, ReadOnlySpan{float}, int)"/>):
    /// per sequence, how many of its keys come after the ones in this cache and are held elsewhere, <c>[B]</c>, so that
    /// the queries sit at positions L + after - n + i. Empty: none (the cache ends the sequence).
    /// </param>
    public StickBreakingOutput Decode(ReadOnlySpan<float> q, ReadOnlySpan<float> kCache, ReadOnlySpan<float> vCache,
        ReadOnlySpan<int> cacheLengths, DecodeShape shape, StickBreakingOptions? options = null, ReadOnlySpan<int> keysAfter = default)
    {
        var (o, rem, logRem) = HostDecode(q, kCache, vCache, cacheLengths, shape, options, keysAfter, DecodeKernel.Launch, MergeKernel.ChunksFp32);
        return new StickBreakingOutput(o, rem, logRem);
    }

    /// <summary>Queries behind a cache on fp16 host arrays: as the fp32 overload, o in fp16 (every product and scan in fp32), rem and LogRem in fp32.</summary>
    /// <param name="q">Queries, <c>[B, Hq, n, D]</c>.</param>
    /// <param name="kCache">Key cache, <c>[B, Hkv, Capacity, D]</c>.</param>
    /// <param name="vCache">Value cache, <c>[B, Hkv, Capacity, D]</c>.</param>
    /// <param name="cacheLengths">Keys present per sequence, <c>[B]</c>.</param>
    /// <param name="shape">The sizes.</param>
    /// <param name="options">Scale and visibility; <c>null</c> for the defaults.</param>
    /// <param name="keysAfter">Keys of each sequence after this cache, held elsewhere; empty: none.</param>
    public StickBreakingOutput<Half> Decode(ReadOnlySpan<Half> q, ReadOnlySpan<Half> kCache, ReadOnlySpan<Half> vCache,
        ReadOnlySpan<int> cacheLengths, DecodeShape shape, StickBreakingOptions? options = null, ReadOnlySpan<int> keysAfter = default)
    {
        var (o, rem, logRem) = HostDecode(MemoryMarshal.Cast<Half, ushort>(q), MemoryMarshal.Cast<Half, ushort>(kCache),
            MemoryMarshal.Cast<Half, ushort>(vCache), cacheLengths, shape, options, keysAfter, DecodeKernel.LaunchFp16, MergeKernel.ChunksFp16);
        return new StickBreakingOutput<Half>(MemoryMarshal.Cast<ushort, Half>(o).ToArray(), rem, logRem);
    }

    /// <summary>Queries behind a cache on bf16 host arrays: as the fp32 overload, o in bf16 (every product and scan in fp32), rem and LogRem in fp32.</summary>
    /// <param name="q">Queries, <c>[B, Hq, n, D]</c>.</param>
    /// <param name="kCache">Key cache, <c>[B, Hkv, Capacity, D]</c>.</param>
    /// <param name="vCache">Value cache, <c>[B, Hkv, Capacity, D]</c>.</param>
    /// <param name="cacheLengths">Keys present per sequence, <c>[B]</c>.</param>
    /// <param name="shape">The sizes.</param>
    /// <param name="options">Scale and visibility; <c>null</c> for the defaults.</param>
    /// <param name="keysAfter">Keys of each sequence after this cache, held elsewhere; empty: none.</param>
    public StickBreakingOutput<BFloat16> Decode(ReadOnlySpan<BFloat16> q, ReadOnlySpan<BFloat16> kCache, ReadOnlySpan<BFloat16> vCache,
        ReadOnlySpan<int> cacheLengths, DecodeShape shape, StickBreakingOptions? options = null, ReadOnlySpan<int> keysAfter = default)
    {
        var (o, rem, logRem) = HostDecode(MemoryMarshal.Cast<BFloat16, ushort>(q), MemoryMarshal.Cast<BFloat16, ushort>(kCache),
            MemoryMarshal.Cast<BFloat16, ushort>(vCache), cacheLengths, shape, options, keysAfter, DecodeKernel.LaunchBf16, MergeKernel.ChunksBf16);
        return new StickBreakingOutput<BFloat16>(MemoryMarshal.Cast<ushort, BFloat16>(o).ToArray(), rem, logRem);
    }

    /// <summary>
    /// The exact merge of two parts of one result on host arrays (docs/math.md, "Split and merge"): the near part over the
    /// keys nearest the queries, the far part over keys all farther, each computed as if its stick started whole (for
    /// example by <see cref="Decode(ReadOnlySpan{float}, ReadOnlySpan{float}, ReadOnlySpan{float}, ReadOnlySpan{int}, DecodeShape, StickBreakingOptions?, ReadOnlySpan{int})"/>
    /// on two devices, the far one told the near part's length in <c>keysAfter</c>). Returns
    /// <c>o = o_near + exp(LogRem_near) o_far</c>, <c>LogRem = LogRem_near + LogRem_far</c>, <c>rem = exp(LogRem)</c>,
    /// in fp32. Merge more parts by merging the result with the next farther part.
    /// </summary>
    /// <param name="oNear">The near part's o, <c>[rows, D]</c>.</param>
    /// <param name="logRemNear">The near part's LogRem, <c>[rows]</c>.</param>
    /// <param name="oFar">The far part's o, <c>[rows, D]</c>.</param>
    /// <param name="logRemFar">The far part's LogRem, <c>[rows]</c>.</param>
    /// <param name="headDim">D.</param>
    public StickBreakingOutput Merge(ReadOnlySpan<float> oNear, ReadOnlySpan<float> logRemNear,
        ReadOnlySpan<float> oFar, ReadOnlySpan<float> logRemFar, int headDim)
    {
        var (o, rem, logRem) = HostMerge(oNear, logRemNear, oFar, logRemFar, headDim, MergeKernel.ChunksFp32);
        return new StickBreakingOutput(o, rem, logRem);
    }

    /// <summary>The merge of two parts whose o is fp16 (computed in fp32, rounded once); as the fp32 overload.</summary>
    /// <param name="oNear">The near part's o, <c>[rows, D]</c>.</param>
    /// <param name="logRemNear">The near part's LogRem, <c>[rows]</c>.</param>
    /// <param name="oFar">The far part's o, <c>[rows, D]</c>.</param>
    /// <param name="logRemFar">The far part's LogRem, <c>[rows]</c>.</param>
    /// <param name="headDim">D.</param>
    public StickBreakingOutput<Half> Merge(ReadOnlySpan<Half> oNear, ReadOnlySpan<float> logRemNear,
        ReadOnlySpan<Half> oFar, ReadOnlySpan<float> logRemFar, int headDim)
    {
        var (o, rem, logRem) = HostMerge(MemoryMarshal.Cast<Half, ushort>(oNear), logRemNear, MemoryMarshal.Cast<Half, ushort>(oFar),
            logRemFar, headDim, MergeKernel.PartsFp16);
        return new StickBreakingOutput<Half>(MemoryMarshal.Cast<ushort, Half>(o).ToArray(), rem, logRem);
    }

    /// <summary>The merge of two parts whose o is bf16 (computed in fp32, rounded once); as the fp32 overload.</summary>
    /// <param name="oNear">The near part's o, <c>[rows, D]</c>.</param>
    /// <param name="logRemNear">The near part's LogRem, <c>[rows]</c>.</param>
    /// <param name="oFar">The far part's o, <c>[rows, D]</c>.</param>
    /// <param name="logRemFar">The far part's LogRem, <c>[rows]</c>.</param>
    /// <param name="headDim">D.</param>
    public StickBreakingOutput<BFloat16> Merge(ReadOnlySpan<BFloat16> oNear, ReadOnlySpan<float> logRemNear,
        ReadOnlySpan<BFloat16> oFar, ReadOnlySpan<float> logRemFar, int headDim)
    {
        var (o, rem, logRem) = HostMerge(MemoryMarshal.Cast<BFloat16, ushort>(oNear), logRemNear, MemoryMarshal.Cast<BFloat16, ushort>(oFar),
            logRemFar, headDim, MergeKernel.PartsBf16);
        return new StickBreakingOutput<BFloat16>(MemoryMarshal.Cast<ushort, BFloat16>(o).ToArray(), rem, logRem);
    }

    // ------------------------------------------------------------------------------------------------
    // Device level

    /// <summary>
    /// Enqueues queries behind a key/value cache (see the host-level overload) for views on this accelerator. The cache
    /// lengths (and <paramref name="keysAfter"/>) are read back to the host and checked before anything is enqueued,
    /// which waits for the work already on <paramref name="stream"/>; nothing else is copied. Long caches with few rows
    /// are split into key chunks run by different groups and merged exactly, nearest first (docs/math.md, "Split and
    /// merge"): deterministic. Allocates nothing once compiled, except an fp32 scratch for the chunks' partial results
    /// that the instance keeps and grows only for larger shapes.
    /// </summary>
    /// <param name="stream">A stream of this accelerator.</param>
    /// <param name="shape">The sizes.</param>
    /// <param name="q">Queries, <c>[B, Hq, n, D]</c> contiguous.</param>
    /// <param name="kCache">Key cache, <c>[B, Hkv, Capacity, D]</c> contiguous.</param>
    /// <param name="vCache">Value cache, <c>[B, Hkv, Capacity, D]</c> contiguous.</param>
    /// <param name="cacheLengths">Keys present per sequence, <c>[B]</c>.</param>
    /// <param name="o">Output o, <c>[B, Hq, n, D]</c>.</param>
    /// <param name="rem">Output rem, <c>[B, Hq, n]</c>.</param>
    /// <param name="logRem">Output ln(rem), <c>[B, Hq, n]</c>.</param>
    /// <param name="options">Scale and visibility; <c>null</c> for the defaults.</param>
    /// <param name="keysAfter">Keys of each sequence after this cache, held elsewhere, <c>[B]</c>; a default view: none.</param>
    public void Decode(AcceleratorStream stream, DecodeShape shape, ArrayView<float> q, ArrayView<float> kCache, ArrayView<float> vCache,
        ArrayView<int> cacheLengths, ArrayView<float> o, ArrayView<float> rem, ArrayView<float> logRem,
        StickBreakingOptions? options = null, ArrayView<int> keysAfter = default) =>
        DeviceDecode(stream, shape, q, kCache, vCache, cacheLengths, o, rem, logRem, options, keysAfter, DecodeKernel.Launch, MergeKernel.ChunksFp32);

    /// <summary>Enqueues queries behind a cache for fp16 views: as the fp32 overload, o in fp16, rem and LogRem fp32.</summary>
    /// <param name="stream">A stream of this accelerator.</param>
    /// <param name="shape">The sizes.</param>
    /// <param name="q">Queries, <c>[B, Hq, n, D]</c> contiguous.</param>
    /// <param name="kCache">Key cache, <c>[B, Hkv, Capacity, D]</c> contiguous.</param>
    /// <param name="vCache">Value cache, <c>[B, Hkv, Capacity, D]</c> contiguous.</param>
    /// <param name="cacheLengths">Keys present per sequence, <c>[B]</c>.</param>
    /// <param name="o">Output o, <c>[B, Hq, n, D]</c>.</param>
    /// <param name="rem">Output rem, <c>[B, Hq, n]</c>.</param>
    /// <param name="logRem">Output ln(rem), <c>[B, Hq, n]</c>.</param>
    /// <param name="options">Scale and visibility; <c>null</c> for the defaults.</param>
    /// <param name="keysAfter">Keys of each sequence after this cache, held elsewhere, <c>[B]</c>; a default view: none.</param>
    public void Decode(AcceleratorStream stream, DecodeShape shape, ArrayView<Half> q, ArrayView<Half> kCache, ArrayView<Half> vCache,
        ArrayView<int> cacheLengths, ArrayView<Half> o, ArrayView<float> rem, ArrayView<float> logRem,
        StickBreakingOptions? options = null, ArrayView<int> keysAfter = default) =>
        DeviceDecode(stream, shape, q.Cast<ushort>(), kCache.Cast<ushort>(), vCache.Cast<ushort>(), cacheLengths, o.Cast<ushort>(), rem, logRem,
            options, keysAfter, DecodeKernel.LaunchFp16, MergeKernel.ChunksFp16);

    /// <summary>Enqueues queries behind a cache for bf16 views: as the fp32 overload, o in bf16, rem and LogRem fp32.</summary>
    /// <param name="stream">A stream of this accelerator.</param>
    /// <param name="shape">The sizes.</param>
    /// <param name="q">Queries, <c>[B, Hq, n, D]</c> contiguous.</param>
    /// <param name="kCache">Key cache, <c>[B, Hkv, Capacity, D]</c> contiguous.</param>
    /// <param name="vCache">Value cache, <c>[B, Hkv, Capacity, D]</c> contiguous.</param>
    /// <param name="cacheLengths">Keys present per sequence, <c>[B]</c>.</param>
    /// <param name="o">Output o, <c>[B, Hq, n, D]</c>.</param>
    /// <param name="rem">Output rem, <c>[B, Hq, n]</c>.</param>
    /// <param name="logRem">Output ln(rem), <c>[B, Hq, n]</c>.</param>
    /// <param name="options">Scale and visibility; <c>null</c> for the defaults.</param>
    /// <param name="keysAfter">Keys of each sequence after this cache, held elsewhere, <c>[B]</c>; a default view: none.</param>
    public void Decode(AcceleratorStream stream, DecodeShape shape, ArrayView<BFloat16> q, ArrayView<BFloat16> kCache, ArrayView<BFloat16> vCache,
        ArrayView<int> cacheLengths, ArrayView<BFloat16> o, ArrayView<float> rem, ArrayView<float> logRem,
        StickBreakingOptions? options = null, ArrayView<int> keysAfter = default) =>
        DeviceDecode(stream, shape, q.Cast<ushort>(), kCache.Cast<ushort>(), vCache.Cast<ushort>(), cacheLengths, o.Cast<ushort>(), rem, logRem,
            options, keysAfter, DecodeKernel.LaunchBf16, MergeKernel.ChunksBf16);

    /// <summary>
    /// Enqueues the exact merge of two parts of one result (see the host-level overload): rows = <paramref name="logRemNear"/>'s
    /// length, o views of rows * <paramref name="headDim"/> elements. Outputs must not overlap the inputs. Allocates nothing
    /// once compiled.
    /// </summary>
    /// <param name="stream">A stream of this accelerator.</param>
    /// <param name="headDim">D.</param>
    /// <param name="oNear">The near part's o, <c>[rows, D]</c>.</param>
    /// <param name="logRemNear">The near part's LogRem, <c>[rows]</c>.</param>
    /// <param name="oFar">The far part's o, <c>[rows, D]</c>.</param>
    /// <param name="logRemFar">The far part's LogRem, <c>[rows]</c>.</param>
    /// <param name="o">Output o, <c>[rows, D]</c>.</param>
    /// <param name="rem">Output rem, <c>[rows]</c>.</param>
    /// <param name="logRem">Output LogRem, <c>[rows]</c>.</param>
    public void Merge(AcceleratorStream stream, int headDim, ArrayView<float> oNear, ArrayView<float> logRemNear,
        ArrayView<float> oFar, ArrayView<float> logRemFar, ArrayView<float> o, ArrayView<float> rem, ArrayView<float> logRem) =>
        DeviceMerge(stream, headDim, oNear, logRemNear, oFar, logRemFar, o, rem, logRem, MergeKernel.ChunksFp32);

    /// <summary>The merge for fp16 o views (computed in fp32, rounded once); as the fp32 overload.</summary>
    /// <param name="stream">A stream of this accelerator.</param>
    /// <param name="headDim">D.</param>
    /// <param name="oNear">The near part's o, <c>[rows, D]</c>.</param>
    /// <param name="logRemNear">The near part's LogRem, <c>[rows]</c>.</param>
    /// <param name="oFar">The far part's o, <c>[rows, D]</c>.</param>
    /// <param name="logRemFar">The far part's LogRem, <c>[rows]</c>.</param>
    /// <param name="o">Output o, <c>[rows, D]</c>.</param>
    /// <param name="rem">Output rem, <c>[rows]</c>.</param>
    /// <param name="logRem">Output LogRem, <c>[rows]</c>.</param>
    public void Merge(AcceleratorStream stream, int headDim, ArrayView<Half> oNear, ArrayView<float> logRemNear,
        ArrayView<Half> oFar, ArrayView<float> logRemFar, ArrayView<Half> o, ArrayView<float> rem, ArrayView<float> logRem) =>
        DeviceMerge(stream, headDim, oNear.Cast<ushort>(), logRemNear, oFar.Cast<ushort>(), logRemFar, o.Cast<ushort>(), rem, logRem, MergeKernel.PartsFp16);

    /// <summary>The merge for bf16 o views (computed in fp32, rounded once); as the fp32 overload.</summary>
    /// <param name="stream">A stream of this accelerator.</param>
    /// <param name="headDim">D.</param>
    /// <param name="oNear">The near part's o, <c>[rows, D]</c>.</param>
    /// <param name="logRemNear">The near part's LogRem, <c>[rows]</c>.</param>
    /// <param name="oFar">The far part's o, <c>[rows, D]</c>.</param>
    /// <param name="logRemFar">The far part's LogRem, <c>[rows]</c>.</param>
    /// <param name="o">Output o, <c>[rows, D]</c>.</param>
    /// <param name="rem">Output rem, <c>[rows]</c>.</param>
    /// <param name="logRem">Output LogRem, <c>[rows]</c>.</param>
    public void Merge(AcceleratorStream stream, int headDim, ArrayView<BFloat16> oNear, ArrayView<float> logRemNear,
        ArrayView<BFloat16> oFar, ArrayView<float> logRemFar, ArrayView<BFloat16> o, ArrayView<float> rem, ArrayView<float> logRem) =>
        DeviceMerge(stream, headDim, oNear.Cast<ushort>(), logRemNear, oFar.Cast<ushort>(), logRemFar, o.Cast<ushort>(), rem, logRem, MergeKernel.PartsBf16);

    // ------------------------------------------------------------------------------------------------
    // Validation, then arguments and launch

    private (T[] O, float[] Rem, float[] LogRem) HostDecode<T>(ReadOnlySpan<T> q, ReadOnlySpan<T> kCache, ReadOnlySpan<T> vCache,
        ReadOnlySpan<int> cacheLengths, DecodeShape shape, StickBreakingOptions? options, ReadOnlySpan<int> keysAfter,
        KernelLaunch<DecodeArgs<T>> kernel, KernelLaunch<MergeArgs<float, T>> merge)
        where T : unmanaged
    {
        ThrowIfDisposed();
        using var call = calls.Enter(accelerator);
        Guards.Accelerator(accelerator);
        shape.Validate(nameof(shape));
        CheckDecodeLaunch(shape);
        int elementBytes = Marshal.SizeOf<T>();
        DecodeGuards.Memory(accelerator, checked(elementBytes * (2 * shape.QueryLength + 2 * shape.CacheLength) + 8 * shape.RowCount + 8L * shape.Batch), shape);
        DecodeGuards.Host(q, shape.QueryLength, nameof(q), shape);
        DecodeGuards.Host(kCache, shape.CacheLength, nameof(kCache), shape);
        DecodeGuards.Host(vCache, shape.CacheLength, nameof(vCache), shape);
        DecodeGuards.Host(cacheLengths, shape.Batch, nameof(cacheLengths), shape);
        if (!keysAfter.IsEmpty)
            DecodeGuards.Host(keysAfter, shape.Batch, nameof(keysAfter), shape);
        int longest = DecodeGuards.Lengths(cacheLengths, keysAfter, shape);
        options ??= StickBreakingOptions.Default;
        options.Validate(nameof(options));

        using var bq = Upload(q);
        using var bk = Upload(kCache);
        using var bv = Upload(vCache);
        using var lengths = Upload(cacheLengths);
        using var after = keysAfter.IsEmpty ? null : Upload(keysAfter);
        using var o = accelerator.Allocate1D<T>(shape.QueryLength);
        using var rem = accelerator.Allocate1D<float>(shape.RowCount);
        using var logRem = accelerator.Allocate1D<float>(shape.RowCount);
        var stream = accelerator.DefaultStream;
        EnqueueDecode(stream, shape, bq.View, bk.View, bv.View, lengths.View, after?.View ?? default, longest, o.View, rem.View, logRem.View,
            options, kernel, merge);
        stream.Synchronize();
        var result = new T[shape.QueryLength];
        o.View.CopyToCPU(stream, result.AsSpan());
        return (result, rem.GetAsArray1D(), logRem.GetAsArray1D());
    }

    private void DeviceDecode<T>(AcceleratorStream stream, DecodeShape shape, ArrayView<T> q, ArrayView<T> kCache, ArrayView<T> vCache,
        ArrayView<int> cacheLengths, ArrayView<T> o, ArrayView<float> rem, ArrayView<float> logRem,
        StickBreakingOptions? options, ArrayView<int> keysAfter, KernelLaunch<DecodeArgs<T>> kernel, KernelLaunch<MergeArgs<float, T>> merge)
        where T : unmanaged
    {
        ThrowIfDisposed();
        using var call = calls.Enter(accelerator);
        Guards.Accelerator(accelerator);
        Guards.Stream(accelerator, stream);
        shape.Validate(nameof(shape));
        CheckDecodeLaunch(shape);
        DecodeGuards.View(accelerator, q, shape.QueryLength, nameof(q), shape);
        DecodeGuards.View(accelerator, kCache, shape.CacheLength, nameof(kCache), shape);
        DecodeGuards.View(accelerator, vCache, shape.CacheLength, nameof(vCache), shape);
        DecodeGuards.View(accelerator, cacheLengths, shape.Batch, nameof(cacheLengths), shape);
        bool hasAfter = keysAfter.IsValid;
        if (hasAfter)
            DecodeGuards.View(accelerator, keysAfter, shape.Batch, nameof(keysAfter), shape);
        DecodeGuards.View(accelerator, o, shape.QueryLength, nameof(o), shape);
        DecodeGuards.View(accelerator, rem, shape.RowCount, nameof(rem), shape);
        DecodeGuards.View(accelerator, logRem, shape.RowCount, nameof(logRem), shape);
        Guards.Disjoint([Guards.Arg.Of(o, nameof(o)), Guards.Arg.Of(rem, nameof(rem)), Guards.Arg.Of(logRem, nameof(logRem))],
            hasAfter
                ? [Guards.Arg.Of(q, nameof(q)), Guards.Arg.Of(kCache, nameof(kCache)), Guards.Arg.Of(vCache, nameof(vCache)),
                    Guards.Arg.Of(cacheLengths, nameof(cacheLengths)), Guards.Arg.Of(keysAfter, nameof(keysAfter))]
                : [Guards.Arg.Of(q, nameof(q)), Guards.Arg.Of(kCache, nameof(kCache)), Guards.Arg.Of(vCache, nameof(vCache)),
                    Guards.Arg.Of(cacheLengths, nameof(cacheLengths))]);
        options ??= StickBreakingOptions.Default;
        options.Validate(nameof(options));

        // The lengths decide which slots are read: check them on the host before anything is enqueued.
        if (decodeLengths.Length < shape.Batch)
        {
            decodeLengths = new int[shape.Batch];
            decodeKeysAfter = new int[shape.Batch];
        }
        var lengths = decodeLengths.AsSpan(0, shape.Batch);
        var after = hasAfter ? decodeKeysAfter.AsSpan(0, shape.Batch) : Span<int>.Empty;
        cacheLengths.CopyToCPU(stream, lengths);
        if (hasAfter)
            keysAfter.CopyToCPU(stream, after);
        stream.Synchronize();
        int longest = DecodeGuards.Lengths(lengths, after, shape);
        EnqueueDecode(stream, shape, q, kCache, vCache, cacheLengths, keysAfter, longest, o, rem, logRem, options, kernel, merge);
    }

    private (T[] O, float[] Rem, float[] LogRem) HostMerge<T>(ReadOnlySpan<T> oNear, ReadOnlySpan<float> logRemNear,
        ReadOnlySpan<T> oFar, ReadOnlySpan<float> logRemFar, int headDim, KernelLaunch<MergeArgs<T, T>> merge)
        where T : unmanaged
    {
        ThrowIfDisposed();
        using var call = calls.Enter(accelerator);
        Guards.Accelerator(accelerator);
        int rows = logRemNear.Length;
        long elements = CheckMergeShape(rows, headDim);
        string what = $"{rows} rows of D = {headDim}";
        DecodeGuards.Host(oNear, elements, nameof(oNear), what);
        DecodeGuards.Host(oFar, elements, nameof(oFar), what);
        DecodeGuards.Host(logRemFar, rows, nameof(logRemFar), what);
        using var bNear = Upload(oNear);
        using var bNearLog = Upload(logRemNear);
        using var bFar = Upload(oFar);
        using var bFarLog = Upload(logRemFar);
        using var o = accelerator.Allocate1D<T>(elements);
        using var rem = accelerator.Allocate1D<float>(rows);
        using var logRem = accelerator.Allocate1D<float>(rows);
        var stream = accelerator.DefaultStream;
        EnqueueMerge(stream, merge, bNear.View, bNearLog.View, bFar.View, bFarLog.View, 2, rows, headDim, o.View, rem.View, logRem.View);
        stream.Synchronize();
        var result = new T[elements];
        o.View.CopyToCPU(stream, result.AsSpan());
        return (result, rem.GetAsArray1D(), logRem.GetAsArray1D());
    }

    private void DeviceMerge<T>(AcceleratorStream stream, int headDim, ArrayView<T> oNear, ArrayView<float> logRemNear,
        ArrayView<T> oFar, ArrayView<float> logRemFar, ArrayView<T> o, ArrayView<float> rem, ArrayView<float> logRem,
        KernelLaunch<MergeArgs<T, T>> merge)
        where T : unmanaged
    {
        ThrowIfDisposed();
        using var call = calls.Enter(accelerator);
        Guards.Accelerator(accelerator);
        Guards.Stream(accelerator, stream);
        if (!logRemNear.IsValid)
            throw new ArgumentException("logRemNear is an empty or default view; it gives the number of rows.", nameof(logRemNear));
        if (logRemNear.Length > int.MaxValue)
            throw new ArgumentOutOfRangeException(nameof(logRemNear), logRemNear.Length, $"logRemNear has {logRemNear.Length} rows; at most {int.MaxValue}.");
        int rows = (int)logRemNear.Length;
        long elements = CheckMergeShape(rows, headDim);
        string what = $"{rows} rows of D = {headDim}";
        DecodeGuards.View(accelerator, oNear, elements, nameof(oNear), what);
        DecodeGuards.View(accelerator, logRemNear, rows, nameof(logRemNear), what);
        DecodeGuards.View(accelerator, oFar, elements, nameof(oFar), what);
        DecodeGuards.View(accelerator, logRemFar, rows, nameof(logRemFar), what);
        DecodeGuards.View(accelerator, o, elements, nameof(o), what);
        DecodeGuards.View(accelerator, rem, rows, nameof(rem), what);
        DecodeGuards.View(accelerator, logRem, rows, nameof(logRem), what);
        Guards.Disjoint([Guards.Arg.Of(o, nameof(o)), Guards.Arg.Of(rem, nameof(rem)), Guards.Arg.Of(logRem, nameof(logRem))],
            [Guards.Arg.Of(oNear, nameof(oNear)), Guards.Arg.Of(logRemNear, nameof(logRemNear)),
                Guards.Arg.Of(oFar, nameof(oFar)), Guards.Arg.Of(logRemFar, nameof(logRemFar))]);
        EnqueueMerge(stream, merge, oNear, logRemNear, oFar, logRemFar, 2, rows, headDim, o, rem, logRem);
    }

    /// <summary>Checks a merge's sizes and its one-dimensional grid here; returns the elements of its o.</summary>
    private long CheckMergeShape(int rows, int headDim)
    {
        if (headDim < 1 || headDim > AttentionShape.MaxHeadDim)
            throw new ArgumentOutOfRangeException(nameof(headDim), headDim, $"headDim must be between 1 and {AttentionShape.MaxHeadDim} (got {headDim}).");
        if (rows < 1)
            throw new ArgumentException("logRemNear is empty: a merge needs at least one row.", "logRemNear");
        long elements = (long)rows * headDim;
        if (elements > AttentionShape.MaxTensorLength)
            throw new ArgumentOutOfRangeException(nameof(headDim), elements, $"{rows} rows of D = {headDim} are {elements} elements; at most {AttentionShape.MaxTensorLength}.");
        MergeGroups(rows, headDim);
        return elements;
    }

    /// <summary>Groups of the merge grid, checked against the accelerator's grid.</summary>
    private int MergeGroups(long rows, int headDim)
    {
        long groups = (rows * headDim + GroupSize - 1) / GroupSize;
        if (groups > accelerator.MaxGridSize.X)
            throw new ArgumentOutOfRangeException("shape", groups,
                $"The merge of {rows} rows of D = {headDim} needs {groups} groups; {Guards.Describe(accelerator)} allows {accelerator.MaxGridSize.X}.");
        return (int)groups;
    }

    /// <summary>The decode grid without a split (B Hkv, row blocks), and the merge grid, against the accelerator's limits; and its shared memory.</summary>
    private void CheckDecodeLaunch(DecodeShape shape)
    {
        var max = accelerator.MaxGridSize;
        long heads = (long)shape.Batch * shape.KeyValueHeads;
        long rowBlocks = DecodeRowBlocks(shape);
        if (heads > max.X || rowBlocks > max.Y)
            throw new ArgumentOutOfRangeException(nameof(shape), shape,
                $"shape {shape}: the decode grid needs {heads} groups along X (B * Hkv) and {rowBlocks} along Y ((Hq / Hkv) * n / " +
                $"{DecodeKernel.BlockRows}); {Guards.Describe(accelerator)} allows ({max.X}, {max.Y}): use fewer sequences or queries per call.");
        MergeGroups(shape.RowCount, shape.HeadDim);
        decodeUnsupported ??= DecodeGuards.PoclCannotCompileDecode(accelerator) ?? "";
        if (decodeUnsupported.Length > 0)
            throw new NotSupportedException($"Decode on {Guards.Describe(accelerator)}: {decodeUnsupported}");
        if (accelerator.MaxSharedMemoryPerGroup < DecodeKernel.StaticSharedBytes(sizeof(float)))
            throw new InvalidOperationException(
                $"The decode kernel needs {DecodeKernel.StaticSharedBytes(sizeof(float))} bytes of shared memory per group; {Guards.Describe(accelerator)} offers {accelerator.MaxSharedMemoryPerGroup}.");
    }

    private static long DecodeRowBlocks(DecodeShape shape) =>
        ((long)shape.QueryHeadsPerKeyValueHead * shape.Queries + DecodeKernel.BlockRows - 1) / DecodeKernel.BlockRows;

    /// <summary>
    /// Key chunks per sequence, within the grid's Y limit.
    /// The portable kernel: one when B Hkv (row blocks) already fill the device many times over, else enough groups for
    /// about 32 per multiprocessor, each chunk at least 512 keys of the longest sequence.
    /// The warp kernel (<paramref name="warpsPerMultiprocessor"/> resident per multiprocessor): whole waves of warps, the
    /// fewest waves whose chunks are at most 1024 keys, and chunks of at least 128 keys. A partial last wave costs a whole
    /// one (each warp's time is its chunk's), and a warp waits on its own loads round after round, so chunks should be
    /// short, but not so short that the merge and each warp's start dominate. Measured on an H200, bf16, Hq = 32, Hkv = 8,
    /// D = 128, L = 32768 (bench --decode --chunks): B = 32 ran best at 33 chunks (4 waves; 9 chunks, one wave and a
    /// sliver, took 1.5x), B = 8 at 32, B = 4 at 64 to 128, B = 1 at 256; this rule picks 33, 33, 66 and 256.
    /// </summary>
    private int DecodeChunks(DecodeShape shape, int longest, int warpsPerMultiprocessor)
    {
        long rowBlocks = DecodeRowBlocks(shape);
        long groups = (long)shape.Batch * shape.KeyValueHeads * rowBlocks;
        int sms = Math.Max(1, accelerator.NumMultiprocessors);
        int chunks;
        if (DecodeChunksOverride is { } forced)
            chunks = forced;
        else if (warpsPerMultiprocessor == 0)
        {
            long target = 32L * sms;
            chunks = groups >= target ? 1 : (int)Math.Min((target + groups - 1) / groups, (longest + 511) / 512);
        }
        else
        {
            long slots = (long)warpsPerMultiprocessor * sms;
            int most = (longest + 127) / 128;
            chunks = 1;
            for (long waves = 1; groups < waves * slots; waves++)
            {
                chunks = (int)Math.Min(most, waves * slots / groups);
                if (chunks == most || (longest + chunks - 1) / chunks <= 1024)
                    break;
            }
        }
        chunks = (int)Math.Min(chunks, accelerator.MaxGridSize.Y / rowBlocks);
        return Math.Max(1, Math.Min(chunks, longest));
    }

    private void EnqueueDecode<T>(AcceleratorStream stream, DecodeShape shape, ArrayView<T> q, ArrayView<T> kCache, ArrayView<T> vCache,
        ArrayView<int> cacheLengths, ArrayView<int> keysAfter, int longest, ArrayView<T> o, ArrayView<float> rem, ArrayView<float> logRem,
        StickBreakingOptions options, KernelLaunch<DecodeArgs<T>> kernel, KernelLaunch<MergeArgs<float, T>> merge)
        where T : unmanaged
    {
        int D = shape.HeadDim;
        int rowBlocks = (int)DecodeRowBlocks(shape);
        bool packedRows = DecodeKernel.PackedRows(D, Marshal.SizeOf<T>()) && DecodeGuards.Aligned16(kCache) && DecodeGuards.Aligned16(vCache);
        // The warp kernel where it serves D and reads whole 8- or 16-byte pieces (rows and views aligned); else the portable one.
        if (kernels.WarpDecode(kernel, D) is { } warp && packedRows && DecodeGuards.Aligned16(q) && UseWarpDecode)
            kernel = warp;
        int chunks = DecodeChunks(shape, longest, kernel.Family == KernelFamily.Portable ? 0 : kernel.MinGroupsPerMultiprocessor * kernel.GroupSize / 32);
        int chunkKeys = Math.Max(1, (longest + chunks - 1) / chunks);
        chunks = Math.Max(1, (longest + chunkKeys - 1) / chunkKeys);
        LastDecodeChunks = chunks;
        LastDecodeKernel = kernel.Name;
        var partialO = ArrayView<float>.Empty;
        var partialLogRem = ArrayView<float>.Empty;
        if (chunks > 1)
        {
            long partRows = chunks * shape.RowCount;
            var scratch = DecodeScratch(partRows * (D + 1));
            partialO = scratch.SubView(0, partRows * D);
            partialLogRem = scratch.SubView(partRows * D, partRows);
        }
        var args = new DecodeArgs<T>
        {
            Q = q, K = kCache, V = vCache, O = o, Rem = rem, LogRem = logRem,
            CacheLengths = cacheLengths, KeysAfter = keysAfter.IsValid ? keysAfter : cacheLengths, HasKeysAfter = keysAfter.IsValid ? 1 : 0,
            PartialO = partialO, PartialLogRem = partialLogRem,
            Layout = DecodeLayout.Of(shape), AttendCurrent = options.AttendCurrent ? 1 : 0,
            PackedRows = packedRows ? 1 : 0,
            Chunks = chunks, ChunkKeys = chunkKeys, KeyTile = DecodeKernel.KeyTileFor(D), Scale = options.ScaleFor(D), RowBlocks = rowBlocks,
        };
        // The staging ring's cp.async takes the caches' device addresses, which a kernel cannot read from a view in ILGPU
        // 1.5.3 (the host can: the buffer's device pointer plus the view's offset).
        if (kernel.Family == KernelFamily.TensorCore && accelerator.AcceleratorType == AcceleratorType.Cuda)
        {
            args.KeyAddress = kCache.LoadEffectiveAddressAsPtr().ToInt64();
            args.ValueAddress = vCache.LoadEffectiveAddressAsPtr().ToInt64();
        }
        launcher.LaunchGroups(kernel, stream, shape.Batch * shape.KeyValueHeads, rowBlocks * chunks, args,
            kernel.Family == KernelFamily.Portable ? DecodeGroupSizeOverride ?? 0 : kernel.GroupSize);
        if (chunks > 1)
            EnqueueMerge(stream, merge, partialO, partialLogRem, ArrayView<float>.Empty, ArrayView<float>.Empty, chunks,
                (int)shape.RowCount, D, o, rem, logRem);
    }

    private void EnqueueMerge<TPart, T>(AcceleratorStream stream, KernelLaunch<MergeArgs<TPart, T>> merge,
        ArrayView<TPart> parts, ArrayView<float> partLogRem, ArrayView<TPart> far, ArrayView<float> farLogRem, int partCount,
        int rows, int headDim, ArrayView<T> o, ArrayView<float> rem, ArrayView<float> logRem)
        where TPart : unmanaged
        where T : unmanaged
    {
        var args = new MergeArgs<TPart, T>
        {
            PartO = parts, PartLogRem = partLogRem, FarO = far.IsValid ? far : parts, FarLogRem = farLogRem.IsValid ? farLogRem : partLogRem,
            SeparateFar = far.IsValid ? 1 : 0, O = o, Rem = rem, LogRem = logRem, Parts = partCount, Rows = rows, HeadDim = headDim,
        };
        launcher.LaunchGroups(merge, stream, MergeGroups(rows, headDim), 1, args);
    }

    /// <summary>
    /// Benchmarks only: the device-level decode without its checks and without reading the lengths back, so that back-to-back
    /// calls time the kernels alone. <paramref name="longest"/> must be the longest of the lengths on the device.
    /// </summary>
    internal void DecodeUnchecked<T>(AcceleratorStream stream, DecodeShape shape, ArrayView<T> q, ArrayView<T> kCache, ArrayView<T> vCache,
        ArrayView<int> cacheLengths, int longest, ArrayView<T> o, ArrayView<float> rem, ArrayView<float> logRem, StickBreakingOptions? options = null)
        where T : unmanaged
    {
        options ??= StickBreakingOptions.Default;
        if (typeof(T) == typeof(float))
            EnqueueDecode(stream, shape, q.Cast<float>(), kCache.Cast<float>(), vCache.Cast<float>(), cacheLengths, default, longest,
                o.Cast<float>(), rem, logRem, options, DecodeKernel.Launch, MergeKernel.ChunksFp32);
        else
            EnqueueDecode(stream, shape, q.Cast<ushort>(), kCache.Cast<ushort>(), vCache.Cast<ushort>(), cacheLengths, default, longest,
                o.Cast<ushort>(), rem, logRem, options, typeof(T) == typeof(Half) ? DecodeKernel.LaunchFp16 : DecodeKernel.LaunchBf16,
                typeof(T) == typeof(Half) ? MergeKernel.ChunksFp16 : MergeKernel.ChunksBf16);
    }

    /// <summary>The fp32 scratch of the chunk partials: kept by the instance, grown (after the device drains) only for a larger shape.</summary>
    private ArrayView<float> DecodeScratch(long floats)
    {
        if (decodeScratch is null || decodeScratch.Length < floats)
        {
            accelerator.Synchronize();
            decodeScratch?.Dispose();
            decodeScratch = null;
            decodeScratch = accelerator.Allocate1D<float>(floats);
        }
        return decodeScratch.View.SubView(0, floats);
    }

    /// <summary>Frees the decode scratch (called from <see cref="Dispose"/>).</summary>
    private void DisposeDecode()
    {
        decodeScratch?.Dispose();
        decodeScratch = null;
    }
}
