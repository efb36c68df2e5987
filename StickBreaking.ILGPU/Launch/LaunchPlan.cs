using System;
using ILGPU;
using ILGPU.Runtime;
using StickBreaking.ILGPU.Kernels.Common;
using StickBreaking.ILGPU.Kernels.Portable;

namespace StickBreaking.ILGPU.Launch;

/// <summary>
/// How the kernels are launched on one accelerator, read from the accelerator's own limits: threads per
/// group and how many output columns one group can accumulate in the shared memory it offers.
/// </summary>
internal sealed class LaunchPlan
{
    /// <summary>Threads per group on GPUs and OpenCL devices.</summary>
    public const int PreferredGroupSize = 256;
    /// <summary>Threads per group on the CPU accelerator, where each thread is an OS thread.</summary>
    public const int PreferredCpuGroupSize = 32;

    private readonly Accelerator accelerator;
    private readonly long sharedMemory;

    /// <param name="accelerator">The accelerator whose limits apply.</param>
    /// <param name="sharedMemoryLimit">A lower cap on shared memory per group than the accelerator's own (tests).</param>
    public LaunchPlan(Accelerator accelerator, int? sharedMemoryLimit = null)
    {
        this.accelerator = accelerator;
        sharedMemory = Math.Min(accelerator.MaxSharedMemoryPerGroup, sharedMemoryLimit ?? int.MaxValue);
        int preferred = accelerator.AcceleratorType == AcceleratorType.CPU ? PreferredCpuGroupSize : PreferredGroupSize;
        GroupSize = Math.Min(preferred, accelerator.MaxNumThreadsPerGroup);
        if (GroupSize < 1)
            throw new InvalidOperationException(
                $"Accelerator '{accelerator.Name}' reports {accelerator.MaxNumThreadsPerGroup} threads per group; the kernels need at least 1.");
    }

    /// <summary>Threads per group for every kernel on this accelerator.</summary>
    public int GroupSize { get; }

    /// <summary>
    /// Output columns per group for a kernel that needs <paramref name="staticBytes"/> of static shared memory
    /// and <paramref name="floatsPerColumn"/> dynamic floats per column: all of D when it fits, else a
    /// multiple of the staging chunk (the grid's z dimension then walks the slices).
    /// </summary>
    public int ColumnsPerGroup(string kernel, int headDim, int staticBytes, int floatsPerColumn)
    {
        long available = sharedMemory - staticBytes;
        long fit = available / (4L * floatsPerColumn);
        if (fit >= headDim)
            return headDim;
        int columns = (int)(fit / TileLoad.DimChunk) * TileLoad.DimChunk;
        if (columns < TileLoad.DimChunk)
            throw new InvalidOperationException(
                $"Accelerator '{accelerator.Name}' offers {sharedMemory} bytes of shared memory per group; " +
                $"the {kernel} kernel needs at least {staticBytes + 4L * floatsPerColumn * TileLoad.DimChunk}.");
        return columns;
    }

    /// <summary>A (heads, blocks, slices) grid of groups of <paramref name="groupSize"/> threads with <paramref name="dynamicFloats"/> of dynamic shared memory.</summary>
    public KernelConfig GridConfig(string kernel, long heads, int blocks, int slices, int groupSize, int dynamicFloats)
    {
        var max = accelerator.MaxGridSize;
        if (heads > max.X || blocks > max.Y || slices > max.Z)
            throw new ArgumentOutOfRangeException("shape", heads,
                $"The {kernel} grid ({heads} heads, {blocks} blocks, {slices} column slices) exceeds the grid limits " +
                $"({max.X}, {max.Y}, {max.Z}) of accelerator '{accelerator.Name}' (docs/limits.md).");
        return new KernelConfig(
            new Index3D((int)heads, blocks, slices),
            new Index3D(groupSize, 1, 1),
            SharedMemoryConfig.RequestDynamic<float>(dynamicFloats));
    }
}
