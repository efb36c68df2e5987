using System;
using ILGPU.Runtime;
using ILGPU.Runtime.Cuda;
using StickBreaking.ILGPU.Kernels.Common;
using StickBreaking.ILGPU.Kernels.Decode;
using StickBreaking.ILGPU.Kernels.Cuda;
using StickBreaking.ILGPU.Kernels.Portable;
using StickBreaking.ILGPU.Kernels.TensorCore;

namespace StickBreaking.ILGPU.Launch;

/// <summary>Which kernels an instance may run (tests force the CUDA kernels' code onto the CPU accelerator).</summary>
internal enum KernelChoice
{
    /// <summary>The CUDA kernels on a CUDA device that can hold them, the portable ones elsewhere.</summary>
    Auto,
    /// <summary>The portable kernels everywhere.</summary>
    Portable,
    /// <summary>The CUDA kernels' code on any accelerator (the CPU accelerator runs it as plain ILGPU code); an error where they cannot run.</summary>
    Cuda,
}

/// <summary>
/// The kernels one accelerator runs, chosen once from what each kernel's <see cref="KernelLaunch{TArgs}"/> says it
/// needs: per call, the fastest one that serves the head dimension, else the portable one (which serves every D).
/// </summary>
internal sealed class KernelSet
{
    private readonly KernelLaunch<ForwardArgs<float>>? fastForward;
    private readonly KernelLaunch<BackwardArgs<float>>? fastBackwardQuery, fastBackwardKey;
    // Indexed [bf16 ? 1 : 0, exact ? 1 : 0]: rounded or split (exact) 16-bit products.
    private readonly KernelLaunch<TensorCoreForwardArgs>?[,] tensorCoreForward = new KernelLaunch<TensorCoreForwardArgs>?[2, 2];
    // The same with the Hopper plans (wgmma), on SM 9.0 devices only (see TensorCoreForward16): one warpgroup a group
    // (D = 64) and two (D = 128).
    private readonly KernelLaunch<TensorCoreForwardArgs>?[,] tensorCoreForwardWgmma = new KernelLaunch<TensorCoreForwardArgs>?[2, 2];
    private readonly KernelLaunch<TensorCoreForwardArgs>?[,] tensorCoreForwardWgmmaWide = new KernelLaunch<TensorCoreForwardArgs>?[2, 2];
    private readonly (KernelLaunch<BackwardArgs<ushort>> Query, KernelLaunch<BackwardArgs<ushort>> Key)?[,] tensorCoreBackward =
        new (KernelLaunch<BackwardArgs<ushort>>, KernelLaunch<BackwardArgs<ushort>>)?[2, 2];
    private readonly KernelLaunch<DecodeArgs<float>>? warpDecode;
    private readonly KernelLaunch<DecodeArgs<ushort>>? warpDecodeFp16, warpDecodeBf16;

