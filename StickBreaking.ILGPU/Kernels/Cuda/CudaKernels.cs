using System;
using System.Reflection;
using System.Runtime.InteropServices;
using ILGPU;
using ILGPU.Runtime;
using ILGPU.Runtime.Cuda;

namespace StickBreaking.ILGPU.Kernels.Cuda;

/// <summary>
/// Loads the CUDA-only kernels: compiled with launch bounds, and with the function's dynamic shared memory
/// limit raised above the default 48 KB through the driver's cuFuncSetAttribute (ILGPU never calls it).
/// </summary>
internal static class CudaKernels
{
    private const int MaxDynamicSharedSizeBytes = 8;   // CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES

    public static Action<AcceleratorStream, KernelConfig, TArgs> Load<TArgs>(
        CudaAccelerator accelerator, Action<TArgs> kernel, int groupSize, int minGroupsPerMultiprocessor, int sharedBytes)
        where TArgs : struct
    {
        var loaded = (CudaKernel)accelerator.LoadKernel(kernel.Method,
            new KernelSpecialization(groupSize, minGroupsPerMultiprocessor));
        int status = CuFuncSetAttribute(loaded.FunctionPtr, MaxDynamicSharedSizeBytes, sharedBytes);
        if (status != 0)
            throw new InvalidOperationException(
                $"cuFuncSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES, {sharedBytes}) failed with CUDA error {status} on '{accelerator.Name}'.");
        return loaded.CreateLauncherDelegate<Action<AcceleratorStream, KernelConfig, TArgs>>();
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
        private delegate int DeviceGetAttributeFn(out int value, int attribute, int device);

        private static readonly FuncSetAttributeFn SetAttribute =
            Marshal.GetDelegateForFunctionPointer<FuncSetAttributeFn>(NativeLibrary.GetExport(Library, "cuFuncSetAttribute"));

        private static readonly DeviceGetAttributeFn GetAttribute =
            Marshal.GetDelegateForFunctionPointer<DeviceGetAttributeFn>(NativeLibrary.GetExport(Library, "cuDeviceGetAttribute"));

        public static int FuncSetAttribute(IntPtr function, int attribute, int value) => SetAttribute(function, attribute, value);

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
