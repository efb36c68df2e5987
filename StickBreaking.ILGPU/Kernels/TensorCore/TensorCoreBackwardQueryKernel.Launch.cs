using StickBreaking.ILGPU.Kernels.Common;
using StickBreaking.ILGPU.Launch;

namespace StickBreaking.ILGPU.Kernels.TensorCore;

internal static partial class TensorCoreBackwardQueryKernel
{
    /// <summary>
    /// How the launch layer runs the kernel for storage <typeparamref name="TStorage"/> and dz handling
    /// <typeparamref name="TWeights"/>: the constants at the top of the kernel class (group, rows per group, shared
    /// memory, launch bound, the head dimensions it serves), one cached description per specialization.
    /// </summary>
    public static KernelLaunch<BackwardArgs<ushort>> LaunchFor<TStorage, TWeights>()
        where TStorage : struct, IStorage
        where TWeights : struct, IWeights => Launches<TStorage, TWeights>.Value;

    private static class Launches<TStorage, TWeights>
        where TStorage : struct, IStorage
        where TWeights : struct, IWeights
    {
        public static readonly KernelLaunch<BackwardArgs<ushort>> Value = new()
        {
            Name = $"tensor-core backward dq ({(default(TStorage).IsBFloat16 ? "bf16" : "fp16")}, {(default(TWeights).Split ? "split" : "rounded")} dz)",
            Body = Kernel<TStorage, TWeights>,
            Family = KernelFamily.TensorCore,
            RowsPerGroup = BlockRows,
            GroupSize = GroupSize,
            SharedBytes = SharedBytes,
            EmulationSharedBytes = EmulatedSharedBytes - SharedBytes,
            MinGroupsPerMultiprocessor = MinGroupsPerMultiprocessor,
            MaxHeadDim = MaxHeadDim,
            HeadDims = Supports,
            WarpSize = 32,
        };
    }
}