    public KernelSet(Accelerator accelerator, KernelChoice choice)
    {
        if (choice == KernelChoice.Portable || (choice == KernelChoice.Auto && accelerator is not CudaAccelerator))
            return;
        long sharedBytes = accelerator is CudaAccelerator cuda ? CudaDriver.MaxOptInSharedBytes(cuda) : accelerator.MaxSharedMemoryPerGroup;
        fastForward = Fit(CudaForwardKernel.Launch, accelerator, sharedBytes, choice);
        if (accelerator.AcceleratorType != AcceleratorType.OpenCL)
        {
            warpDecode = Fit(DecodeWarpKernel.Launch, accelerator, sharedBytes, choice);
            warpDecodeFp16 = Fit(DecodeWarpKernel.LaunchFp16, accelerator, sharedBytes, choice);
            warpDecodeBf16 = Fit(DecodeWarpKernel.LaunchBf16, accelerator, sharedBytes, choice);
        }
        // 16-bit storage: the tensor-core forward where it fits (on the CPU accelerator, with the mma emulated).
        if (accelerator.AcceleratorType != AcceleratorType.OpenCL)
        {
            // Each storage type with its weights rounded (the default) or split into two 16-bit parts
            // (StickBreakingOptions.ExactProducts), for the forward and both backward passes.
            tensorCoreForward[1, 0] = Fit(TensorCoreForwardKernel.LaunchFor<Bf16Storage, RoundedWeights>(), accelerator, sharedBytes, choice);
            tensorCoreForward[1, 1] = Fit(TensorCoreForwardKernel.LaunchFor<Bf16Storage, SplitWeights>(), accelerator, sharedBytes, choice);
            tensorCoreForward[0, 0] = Fit(TensorCoreForwardKernel.LaunchFor<Fp16Storage, RoundedWeights>(), accelerator, sharedBytes, choice);
            tensorCoreForward[0, 1] = Fit(TensorCoreForwardKernel.LaunchFor<Fp16Storage, SplitWeights>(), accelerator, sharedBytes, choice);
            if (accelerator is CudaAccelerator { Architecture: { Major: 9 } })
            {
                tensorCoreForwardWgmma[1, 0] = Fit(TensorCoreForwardKernel.LaunchFor<Bf16Storage, RoundedWeights, WgmmaPlan>(), accelerator, sharedBytes, choice);
                tensorCoreForwardWgmma[1, 1] = Fit(TensorCoreForwardKernel.LaunchFor<Bf16Storage, SplitWeights, WgmmaPlan>(), accelerator, sharedBytes, choice);
                tensorCoreForwardWgmma[0, 0] = Fit(TensorCoreForwardKernel.LaunchFor<Fp16Storage, RoundedWeights, WgmmaPlan>(), accelerator, sharedBytes, choice);
                tensorCoreForwardWgmma[0, 1] = Fit(TensorCoreForwardKernel.LaunchFor<Fp16Storage, SplitWeights, WgmmaPlan>(), accelerator, sharedBytes, choice);
                tensorCoreForwardWgmmaWide[1, 0] = Fit(TensorCoreForwardKernel.LaunchFor<Bf16Storage, RoundedWeights, WgmmaTwoWarpgroupsPlan>(), accelerator, sharedBytes, choice);
                tensorCoreForwardWgmmaWide[1, 1] = Fit(TensorCoreForwardKernel.LaunchFor<Bf16Storage, SplitWeights, WgmmaTwoWarpgroupsPlan>(), accelerator, sharedBytes, choice);
                tensorCoreForwardWgmmaWide[0, 0] = Fit(TensorCoreForwardKernel.LaunchFor<Fp16Storage, RoundedWeights, WgmmaTwoWarpgroupsPlan>(), accelerator, sharedBytes, choice);
                tensorCoreForwardWgmmaWide[0, 1] = Fit(TensorCoreForwardKernel.LaunchFor<Fp16Storage, SplitWeights, WgmmaTwoWarpgroupsPlan>(), accelerator, sharedBytes, choice);
            }
            tensorCoreBackward[1, 0] = FitPasses(TensorCoreBackwardQueryKernel.LaunchFor<Bf16Storage, RoundedWeights>(),
                TensorCoreBackwardKeyKernel.LaunchFor<Bf16Storage, RoundedWeights>(), accelerator, sharedBytes, choice);
            tensorCoreBackward[1, 1] = FitPasses(TensorCoreBackwardQueryKernel.LaunchFor<Bf16Storage, SplitWeights>(),
                TensorCoreBackwardKeyKernel.LaunchFor<Bf16Storage, SplitWeights>(), accelerator, sharedBytes, choice);
            tensorCoreBackward[0, 0] = FitPasses(TensorCoreBackwardQueryKernel.LaunchFor<Fp16Storage, RoundedWeights>(),
                TensorCoreBackwardKeyKernel.LaunchFor<Fp16Storage, RoundedWeights>(), accelerator, sharedBytes, choice);
            tensorCoreBackward[0, 1] = FitPasses(TensorCoreBackwardQueryKernel.LaunchFor<Fp16Storage, SplitWeights>(),
                TensorCoreBackwardKeyKernel.LaunchFor<Fp16Storage, SplitWeights>(), accelerator, sharedBytes, choice);
        }
        // The CUDA passes need more shared memory than the CUDA forward: a device whose opt-in limit is between
        // the two runs the CUDA forward and the portable backward (both read the same snapshots).
        if (fastForward is not null
            && Fit(CudaBackwardQueryKernel.Launch, accelerator, sharedBytes, choice) is { } query
            && Fit(CudaBackwardKeyKernel.Launch, accelerator, sharedBytes, choice) is { } key)
        {
            fastBackwardQuery = query;
            fastBackwardKey = key;
        }
    }

