using System;
using System.Collections.Generic;
using ILGPU;
using ILGPU.Runtime;
using ILGPU.Runtime.Cuda;

namespace StickBreaking.ILGPU.Launch;

/// <summary>
/// The one launch path: reads a kernel's <see cref="KernelLaunch{TArgs}"/>, sizes its grid and shared memory for a
/// shape on this accelerator, compiles it once (with its launch bound and shared-memory limit on CUDA) and
/// enqueues it. Allocates nothing per launch once a kernel is compiled.
/// </summary>
internal sealed class KernelLauncher
{
    private readonly Accelerator accelerator;
    private readonly Dictionary<object, object> compiled = new(ReferenceEqualityComparer.Instance);

    /// <param name="accelerator">The accelerator to launch on.</param>
    /// <param name="sharedMemoryLimit">A lower cap on shared memory per group than the accelerator's own (tests).</param>
    public KernelLauncher(Accelerator accelerator, int? sharedMemoryLimit)
    {
        this.accelerator = accelerator;
        Plan = new LaunchPlan(accelerator, sharedMemoryLimit);
        RequireAlgorithms(accelerator);
    }

    /// <summary>How portable kernels adapt to this accelerator.</summary>
    public LaunchPlan Plan { get; }

    /// <summary>
    /// Benchmark diagnostics only: a launch bound for every CUDA kernel in place of each kernel's own (groups per
    /// SM). Takes effect for kernels compiled after it is set.
    /// </summary>
    public int? GroupsPerMultiprocessorOverride { get; set; }

    /// <summary>Enqueues <paramref name="kernel"/> on <paramref name="stream"/> over the grid of <paramref name="shape"/>.</summary>
    public void Launch<TArgs>(KernelLaunch<TArgs> kernel, AcceleratorStream stream, AttentionShape shape, TArgs args)
        where TArgs : struct, IGridArgs<TArgs>
    {
        int D = shape.HeadDim;
        int blocks = (int)((shape.Length + (long)kernel.RowsPerGroup - 1) / kernel.RowsPerGroup);
        int columns, slices, groupSize, dynamicFloats;
        if (kernel.Family == KernelFamily.Portable)
        {
            columns = Plan.ColumnsPerGroup(kernel.Name, D, kernel.StaticSharedBytes, kernel.DynamicFloatsPerColumn);
            slices = (D + columns - 1) / columns;
            groupSize = Plan.GroupSize;
            dynamicFloats = kernel.DynamicFloatsPerColumn * columns;
        }
        else
        {
            columns = D;
            slices = 1;
            groupSize = kernel.GroupSize;
            dynamicFloats = (DynamicSharedBytes(kernel) + sizeof(float) - 1) / sizeof(float);
        }
        var config = Plan.GridConfig(kernel.Name, kernel.PerKeyValueHead ? shape.KeyValueHeadCount : shape.HeadCount, blocks, slices, groupSize, dynamicFloats);
        Compiled(kernel)(stream, config, args.WithGrid(blocks, columns, accelerator));
    }

    /// <summary>
    /// Enqueues a kernel whose grid is not the (heads, row blocks, column slices) of an attention shape (the decode and
    /// merge kernels): <paramref name="groupsX"/> x <paramref name="groupsY"/> groups of
    /// <see cref="LaunchPlan.GroupSize"/> threads, static shared memory and the kernel's dynamic shared memory
    /// (<see cref="DynamicSharedBytes"/>: none for the portable ones), its arguments passed as given. The
    /// caller checks the grid against the accelerator's limits before anything is enqueued. <paramref name="groupSize"/>: threads
    /// per group in place of the plan's (tests run a GPU's group size on the CPU accelerator); 0 for the plan's.
    /// </summary>
    public void LaunchGroups<TArgs>(KernelLaunch<TArgs> kernel, AcceleratorStream stream, int groupsX, int groupsY, TArgs args,
        int groupSize = 0)
        where TArgs : struct, IGridArgs<TArgs>
    {
        // Dynamic shared memory only where the kernel asks for some (the warp decode: its ring and mma scratch, off CUDA).
        int dynamicBytes = DynamicSharedBytes(kernel);
        var grid = new Index3D(groupsX, groupsY, 1);
        var group = new Index3D(groupSize > 0 ? groupSize : Plan.GroupSize, 1, 1);
        var config = dynamicBytes > 0 ? new KernelConfig(grid, group, SharedMemoryConfig.RequestDynamic<byte>(dynamicBytes)) : new KernelConfig(grid, group);
        Compiled(kernel)(stream, config, args);
    }

