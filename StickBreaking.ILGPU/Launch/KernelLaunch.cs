using System;
using ILGPU.Runtime;
using ILGPU.Runtime.Cuda;

namespace StickBreaking.ILGPU.Launch;

/// <summary>What a kernel is built on, and so where it may run.</summary>
internal enum KernelFamily
{
    /// <summary>
    /// Shared memory and barriers only: builds for CUDA, OpenCL and the CPU accelerator, adapts to any group
    /// size, and splits the head dimension over the grid's z dimension when its accumulator does not fit.
    /// </summary>
    Portable,

    /// <summary>
    /// Register tiles, warp shuffles, a fixed group and (on CUDA) more than 48 KB of opt-in dynamic shared memory.
    /// Runs on CUDA devices that can hold it; its code also runs on the CPU accelerator (tests).
    /// </summary>
    Cuda,

    /// <summary>
    /// Tensor cores through inline PTX (<c>mma.sync</c>), warp shuffles, a fixed group and opt-in shared memory, for
    /// 16-bit storage. Runs on CUDA devices that can hold it; elsewhere its code runs with the mma emulated in
    /// shared memory (tests on the CPU accelerator), never on OpenCL (which drops inline PTX silently).
    /// </summary>
    TensorCore,
}

/// <summary>
/// How one kernel is launched, declared once beside its body (the way FlashAttention keeps kernel traits apart
/// from kernel bodies): the launch layer (<see cref="KernelLauncher"/>) reads nothing else about a kernel.
/// The grid is always (B * H, ceil(T / <see cref="RowsPerGroup"/>), column slices), with B * Hkv in place of B * H for a
/// kernel that walks the keys of each key/value head (<see cref="PerKeyValueHead"/>).
/// </summary>
/// <typeparam name="TArgs">The kernel's argument struct.</typeparam>
internal sealed class KernelLaunch<TArgs>
    where TArgs : struct, IGridArgs<TArgs>
{
    /// <summary>A name for messages ("CUDA forward").</summary>
    public required string Name { get; init; }

    /// <summary>The kernel body.</summary>
    public required Action<TArgs> Body { get; init; }

    /// <summary>What it is built on.</summary>
    public required KernelFamily Family { get; init; }

    /// <summary>Query rows (or keys, for a pass that walks blocks of keys) each group owns along T.</summary>
    public required int RowsPerGroup { get; init; }

    /// <summary>
    /// Whether grid X walks key/value heads (B * Hkv: a pass that owns keys, such as the dk/dv pass, looping over the
    /// query heads of each group in a fixed order) rather than query heads (B * H).
    /// </summary>
    public bool PerKeyValueHead { get; init; }

    /// <summary>Threads per group; 0 for a portable kernel, which takes the accelerator's (<see cref="LaunchPlan.GroupSize"/>).</summary>
    public int GroupSize { get; init; }

    /// <summary>Fixed dynamic shared memory per group, in bytes (register-tile kernels).</summary>
    public int SharedBytes { get; init; }

    /// <summary>
    /// Tensor-core kernels: shared memory per group their emulated mma adds where there are no tensor cores (the warp decode:
    /// also its staging ring, which CUDA declares in PTX). LaunchGroups requests it as dynamic shared memory off CUDA only.
    /// </summary>
    public int EmulationSharedBytes { get; init; }

    /// <summary>Head dimensions it serves besides <see cref="MaxHeadDim"/> (null: every D up to it).</summary>
    public Func<int, bool>? HeadDims { get; init; }

    /// <summary>Portable kernels: static shared memory per group, in bytes, besides the per-column accumulator.</summary>
    public int StaticSharedBytes { get; init; }

    /// <summary>Portable kernels: dynamic shared floats per output column (the accumulator a group keeps).</summary>
    public int DynamicFloatsPerColumn { get; init; }

    /// <summary>Launch bound: groups per multiprocessor the CUDA compiler must fit (caps registers); 0 for none.</summary>
    public int MinGroupsPerMultiprocessor { get; init; }

    /// <summary>The largest head dimension it serves.</summary>
    public int MaxHeadDim { get; init; } = AttentionShape.MaxHeadDim;

    /// <summary>Threads per warp its shuffles assume; 0 when it uses none.</summary>
    public int WarpSize { get; init; }

    /// <summary>
    /// Whether it uses Hopper's <c>wgmma</c>: its PTX is retargeted to <c>sm_90a</c> (<see cref="PtxTarget"/>), so on CUDA it
    /// runs on SM 9.0 devices only (elsewhere its code runs with the products emulated, as every tensor-core kernel's).
    /// </summary>
    public bool Hopper { get; init; }

    /// <summary>Whether it serves head dimension <paramref name="headDim"/>.</summary>
    public bool ServesHeadDim(int headDim) => headDim <= MaxHeadDim && (HeadDims?.Invoke(headDim) ?? true);

    /// <summary>
    /// Why <paramref name="accelerator"/> cannot hold this kernel (a fixed-group kernel: its group, warp and shared
    /// memory), or <c>null</c> when it can. <paramref name="optInSharedBytes"/> is the accelerator's shared memory
    /// per group, opt-in limit included.
    /// </summary>
    public string? Unfit(Accelerator accelerator, long optInSharedBytes)
    {
        if (Family == KernelFamily.Portable)
            return null;   // the launch plan sizes it to the accelerator, or says why it cannot
        if (Family == KernelFamily.TensorCore && accelerator.AcceleratorType == AcceleratorType.OpenCL)
            return $"the {Name} kernel uses inline PTX, which ILGPU's OpenCL backend drops";
        if (Family == KernelFamily.TensorCore && accelerator is CudaAccelerator cuda && cuda.Architecture is { } architecture
            && architecture < CudaArchitecture.SM_80)
            return $"the {Name} kernel uses mma.sync on fp16/bf16 (compute capability 8.0 or later); '{accelerator.Name}' is {architecture}";
        if (Hopper && accelerator is CudaAccelerator hopper && hopper.Architecture is not { Major: 9 })
            return $"the {Name} kernel uses wgmma (sm_90a, compute capability 9.0); '{accelerator.Name}' is {hopper.Architecture}";
        if (accelerator.MaxNumThreadsPerGroup < GroupSize)
            return $"the {Name} kernel needs {GroupSize} threads per group; '{accelerator.Name}' allows {accelerator.MaxNumThreadsPerGroup}";
        if (WarpSize != 0 && accelerator.WarpSize != WarpSize)
            return $"the {Name} kernel scans by warp shuffles over warps of {WarpSize} threads; '{accelerator.Name}' has warps of {accelerator.WarpSize}";
        if (accelerator.AcceleratorType == AcceleratorType.Cuda && optInSharedBytes < SharedBytes)
            return $"the {Name} kernel needs {SharedBytes} bytes of shared memory per group; '{accelerator.Name}' offers {optInSharedBytes}";
        return null;
    }
}

/// <summary>Kernel arguments that carry the launch's grid shape, filled in by the launch layer.</summary>
/// <typeparam name="TSelf">The argument struct itself.</typeparam>
internal interface IGridArgs<TSelf>
    where TSelf : struct
{
    /// <summary>
    /// A copy with the grid's blocks along T and the output columns each group owns, and whatever else the launch on
    /// <paramref name="accelerator"/> needs (the device addresses that CUDA kernels copy from by cp.async).
    /// </summary>
    TSelf WithGrid(int rowBlocks, int columnsPerGroup, Accelerator accelerator);
}