    /// <summary>Whether the CUDA forward serves the head dimensions it covers.</summary>
    public bool CudaForward => fastForward is not null;

    /// <summary>Whether the CUDA backward passes serve the head dimensions they cover.</summary>
    public bool CudaBackward => fastBackwardQuery is not null;

    /// <summary>The forward kernel for head dimension <paramref name="headDim"/>.</summary>
    public KernelLaunch<ForwardArgs<float>> Forward(int headDim) =>
        fastForward is { } fast && fast.ServesHeadDim(headDim) ? fast : ForwardKernel.Launch;

    /// <summary>Whether the tensor-core forward serves 16-bit storage for the head dimensions it covers.</summary>
    public bool TensorCoreForward => tensorCoreForward[1, 0] is not null;

    /// <summary>Sequences at least this long take the Hopper plan with two warpgroups a group at D = 128 (see <see cref="TensorCoreForward16"/>).</summary>
    public const int TwoWarpgroupsFromLength = 2048;

    /// <summary>
    /// The tensor-core forward for 16-bit storage (bf16 or fp16), head dimension <paramref name="headDim"/> and sequence
    /// length <paramref name="length"/>, if one serves it: on an SM 9.0 device a Hopper plan, otherwise the mma plan.
    /// The Hopper plan with two warpgroups a group (<see cref="WgmmaTwoWarpgroupsPlan"/>: each K / V tile staged once for
    /// 128 query rows, one group per SM) serves D = 128 from <see cref="TwoWarpgroupsFromLength"/> on, the one with one
    /// warpgroup (<see cref="WgmmaPlan"/>: three groups per SM) the rest. Eleventh session, bf16 forward alone, B=4 H=12
    /// D=128, one call: T = 1024 0.169 ms with two against 0.147 with one (fewer, larger groups; presumably a worse fill
    /// of the SMs, not measured apart); T = 4096, 8192, 16384 1.169, 4.062, 15.39 against 1.303, 4.697, 18.14; B=4 H=16
    /// D=64 T=4096 1.147 against 0.958. T = 2048 (another call): 0.391 with two against 0.387 (docs/performance.md).
    /// </summary>
    public KernelLaunch<TensorCoreForwardArgs>? TensorCoreForward16(int headDim, int length, bool bf16, bool exact = false) =>
        headDim > 64 && length >= TwoWarpgroupsFromLength
            && tensorCoreForwardWgmmaWide[bf16 ? 1 : 0, exact ? 1 : 0] is { } wide && wide.ServesHeadDim(headDim) ? wide
        : tensorCoreForwardWgmma[bf16 ? 1 : 0, exact ? 1 : 0] is { } hopper && hopper.ServesHeadDim(headDim) ? hopper
        : tensorCoreForward[bf16 ? 1 : 0, exact ? 1 : 0] is { } kernel && kernel.ServesHeadDim(headDim) ? kernel : null;

    /// <summary>The two backward passes (dq and P snapshots; dk and dv) for head dimension <paramref name="headDim"/>.</summary>
    public (KernelLaunch<BackwardArgs<float>> Query, KernelLaunch<BackwardArgs<float>> Key) Backward(int headDim) =>
        fastBackwardQuery is { } query && fastBackwardKey is { } key && query.ServesHeadDim(headDim) && key.ServesHeadDim(headDim)
            ? (query, key)
            : (BackwardQueryKernel.Launch, BackwardKeyKernel.Launch);

    /// <summary>
    /// The portable forward on 16-bit storage (q, k, v, o as fp16 or bf16 bits; rem, LogRem, snapshots fp32), on
    /// every backend and head dimension, where <see cref="TensorCoreForward16"/> serves none. On OpenCL (<see cref="OutputAccumulator.InOutput"/>) its
    /// arguments need <c>AccumulatorScratch</c>: B * H * T * D floats.
    /// </summary>
    public KernelLaunch<ForwardArgs<ushort>> Forward16(int headDim, bool bf16) =>
        bf16 ? ForwardKernel.LaunchBf16 : ForwardKernel.LaunchFp16;

