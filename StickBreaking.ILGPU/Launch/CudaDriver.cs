using System;
using System.Collections.Concurrent;
using System.Collections.Generic;
using System.Reflection;
using System.Runtime.InteropServices;
using ILGPU;
using ILGPU.Backends;
using ILGPU.Backends.EntryPoints;
using ILGPU.Backends.PTX;
using ILGPU.Runtime;
using ILGPU.Runtime.Cuda;

namespace StickBreaking.ILGPU.Launch;

/// <summary>
/// Loads the CUDA-only kernels: compiled with launch bounds, and with the function's dynamic shared memory
/// limit raised above the default 48 KB through the driver's cuFuncSetAttribute (ILGPU never calls it), and
/// what the driver compiled recorded (<see cref="Loaded"/>).
/// </summary>
internal static class CudaDriver
{
    private const int MaxDynamicSharedSizeBytes = 8;   // CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
    private const int PreferredSharedMemoryCarveout = 9;   // CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT (percent)
    private const int NumRegs = 4;                     // CU_FUNC_ATTRIBUTE_NUM_REGS
    private const int LocalSizeBytes = 3;              // CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES

    private static readonly ConcurrentDictionary<string, CudaKernelResources> loaded = new();

    /// <summary>
    /// What the driver compiled for each CUDA kernel loaded so far in this process, by kernel name: registers
    /// per thread and local memory (register spills) per thread, read back through cuFuncGetAttribute. PTX
    /// cannot show spills: ptxas decides them when the driver compiles the PTX for the device.
    /// </summary>
    public static IReadOnlyDictionary<string, CudaKernelResources> Loaded => loaded;

    /// <param name="accelerator">The CUDA accelerator.</param>
    /// <param name="kernel">The explicitly grouped kernel.</param>
    /// <param name="groupSize">Threads per group (the launch bound).</param>
    /// <param name="minGroupsPerMultiprocessor">Groups per SM the compiler must allow registers for.</param>
    /// <param name="sharedBytes">Dynamic shared memory per group.</param>
    /// <param name="promoteOperandSlots">Rewrites the PTX so that the operand slots of inline PTX are registers
    /// (<see cref="PtxOperandSlots"/>): for kernels with many inline instructions, where ptxas keeps them in memory.</param>
    /// <param name="largestSharedCarveout">Asks the driver for the largest shared-memory carveout (at L1's expense): for
    /// kernels whose launch bound needs more shared memory per SM than the default split leaves.</param>
    /// <param name="hopperTarget">Retargets the PTX from ILGPU's <c>sm_80</c> to <c>sm_90a</c> (<see cref="PtxTarget"/>), so
    /// that Hopper-only inline instructions (<c>wgmma</c>) compile: only for kernels that run on an SM 9.0 device.</param>
    public static Action<AcceleratorStream, KernelConfig, TArgs> Load<TArgs>(
        CudaAccelerator accelerator, Action<TArgs> kernel, int groupSize, int minGroupsPerMultiprocessor, int sharedBytes,
        bool promoteOperandSlots = false, bool largestSharedCarveout = false, bool hopperTarget = false)
        where TArgs : struct
    {
        var specialization = new KernelSpecialization(groupSize, minGroupsPerMultiprocessor);
        var compiled = promoteOperandSlots || hopperTarget
            ? (CudaKernel)accelerator.LoadKernel(Rewrite(
                accelerator.CompileKernel(EntryPointDescription.FromExplicitlyGroupedKernel(kernel.Method), specialization),
                promoteOperandSlots, hopperTarget))
            : (CudaKernel)accelerator.LoadKernel(kernel.Method, specialization);
        int status = CuFuncSetAttribute(compiled.FunctionPtr, MaxDynamicSharedSizeBytes, sharedBytes);
        if (status != 0)
            throw new InvalidOperationException(
                $"cuFuncSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES, {sharedBytes}) failed with CUDA error {status} on '{accelerator.Name}'.");
        if (largestSharedCarveout && (status = CuFuncSetAttribute(compiled.FunctionPtr, PreferredSharedMemoryCarveout, 100)) != 0)
            throw new InvalidOperationException(
                $"cuFuncSetAttribute(PREFERRED_SHARED_MEMORY_CARVEOUT, 100) failed with CUDA error {status} on '{accelerator.Name}'.");
        if (Driver.FuncGetAttribute(out int registers, NumRegs, compiled.FunctionPtr) != 0)
            registers = -1;
        if (Driver.FuncGetAttribute(out int localBytes, LocalSizeBytes, compiled.FunctionPtr) != 0)
            localBytes = -1;
        if (Driver.OccupancyMaxActiveBlocksPerMultiprocessor(out int resident, compiled.FunctionPtr, groupSize, sharedBytes) != 0)
            resident = -1;
        loaded[$"{kernel.Method.DeclaringType?.Name}.{kernel.Method.Name}"] =
            new CudaKernelResources(registers, localBytes, sharedBytes, minGroupsPerMultiprocessor, resident);
        return compiled.CreateLauncherDelegate<Action<AcceleratorStream, KernelConfig, TArgs>>();
    }

