using System.Linq;
using NUnit.Framework;
using StickBreaking.ILGPU.Kernels.Cuda;
using StickBreaking.ILGPU.Launch;
using StickBreaking.ILGPU.Tests.Infrastructure;
using StickBreaking.ILGPU.Tests.Reference;

namespace StickBreaking.ILGPU.Tests;

/// <summary>
/// What the CUDA driver made of the hot kernels, read back through cuFuncGetAttribute after they ran: no
/// local memory (register spills) under each kernel's launch bound, and as many groups resident per SM as
/// that bound promises (registers and shared memory both fit). PtxTests checks the PTX in CI; only the
/// driver's own compilation (ptxas) shows spills, so this check needs the GPU.
/// </summary>
public sealed class CudaResourceTests(string backend) : BackendFixture(backend)
{
    private static readonly (string Name, int GroupsPerSm)[] HotKernels =
    {
        ($"{nameof(CudaForwardKernel)}.{nameof(CudaForwardKernel.Kernel)}", CudaForwardKernel.MinGroupsPerMultiprocessor),
        ($"{nameof(CudaBackwardQueryKernel)}.{nameof(CudaBackwardQueryKernel.Kernel)}", CudaBackwardQueryKernel.MinGroupsPerMultiprocessor),
        ($"{nameof(CudaBackwardKeyKernel)}.{nameof(CudaBackwardKeyKernel.Kernel)}", CudaBackwardKeyKernel.MinGroupsPerMultiprocessor),
    };

    [Test]
    public void HotKernelsSpillNothing()
    {
        if (Backend != Backends.Cuda)
            Assert.Ignore($"register spills are a CUDA driver figure; {Backend} has none to read.");
        Assert.That(Attention.UsesCudaKernels, Is.True, "this CUDA device runs the CUDA kernels");
        var shape = new AttentionShape(1, 2, 130, 128);
        var x = TestInputs.Standard(1, 2, 130, 128, seed: 3);
        Attention.Backward(x.Q, x.K, x.V, x.DO, x.DRem, shape);   // the training forward, then both passes

        var loaded = CudaDriver.Loaded;
        foreach (var (name, r) in loaded.OrderBy(k => k.Key))
            TestContext.Out.WriteLine($"{name}: {r.Registers} registers, {r.LocalBytes} B local per thread, {r.SharedBytes} B shared, " +
                $"launch bound {r.MinGroupsPerMultiprocessor} groups/SM, {r.ResidentGroupsPerMultiprocessor} resident");
        Assert.Multiple(() =>
        {
            foreach (var (name, groupsPerSm) in HotKernels)
            {
                if (name.StartsWith(nameof(CudaBackwardQueryKernel)) || name.StartsWith(nameof(CudaBackwardKeyKernel)))
                {
                    if (!Attention.UsesCudaBackwardKernels)
                    {
                        TestContext.Out.WriteLine($"{name}: not used on {Accelerator.Name} (too little opt-in shared memory; the portable backward runs)");
                        continue;
                    }
                }
                Assert.That(loaded.ContainsKey(name), Is.True, $"{name} was loaded");
                if (loaded.TryGetValue(name, out var r))
                {
                    Assert.That(r.MinGroupsPerMultiprocessor, Is.EqualTo(groupsPerSm), $"{name}: compiled with its own launch bound");
                    Assert.That(r.LocalBytes, Is.EqualTo(0), $"{name}: bytes of local memory (spills) per thread");
                    Assert.That(r.ResidentGroupsPerMultiprocessor, Is.GreaterThanOrEqualTo(groupsPerSm), $"{name}: groups resident per SM");
                }
            }
        });
    }
}