    /// <summary>
    /// The two backward passes on 16-bit storage (q, k, v, dO, dq, dk, dv as fp16 or bf16 bits; dRem, LogRem,
    /// snapshots fp32): the tensor-core passes where they serve (<see cref="TensorCoreBackward16"/>), else the portable
    /// passes, on every backend and head dimension. They read the same snapshots as the
    /// fp32 passes. On OpenCL (<see cref="OutputAccumulator.InOutput"/>) their arguments need
    /// <c>AccumulatorScratch</c>: 2 * B * H * T * D floats, shared by the two passes.
    /// </summary>
    public (KernelLaunch<BackwardArgs<ushort>> Query, KernelLaunch<BackwardArgs<ushort>> Key) Backward16(int headDim, bool bf16, bool exact = false) =>
        TensorCoreBackward16(headDim, bf16, exact)
        ?? (bf16 ? (BackwardQueryKernel.LaunchBf16, BackwardKeyKernel.LaunchBf16) : (BackwardQueryKernel.LaunchFp16, BackwardKeyKernel.LaunchFp16));

    /// <summary>
    /// The warp decode (<see cref="DecodeWarpKernel"/>) standing in for the portable decode kernel <paramref name="portable"/>
    /// (same storage) at head dimension <paramref name="headDim"/>, if it fits this accelerator and serves that D; else null.
    /// </summary>
    public KernelLaunch<DecodeArgs<T>>? WarpDecode<T>(KernelLaunch<DecodeArgs<T>> portable, int headDim)
        where T : unmanaged
    {
        object? warp = ReferenceEquals(portable, DecodeKernel.Launch) ? warpDecode
            : ReferenceEquals(portable, DecodeKernel.LaunchFp16) ? warpDecodeFp16
            : ReferenceEquals(portable, DecodeKernel.LaunchBf16) ? warpDecodeBf16 : null;
        return warp is KernelLaunch<DecodeArgs<T>> kernel && kernel.ServesHeadDim(headDim) ? kernel : null;
    }

    /// <summary>Whether the tensor-core backward passes serve 16-bit storage for the head dimensions they cover.</summary>
    public bool TensorCoreBackward => tensorCoreBackward[1, 0] is not null;

    /// <summary>The tensor-core backward passes for 16-bit storage and head dimension <paramref name="headDim"/>, if they serve it.</summary>
    public (KernelLaunch<BackwardArgs<ushort>> Query, KernelLaunch<BackwardArgs<ushort>> Key)? TensorCoreBackward16(int headDim, bool bf16, bool exact = false) =>
        tensorCoreBackward[bf16 ? 1 : 0, exact ? 1 : 0] is { } passes
        && passes.Query.ServesHeadDim(headDim) && passes.Key.ServesHeadDim(headDim) ? passes : null;

    /// <summary>Both passes if the accelerator can hold both; otherwise null (Auto) or a clear error (a forced choice).</summary>
    private static (KernelLaunch<BackwardArgs<ushort>>, KernelLaunch<BackwardArgs<ushort>>)? FitPasses(
        KernelLaunch<BackwardArgs<ushort>> query, KernelLaunch<BackwardArgs<ushort>> key, Accelerator accelerator, long sharedBytes,
        KernelChoice choice) =>
        Fit(query, accelerator, sharedBytes, choice) is { } q && Fit(key, accelerator, sharedBytes, choice) is { } k ? (q, k) : null;


    /// <summary>The kernel if the accelerator can hold it; otherwise null (Auto) or a clear error (a forced choice).</summary>
    private static KernelLaunch<TArgs>? Fit<TArgs>(KernelLaunch<TArgs> kernel, Accelerator accelerator, long sharedBytes, KernelChoice choice)
        where TArgs : struct, IGridArgs<TArgs>
    {
        string? unfit = kernel.Unfit(accelerator, sharedBytes);
        if (unfit is null)
            return kernel;
        if (choice == KernelChoice.Cuda)
            throw new InvalidOperationException($"Cannot run the CUDA kernels here: {unfit}.");
        return null;
    }
}
