using System;
using System.Collections.Generic;
using System.Linq;
using ILGPU;
using ILGPU.Runtime;
using ILGPU.Runtime.CPU;
using ILGPU.Runtime.Cuda;
using ILGPU.Runtime.OpenCL;

namespace StickBreaking.ILGPU.Tests.Infrastructure;

/// <summary>
/// The backends every test runs on, and how to open each. Two environment variables steer a run:
/// <c>STICKBREAKING_BACKENDS</c> (comma-separated among Cpu, OpenCL, Cuda) limits which run;
/// <c>STICKBREAKING_REQUIRE</c> names backends that must be present, so that a run that set up a device
/// fails, rather than runs without it, when the device is not found.
/// </summary>
internal static class Backends
{
    public const string Cpu = "Cpu", OpenCL = "OpenCL", Cuda = "Cuda";

    /// <summary>Every backend, in the order the tests and the main job take them.</summary>
    public static readonly string[] All = [Cpu, OpenCL, Cuda];

    /// <summary>
    /// Whether a tensor-core test case of length <paramref name="length"/> and head dimension <paramref name="headDim"/>
    /// runs on <paramref name="backend"/>: every case on CUDA; on the CPU accelerator, where the mma is an emulation run
    /// thread by thread (a case takes tens of seconds), only T x D = 65 x 64 (a diagonal and an earlier tile, a partial
    /// tile) and 15 x 128 (the wide head dimension): the rest would take CI past its time.
    /// </summary>
    public static bool RunsEmulatedMmaCase(string backend, int length, int headDim) =>
        backend != Cpu || (length, headDim) is (65, 64) or (15, 128);

    /// <summary>The reason a tensor-core case is left to CUDA on the CPU accelerator.</summary>
    public const string EmulatedMmaSkip =
        "CUDA only: on the CPU accelerator the mma is emulated thread by thread; the 65 x 64 and 15 x 128 cases cover the code there";

    private static readonly Lazy<(string[] Tested, (string Backend, string Reason)[] LeftOut)> Plan = new(MakePlan);

    /// <summary>
    /// The fixture parameters: the backends to test here, that is those selected (STICKBREAKING_BACKENDS) that
    /// have a device ILGPU accepts, plus every required one (STICKBREAKING_REQUIRE) even when absent, so that
    /// its fixture fails. An absent backend that is not required generates no test at all (rather than
    /// hundreds of skipped ones); <see cref="LeftOut"/> says why, once.
    /// </summary>
    public static string[] Tested => Plan.Value.Tested;

    /// <summary>The backends not tested here, each with the reason.</summary>
    public static (string Backend, string Reason)[] LeftOut => Plan.Value.LeftOut;

    private static (string[] Tested, (string Backend, string Reason)[] LeftOut) MakePlan()
    {
        var tested = new List<string>();
        var leftOut = new List<(string, string)>();
        var selected = Selected;
        var required = Required;
        foreach (string backend in All)
        {
            if (required.Contains(backend))
            {
                tested.Add(backend);   // its fixture fails if the device is absent or not selected
                continue;
            }
            if (selected is not null && !selected.Contains(backend))
            {
                leftOut.Add((backend, $"not selected by STICKBREAKING_BACKENDS={Environment.GetEnvironmentVariable("STICKBREAKING_BACKENDS")}"));
                continue;
            }
            var (context, accelerator, reason) = Open(backend);
            if (accelerator is null)
            {
                leftOut.Add((backend, $"absent: {reason}"));
                continue;
            }
            accelerator.Dispose();
            context?.Dispose();
            tested.Add(backend);
        }
        return (tested.ToArray(), leftOut.ToArray());
    }

    public static IReadOnlySet<string>? Selected => Parse("STICKBREAKING_BACKENDS");

    public static IReadOnlySet<string> Required => Parse("STICKBREAKING_REQUIRE") ?? new HashSet<string>();

    private static HashSet<string>? Parse(string variable)
    {
        string? value = Environment.GetEnvironmentVariable(variable);
        if (string.IsNullOrWhiteSpace(value))
            return null;
        var names = value.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries);
        foreach (var name in names)
        {
            if (!All.Contains(name, StringComparer.OrdinalIgnoreCase))
                throw new InvalidOperationException($"{variable}={value}: '{name}' is not one of {string.Join(", ", All)}.");
        }
        return new HashSet<string>(names.Select(n => All.First(a => a.Equals(n, StringComparison.OrdinalIgnoreCase))));
    }

    /// <summary>
    /// Opens the backend's first device that ILGPU accepts, in a context of that backend alone built with
    /// EnableAlgorithms() (unless told otherwise); null with the reason when there is none.
    /// </summary>
    public static (Context? Context, Accelerator? Accelerator, string Reason) Open(string backend, bool enableAlgorithms = true)
    {
        Context? context = null;
        try
        {
            Context.Builder Algorithms(Context.Builder b) => enableAlgorithms ? b.EnableAlgorithms() : b;
            context = backend switch
            {
                Cpu => Context.Create(b => Algorithms(b.CPU(CPUDeviceKind.Nvidia))),
                OpenCL => Context.Create(b => Algorithms(b.OpenCL())),
                Cuda => Context.Create(b => Algorithms(b.Cuda())),
                _ => throw new ArgumentOutOfRangeException(nameof(backend), backend, "unknown backend"),
            };
            // Pick by type: a context with no accepted device of its own kind still lists the CPU device.
            var type = backend switch { Cpu => AcceleratorType.CPU, OpenCL => AcceleratorType.OpenCL, _ => AcceleratorType.Cuda };
            var device = context.Devices.FirstOrDefault(d => d.AcceleratorType == type);
            if (device is null)
            {
                context.Dispose();
                return (null, null, backend == OpenCL
                    ? "no OpenCL device accepted by ILGPU here (it needs OpenCL C 2.0 generic address space, e.g. PoCL 5 or 6, and the unversioned libOpenCL.so)"
                    : $"no {backend} device found");
            }
            return (context, device.CreateAccelerator(context), "");
        }
        catch (Exception ex) when (ex is not OutOfMemoryException)
        {
            context?.Dispose();
            return (null, null, $"{backend} could not be opened: {ex.GetType().Name}: {ex.Message}");
        }
    }
}