    /// <summary>
    /// Dynamic shared memory per group of a fixed-group kernel: its own, plus what its emulated mma (and the warp decode's
    /// ring) keeps there where there is no PTX.
    /// </summary>
    private int DynamicSharedBytes<TArgs>(KernelLaunch<TArgs> kernel)
        where TArgs : struct, IGridArgs<TArgs> =>
        kernel.SharedBytes + (accelerator is CudaAccelerator ? 0 : kernel.EmulationSharedBytes);

    private Action<AcceleratorStream, KernelConfig, TArgs> Compiled<TArgs>(KernelLaunch<TArgs> kernel)
        where TArgs : struct, IGridArgs<TArgs>
    {
        if (compiled.TryGetValue(kernel, out var launcher))
            return (Action<AcceleratorStream, KernelConfig, TArgs>)launcher;
        var loaded = Compile(kernel);
        compiled[kernel] = loaded;
        return loaded;
    }

    private Action<AcceleratorStream, KernelConfig, TArgs> Compile<TArgs>(KernelLaunch<TArgs> kernel)
        where TArgs : struct, IGridArgs<TArgs>
    {
        try
        {
            if (kernel.Family != KernelFamily.Portable && accelerator is CudaAccelerator cuda)
                return CudaDriver.Load(cuda, kernel.Body, kernel.GroupSize,
                    GroupsPerMultiprocessorOverride ?? kernel.MinGroupsPerMultiprocessor, kernel.SharedBytes,
                    // Inline-PTX operand slots as registers; and the tensor-core kernels live on shared memory (the warp
                    // decode's ring is static, declared in PTX, 12 KB for each of 16 groups), so the largest carveout.
                    promoteOperandSlots: kernel.Family == KernelFamily.TensorCore,
                    largestSharedCarveout: kernel.Family == KernelFamily.TensorCore,
                    hopperTarget: kernel.Hopper);
            return accelerator.LoadKernel(kernel.Body);
        }
        catch (Exception ex) when (ex is not OutOfMemoryException and not InvalidOperationException)
        {
            throw new InvalidOperationException(
                $"ILGPU could not compile the {kernel.Name} kernel for accelerator '{accelerator.Name}' " +
                $"({accelerator.AcceleratorType}): {ex.Message}", ex);
        }
    }

    private static void Probe(ArrayView<float> x) => x[0] = MathF.Exp(x[0]) + MathF.Log(x[0]);

    /// <summary>Compiles a two-line kernel with Exp and Log: without EnableAlgorithms() GPU backends refuse it.</summary>
    private static void RequireAlgorithms(Accelerator accelerator)
    {
        if (accelerator.AcceleratorType == AcceleratorType.CPU)
            return;   // the CPU accelerator runs .NET's own MathF
        try
        {
            accelerator.LoadKernel<ArrayView<float>>(Probe);
        }
        catch (Exception ex) when (ex is not OutOfMemoryException)
        {
            throw new InvalidOperationException(
                $"Accelerator '{accelerator.Name}' ({accelerator.AcceleratorType}) cannot compile exp/log: its ILGPU context " +
                "needs the ILGPU.Algorithms intrinsics. Build the context with EnableAlgorithms(), e.g. " +
                "Context.Create(builder => builder.Default().EnableAlgorithms()) (using ILGPU.Algorithms ... " +
                "namespace ILGPU). ILGPU said: " + ex.Message, ex);
        }
    }
}
