using StickBreaking.ILGPU.Kernels.Common;
using StickBreaking.ILGPU.Launch;

namespace StickBreaking.ILGPU.Kernels.TensorCore;

internal static partial class TensorCoreForwardKernel
{
    /// <summary>
    /// How the launch layer runs the kernel for storage <typeparamref name="TStorage"/> and weights
    /// <typeparamref name="TWeights"/> with the library's plan (<see cref="ThreeGroupsPerSmNoPrefetch"/>: measured fastest, 1.36 against 1.46 and 1.48 ms at B=4 H=12 T=4096 D=128 in bf16 when chosen, 1.451 against 1.484
    /// and 1.501 in the eighth session; KernelSet prefers <see cref="WgmmaPlan"/> on SM 9.0 devices at D = 128); see
    /// <see cref="LaunchFor{TStorage, TWeights, TPlan}"/>.
    /// </summary>
    public static KernelLaunch<TensorCoreForwardArgs> LaunchFor<TStorage, TWeights>()
        where TStorage : struct, IStorage
        where TWeights : struct, IWeights => LaunchFor<TStorage, TWeights, ThreeGroupsPerSmNoPrefetch>();

    /// <summary>
    /// How the launch layer runs the kernel for storage <typeparamref name="TStorage"/>, weights
    /// <typeparamref name="TWeights"/> and plan <typeparamref name="TPlan"/>: the constants at the top of the kernel
    /// class (group, rows per group, the head dimensions it serves) and the plan's shared memory and launch bound,
    /// one cached description per specialization.
    /// </summary>
    public static KernelLaunch<TensorCoreForwardArgs> LaunchFor<TStorage, TWeights, TPlan>()
        where TStorage : struct, IStorage
        where TWeights : struct, IWeights
        where TPlan : struct, IForwardPlan => Launches<TStorage, TWeights, TPlan>.Value;

    private static class Launches<TStorage, TWeights, TPlan>
        where TStorage : struct, IStorage
        where TWeights : struct, IWeights
        where TPlan : struct, IForwardPlan
    {
        public static readonly KernelLaunch<TensorCoreForwardArgs> Value = new()
        {
            Name = $"tensor-core forward ({(default(TStorage).IsBFloat16 ? "bf16" : "fp16")}{(default(TPlan).Wgmma ? ", wgmma" : "")})",
            Body = Kernel<TStorage, TWeights, TPlan>,
            Family = KernelFamily.TensorCore,
            RowsPerGroup = BlockRows * default(TPlan).WarpGroups,
            GroupSize = GroupSize * default(TPlan).WarpGroups,
            SharedBytes = SharedBytes<TPlan>(),
            EmulationSharedBytes = EmulatedSharedBytes<TPlan>() - SharedBytes<TPlan>(),
            MinGroupsPerMultiprocessor = default(TPlan).MinGroupsPerMultiprocessor,
            MaxHeadDim = MaxHeadDim,
            HeadDims = Supports,
            WarpSize = 32,
            Hopper = default(TPlan).Wgmma,
        };
    }
}
