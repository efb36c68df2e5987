using System;
using ILGPU;
using StickBreaking.ILGPU.Kernels.Common;
using StickBreaking.ILGPU.Launch;

namespace StickBreaking.ILGPU.Kernels.Decode;

/// <summary>
/// The exact merge of docs/math.md, "Split and merge": parts of one result over disjoint key ranges, each computed as if
/// its stick started whole, combined from the nearest part to the farthest,
/// <c>o = o_near + exp(LogRem_near) o_far</c>, <c>LogRem = LogRem_near + LogRem_far</c>, <c>rem = exp(LogRem)</c>.
/// One thread per output element, parts summed in their fixed order: deterministic, no atomics. Plain loads and stores,
/// so it builds for every backend; its grid is one-dimensional (<see cref="KernelLauncher.LaunchGroups{TArgs}"/>).
/// </summary>
internal static class MergeKernel
{
    /// <summary>The split decode's merge: fp32 chunk partials into o in the storage type.</summary>
    public static readonly KernelLaunch<MergeArgs<float, float>> ChunksFp32 = Describe<float, Fp32Element, float, Fp32Element>("decode merge");
    /// <inheritdoc cref="ChunksFp32"/>
    public static readonly KernelLaunch<MergeArgs<float, ushort>> ChunksFp16 = Describe<float, Fp32Element, ushort, Fp16Storage>("decode merge fp16");
    /// <inheritdoc cref="ChunksFp32"/>
    public static readonly KernelLaunch<MergeArgs<float, ushort>> ChunksBf16 = Describe<float, Fp32Element, ushort, Bf16Storage>("decode merge bf16");
    /// <summary>The public merge of two parts whose o is in the storage type.</summary>
    public static readonly KernelLaunch<MergeArgs<ushort, ushort>> PartsFp16 = Describe<ushort, Fp16Storage, ushort, Fp16Storage>("merge fp16");
    /// <inheritdoc cref="PartsFp16"/>
    public static readonly KernelLaunch<MergeArgs<ushort, ushort>> PartsBf16 = Describe<ushort, Bf16Storage, ushort, Bf16Storage>("merge bf16");

    private static KernelLaunch<MergeArgs<TPart, T>> Describe<TPart, TPartElement, T, TElement>(string name)
        where TPart : unmanaged
        where TPartElement : struct, IElement<TPart>
        where T : unmanaged
        where TElement : struct, IElement<T> => new()
    {
        Name = name, Body = Kernel<TPart, TPartElement, T, TElement>, Family = KernelFamily.Portable, RowsPerGroup = 1,
    };

    public static void Kernel<TPart, TPartElement, T, TElement>(MergeArgs<TPart, T> a)
        where TPart : unmanaged
        where TPartElement : struct, IElement<TPart>
        where T : unmanaged
        where TElement : struct, IElement<T>
    {
        long e = (long)Grid.IdxX * Group.DimX + Group.IdxX;
        int D = a.HeadDim;
        if (e >= (long)a.Rows * D)
            return;
        long row = e / D;
        int d = (int)(e - row * D);
        var part = default(TPartElement);
        float o = part.Load(a.PartO[row * D + d]);
        float logRem = a.PartLogRem[row];
        int c = 1;
        if (a.SeparateFar == 0)
        {
            // Eight parts' loads issued together, then combined in their order: the loads do not wait on each other, and a
            // long merge (a short batch split over many chunks) waits Parts / 8 memory latencies, not Parts.
            long stride = (long)a.Rows * D, rowStride = a.Rows;
            for (; c + 7 < a.Parts; c += 8)
            {
                long at = (long)c * stride + row * D + d, rowAt = (long)c * rowStride + row;
                float far0 = part.Load(a.PartO[at]), far1 = part.Load(a.PartO[at + stride]);
                float far2 = part.Load(a.PartO[at + 2 * stride]), far3 = part.Load(a.PartO[at + 3 * stride]);
                float far4 = part.Load(a.PartO[at + 4 * stride]), far5 = part.Load(a.PartO[at + 5 * stride]);
                float far6 = part.Load(a.PartO[at + 6 * stride]), far7 = part.Load(a.PartO[at + 7 * stride]);
                float l0 = a.PartLogRem[rowAt], l1 = a.PartLogRem[rowAt + rowStride];
                float l2 = a.PartLogRem[rowAt + 2 * rowStride], l3 = a.PartLogRem[rowAt + 3 * rowStride];
                float l4 = a.PartLogRem[rowAt + 4 * rowStride], l5 = a.PartLogRem[rowAt + 5 * rowStride];
                float l6 = a.PartLogRem[rowAt + 6 * rowStride], l7 = a.PartLogRem[rowAt + 7 * rowStride];
                o += MathF.Exp(logRem) * far0;
                logRem += l0;
                o += MathF.Exp(logRem) * far1;
                logRem += l1;
                o += MathF.Exp(logRem) * far2;
                logRem += l2;
                o += MathF.Exp(logRem) * far3;
                logRem += l3;
                o += MathF.Exp(logRem) * far4;
                logRem += l4;
                o += MathF.Exp(logRem) * far5;
                logRem += l5;
                o += MathF.Exp(logRem) * far6;
                logRem += l6;
                o += MathF.Exp(logRem) * far7;
                logRem += l7;
            }
        }
        for (; c < a.Parts; c++)
        {
            float far = a.SeparateFar != 0 ? part.Load(a.FarO[row * D + d]) : part.Load(a.PartO[((long)c * a.Rows + row) * D + d]);
            float farLogRem = a.SeparateFar != 0 ? a.FarLogRem[row] : a.PartLogRem[(long)c * a.Rows + row];
            o += MathF.Exp(logRem) * far;
            logRem += farLogRem;
        }
        a.O[e] = default(TElement).Store(o);
        if (d == 0)
        {
            a.LogRem[row] = logRem;
            a.Rem[row] = MathF.Exp(logRem);
        }
    }
}
