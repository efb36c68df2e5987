using System;
using System.Globalization;
using System.Text.RegularExpressions;
using ILGPU;
using ILGPU.Runtime;
using ILGPU.Runtime.OpenCL;

namespace StickBreaking.ILGPU.Launch;

/// <summary>
/// The checks of the decode and merge calls that <see cref="Guards"/> does not already make (those take an
/// <see cref="AttentionShape"/> for their messages): spans and views of the right length, the cache lengths, memory.
/// </summary>
internal static class DecodeGuards
{
    private static string Unit<T>() where T : unmanaged => typeof(T) == typeof(float) ? "floats" : typeof(T) == typeof(int) ? "ints" : $"{typeof(T).Name} values";

    /// <summary>A host span of exactly <paramref name="expected"/> elements.</summary>
    public static void Host<T>(ReadOnlySpan<T> data, long expected, string name, object shape)
        where T : unmanaged
    {
        if (data.Length != expected)
            throw new ArgumentException($"{name} has {data.Length} {Unit<T>()}; {Describe(shape)} needs {expected}.", name);
    }

    /// <summary>A view of <paramref name="expected"/> elements in a live buffer of <paramref name="accelerator"/>.</summary>
    public static void View<T>(Accelerator accelerator, ArrayView<T> view, long expected, string name, object shape)
        where T : unmanaged
    {
        if (!view.IsValid)
            throw new ArgumentException(
                $"{name} is an empty or default view (a disposed buffer's View is one); {Describe(shape)} needs {expected} {Unit<T>()}.", name);
        var buffer = BufferOf(view);
        if (buffer.IsDisposed)
            throw new ObjectDisposedException(name, $"{name} is a view of a MemoryBuffer (on {Guards.Describe(buffer.Accelerator)}) that has been disposed.");
        if (!ReferenceEquals(buffer.Accelerator, accelerator))
            throw new ArgumentException(
                $"{name} is a view on {Guards.Describe(buffer.Accelerator)}, not on {Guards.Describe(accelerator)} that this instance runs on.", name);
        if (view.Length != expected)
            throw new ArgumentException($"{name} has {view.Length} {Unit<T>()}; {Describe(shape)} needs {expected}.", name);
    }

    /// <summary>
    /// Why <paramref name="accelerator"/> cannot run the portable decode kernel, or null: PoCL before 6 (measured with PoCL
    /// 5.0 on an H200 host's CPU device) aborts the whole process in its kernel compiler on it (an assertion in its
    /// work-group loop formation, `region_entry_barrier != NULL`), which no caller could catch; PoCL 6 runs it (CI).
    /// </summary>
    public static string? PoclCannotCompileDecode(Accelerator accelerator)
    {
        if (accelerator is not CLAccelerator cl || !cl.PlatformName.Contains("Portable Computing Language", StringComparison.Ordinal))
            return null;
        string version = CLAPI.CurrentAPI.GetPlatformInfo(cl.PlatformId, CLPlatformInfoType.CL_PLATFORM_VERSION);
        var pocl = Regex.Match(version, @"PoCL (\d+)\.");
        if (!pocl.Success || int.Parse(pocl.Groups[1].Value, CultureInfo.InvariantCulture) >= 6)
            return null;
        return $"its platform is {version.Trim()}, whose kernel compiler aborts the process on the decode kernel (an assertion " +
            "in PoCL 5's work-group loop formation); PoCL 6 or later runs it";
    }

    /// <summary>Whether <paramref name="view"/> starts at a multiple of 16 bytes of its buffer.</summary>
    public static bool Aligned16<T>(ArrayView<T> view) where T : unmanaged => StartInBytes(view) % 16 == 0;

    private static long StartInBytes<TView>(TView view) where TView : IContiguousArrayView => view.IndexInBytes;

    private static MemoryBuffer BufferOf<TView>(TView view) where TView : IArrayView => view.Buffer;

    private static string Describe(object shape) => shape is string s ? s : $"shape {shape}";

    /// <summary>
    /// The per-sequence lengths: each cache length L in [0, Capacity], each keys-after count (when given) at least 0, and
    /// L + after (the sequence's length) at least n and at most <see cref="AttentionShape.MaxLength"/>. Without keys after,
    /// L must be at least n. Returns the longest L.
    /// </summary>
    public static int Lengths(ReadOnlySpan<int> cacheLengths, ReadOnlySpan<int> keysAfter, DecodeShape shape)
    {
        int longest = 0;
        for (int b = 0; b < cacheLengths.Length; b++)
        {
            int length = cacheLengths[b];
            int after = keysAfter.IsEmpty ? 0 : keysAfter[b];
            if (length < 0 || length > shape.Capacity)
                throw new ArgumentOutOfRangeException("cacheLengths", length,
                    $"cacheLengths[{b}] = {length}: a cache length must be between 0 and the capacity {shape.Capacity} (shape {shape}).");
            if (after < 0)
                throw new ArgumentOutOfRangeException("keysAfter", after, $"keysAfter[{b}] = {after} is negative.");
            long total = (long)length + after;
            if (total < shape.Queries)
                throw new ArgumentOutOfRangeException(keysAfter.IsEmpty ? "cacheLengths" : "keysAfter", length,
                    $"sequence {b} has {total} keys (cacheLengths[{b}] = {length}" + (keysAfter.IsEmpty ? "" : $" + keysAfter[{b}] = {after}") +
                    $") but n = {shape.Queries} queries: the queries are the sequence's last n positions, so it needs at least n keys.");
            if (total > AttentionShape.MaxLength)
                throw new ArgumentOutOfRangeException("keysAfter", after,
                    $"sequence {b} has {total} keys (cacheLengths[{b}] + keysAfter[{b}]); at most {AttentionShape.MaxLength} are supported.");
            longest = Math.Max(longest, length);
        }
        return longest;
    }

    /// <summary>A host-level call that needs more device memory than the accelerator has: refused before allocating.</summary>
    public static void Memory(Accelerator accelerator, long bytes, DecodeShape shape)
    {
        long has = Guards.MemoryBytesOverride ?? Guards.MemoryBytes(accelerator);
        if (bytes > has)
            throw new ArgumentOutOfRangeException("shape", shape,
                $"Decode for shape {shape} needs {bytes} bytes of device memory; {Guards.Describe(accelerator)} has {has} bytes in all.");
    }
}
