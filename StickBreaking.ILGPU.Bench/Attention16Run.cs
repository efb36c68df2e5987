using System;
using System.Linq;
using ILGPU;
using ILGPU.Runtime;
using StickBreaking.ILGPU.Tests.Reference;

namespace StickBreaking.ILGPU.Bench;

/// <summary>
/// One shape's 16-bit device buffers (fp16 or bf16 q, k, v, o, dO, dq, dk, dv; fp32 rem, LogRem and dRem; a
/// workspace for the training forward), with the forward and the backward ready to launch through the device-level
/// API: the 16-bit counterpart of <see cref="DeviceRun"/>, timed by its <see cref="DeviceRun.MedianMs"/>.
/// </summary>
internal sealed class Attention16Run : IDisposable
{
    private readonly StickBreakingAttention attention;
    private readonly bool bf16;
    private readonly MemoryBuffer1D<ushort, Stride1D.Dense> q, k, v, o, dO, dq, dk, dv;
    private readonly MemoryBuffer1D<float, Stride1D.Dense> rem, logRem, dRem;
    private readonly StickBreakingWorkspace workspace;

    private readonly StickBreakingOptions? options;

    public Attention16Run(StickBreakingAttention attention, AttentionShape shape, AttentionInputs inputs, bool bf16,
        StickBreakingOptions? options = null)
    {
        this.options = options;
        this.attention = attention;
        this.bf16 = bf16;
        Shape = shape;
        var acc = attention.Accelerator;
        ushort[] Bits(float[] x) => bf16
            ? x.Select(f => ((BFloat16)f).Bits).ToArray()
            : x.Select(f => BitConverter.HalfToUInt16Bits((System.Half)f)).ToArray();
        q = acc.Allocate1D(Bits(inputs.Q));
        k = acc.Allocate1D(Bits(inputs.K));
        v = acc.Allocate1D(Bits(inputs.V));
        o = acc.Allocate1D<ushort>(shape.TensorLength);
        rem = acc.Allocate1D<float>(shape.RowCount);
        logRem = acc.Allocate1D<float>(shape.RowCount);
        dO = acc.Allocate1D(Bits(inputs.DO));
        dRem = acc.Allocate1D(inputs.DRem);
        dq = acc.Allocate1D<ushort>(shape.TensorLength);
        dk = acc.Allocate1D<ushort>(shape.TensorLength);
        dv = acc.Allocate1D<ushort>(shape.TensorLength);
        workspace = new StickBreakingWorkspace(acc, shape);
    }

    public AttentionShape Shape { get; }

    /// <summary>The storage type's name as the peers' JSON writes it.</summary>
    public string DType => bf16 ? "bfloat16" : "float16";

    public void Forward(bool training)
    {
        var stream = attention.Accelerator.DefaultStream;
        var w = training ? workspace : null;
        if (bf16)
            attention.Forward(stream, Shape, q.View.AsContiguous().Cast<BFloat16>(), k.View.AsContiguous().Cast<BFloat16>(), v.View.AsContiguous().Cast<BFloat16>(),
                o.View.AsContiguous().Cast<BFloat16>(), rem.View, logRem.View, options, w);
        else
            attention.Forward(stream, Shape, q.View.AsContiguous().Cast<System.Half>(), k.View.AsContiguous().Cast<System.Half>(), v.View.AsContiguous().Cast<System.Half>(),
                o.View.AsContiguous().Cast<System.Half>(), rem.View, logRem.View, options, w);
    }

    /// <summary>The backward; the last <see cref="Forward"/> must have been a training one (it filled the workspace).</summary>
    public void Backward()
    {
        var stream = attention.Accelerator.DefaultStream;
        if (bf16)
            attention.Backward(stream, Shape, As<BFloat16>(q), As<BFloat16>(k), As<BFloat16>(v), As<BFloat16>(dO), dRem.View, logRem.View,
                workspace, As<BFloat16>(dq), As<BFloat16>(dk), As<BFloat16>(dv));
        else
            attention.Backward(stream, Shape, As<System.Half>(q), As<System.Half>(k), As<System.Half>(v), As<System.Half>(dO), dRem.View,
                logRem.View, workspace, As<System.Half>(dq), As<System.Half>(dk), As<System.Half>(dv));
    }

    private static ArrayView<T> As<T>(MemoryBuffer1D<ushort, Stride1D.Dense> buffer)
        where T : unmanaged => buffer.View.AsContiguous().Cast<T>();

    public void Dispose()
    {
        workspace.Dispose();
        foreach (var b in new MemoryBuffer[] { q, k, v, o, rem, logRem, dO, dRem, dq, dk, dv })
            b.Dispose();
    }
}