    /// <summary>
    /// The compiled kernel with its PTX rewritten by <see cref="PtxOperandSlots"/> and/or <see cref="PtxTarget"/> (ILGPU
    /// 1.5.3 makes a <see cref="PTXCompiledKernel"/> only internally: its constructor and the entry point are reached by
    /// reflection); the kernel as it was when no rewrite applies. A Hopper retarget that cannot be applied throws: the
    /// kernel's instructions would not compile for sm_80.
    /// </summary>
    private static CompiledKernel Rewrite(CompiledKernel compiled, bool promoteOperandSlots, bool hopperTarget)
    {
        if (compiled is not PTXCompiledKernel ptx)
            return compiled;
        string text = ptx.PTXAssembly;
        bool changed = false;
        if (promoteOperandSlots && PtxOperandSlots.TryPromote(text, out string promoted))
        {
            text = promoted;
            changed = true;
        }
        if (hopperTarget)
        {
            text = PtxTarget.Hopper(text);
            changed = true;
        }
        if (!changed)
            return compiled;
        const BindingFlags Internal = BindingFlags.NonPublic | BindingFlags.Instance;
        object? entryPoint = typeof(CompiledKernel).GetProperty("EntryPoint", Internal | BindingFlags.Public)?.GetValue(compiled);
        var constructor = Array.Find(typeof(PTXCompiledKernel).GetConstructors(Internal | BindingFlags.Public),
            c => c.GetParameters().Length == 4 && c.GetParameters()[3].ParameterType == typeof(string));
        if (entryPoint is null || constructor is null)
        {
            if (hopperTarget)
                throw new InvalidOperationException("This ILGPU version's PTXCompiledKernel cannot be rebuilt with retargeted PTX.");
            return compiled;
        }
        return (CompiledKernel)constructor.Invoke([ptx.Context, entryPoint, ptx.Info, text]);
    }

    /// <summary>Opt-in dynamic shared memory per group this device allows (cudaDevAttrMaxSharedMemoryPerBlockOptin).</summary>
    public static int MaxOptInSharedBytes(CudaAccelerator accelerator)
    {
        int status = CuDeviceGetAttribute(out int value, 97 /* CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN */,
            accelerator.DeviceId);
        return status == 0 ? value : accelerator.MaxSharedMemoryPerGroup;
    }

    private static int CuFuncSetAttribute(IntPtr function, int attribute, int value) =>
        Driver.FuncSetAttribute(function, attribute, value);

    private static int CuDeviceGetAttribute(out int value, int attribute, int device) =>
        Driver.DeviceGetAttribute(out value, attribute, device);

    /// <summary>The two driver entry points, resolved from the library ILGPU itself loads.</summary>
    private static class Driver
    {
        private static readonly IntPtr Library = LoadDriver();

        [UnmanagedFunctionPointer(CallingConvention.Cdecl)]
        private delegate int FuncSetAttributeFn(IntPtr function, int attribute, int value);

        [UnmanagedFunctionPointer(CallingConvention.Cdecl)]
        private delegate int FuncGetAttributeFn(out int value, int attribute, IntPtr function);

        [UnmanagedFunctionPointer(CallingConvention.Cdecl)]
        private delegate int OccupancyFn(out int blocks, IntPtr function, int blockSize, nuint dynamicSharedBytes);

        [UnmanagedFunctionPointer(CallingConvention.Cdecl)]
        private delegate int DeviceGetAttributeFn(out int value, int attribute, int device);

        private static readonly FuncSetAttributeFn SetAttribute =
            Marshal.GetDelegateForFunctionPointer<FuncSetAttributeFn>(NativeLibrary.GetExport(Library, "cuFuncSetAttribute"));

        private static readonly FuncGetAttributeFn GetFuncAttribute =
            Marshal.GetDelegateForFunctionPointer<FuncGetAttributeFn>(NativeLibrary.GetExport(Library, "cuFuncGetAttribute"));

        private static readonly OccupancyFn Occupancy =
            Marshal.GetDelegateForFunctionPointer<OccupancyFn>(NativeLibrary.GetExport(Library, "cuOccupancyMaxActiveBlocksPerMultiprocessor"));

        private static readonly DeviceGetAttributeFn GetAttribute =
            Marshal.GetDelegateForFunctionPointer<DeviceGetAttributeFn>(NativeLibrary.GetExport(Library, "cuDeviceGetAttribute"));

        public static int FuncSetAttribute(IntPtr function, int attribute, int value) => SetAttribute(function, attribute, value);

        public static int FuncGetAttribute(out int value, int attribute, IntPtr function) => GetFuncAttribute(out value, attribute, function);

        public static int OccupancyMaxActiveBlocksPerMultiprocessor(out int blocks, IntPtr function, int blockSize, int sharedBytes) =>
            Occupancy(out blocks, function, blockSize, (nuint)sharedBytes);

        public static int DeviceGetAttribute(out int value, int attribute, int device) => GetAttribute(out value, attribute, device);

        private static IntPtr LoadDriver()
        {
            foreach (string name in new[] { "libcuda.so.1", "libcuda.so", "nvcuda.dll" })
            {
                if (NativeLibrary.TryLoad(name, Assembly.GetExecutingAssembly(), null, out var handle))
                    return handle;
            }
            throw new InvalidOperationException("The CUDA driver library (libcuda.so.1 or nvcuda.dll) could not be loaded.");
        }
    }
}

/// <summary>Resources of one compiled CUDA kernel, as the driver reports them.</summary>
/// <param name="Registers">Registers per thread (-1: the driver did not say).</param>
/// <param name="LocalBytes">Local memory per thread: register spills (0 is the aim for every hot kernel; -1: the driver did not say).</param>
/// <param name="SharedBytes">Dynamic shared memory per group.</param>
/// <param name="MinGroupsPerMultiprocessor">The launch bound it was compiled with.</param>
/// <param name="ResidentGroupsPerMultiprocessor">Groups an SM can hold at once with these registers and this shared
/// memory (cuOccupancyMaxActiveBlocksPerMultiprocessor; -1: the driver did not say).</param>
internal readonly record struct CudaKernelResources(int Registers, int LocalBytes, int SharedBytes, int MinGroupsPerMultiprocessor,
    int ResidentGroupsPerMultiprocessor);
