using StickBreaking.ILGPU.Kernels.Common;
using StickBreaking.ILGPU.Launch;

namespace StickBreaking.ILGPU.Kernels.TensorCore;

internal static partial class TensorCoreBackwardKeyKernel
{
    /// <summary>
    /// How the launch layer runs the kernel for storage <typeparamref name="TStorage"/> and weights
    /// <typeparamref name="TWeights"/> (how A and dz enter the dv and dk products): the constants at the top of the
    /// kernel class (group, keys per group, shared memory, launch bound, the head dimensions it serves), one cached
    /// description per specialization. The grid's x dimension is the key/value heads (B * Hkv: each group loops over
    /// the query heads that read its keys), its y dimension ceil(T / <see cref="KeyBlock"/>) key blocks.
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
            Name = $"tensor-core backward dk/dv ({(default(TStorage).IsBFloat16 ? "bf16" : "fp16")}, " +
                $"{(default(TWeights).Split ? "split" : "rounded")})",
            Body = Kernel<TStorage, TWeights>,
            Family = KernelFamily.TensorCore,
            RowsPerGroup = KeyBlock,
            PerKeyValueHead = true,
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
