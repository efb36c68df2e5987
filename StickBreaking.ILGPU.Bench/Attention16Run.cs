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
    private readonly System.Collections.Generic.List<MemoryBuffer> buffers = [];
    private readonly ArrayView<ushort> q, k, v, o, dO, dq, dk, dv;
    private readonly MemoryBuffer1D<float, Stride1D.Dense> rem, logRem, dRem;
    private readonly StickBreakingWorkspace workspace;

    private readonly StickBreakingOptions? options;

    /// <summary>
    /// Buffers for <paramref name="shape"/> (its KeyValueHeads included) laid out as <paramref name="options"/>' Layout says:
    /// q, k, v (and dq, dk, dv) as slices of one fused buffer each where the layout is <see cref="AttentionLayout.FusedQkv"/>,
    /// else one buffer per tensor of its layout's span; the inputs' values repeat to fill them (timing only).
    /// </summary>
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
        ArrayView<ushort> Filled(long length, float[]? values)
        {
            var buffer = acc.Allocate1D<ushort>(length);
            buffers.Add(buffer);
            if (values is null)
                return buffer.View;
            var bits = Bits(values);
            var host = new ushort[length];
            for (long i = 0; i < length; i++)
                host[i] = bits[i % bits.Length];
            buffer.CopyFromCPU(host);
            return buffer.View;
        }
        var r = AttentionLayout.Resolve(options?.Layout, shape);
        long kAt = (long)shape.Heads * shape.HeadDim, vAt = kAt + (long)shape.KeyValueHeads * shape.HeadDim;
        if (options?.Layout is { } layout && layout == AttentionLayout.FusedQkv(shape))
        {
            long fused = r.Q.BatchStride * shape.Batch;
            var qkv = Filled(fused, inputs.Q);
            (q, k, v) = (qkv, qkv.SubView(kAt), qkv.SubView(vAt));
            var grads = Filled(fused, null);
            (dq, dk, dv) = (grads, grads.SubView(kAt), grads.SubView(vAt));
        }
        else
        {
            q = Filled(r.QuerySpan(r.Q), inputs.Q);
            k = Filled(r.KeySpan(r.K), inputs.K);
            v = Filled(r.KeySpan(r.V), inputs.V);
            dq = Filled(r.QuerySpan(r.DQ), null);
            dk = Filled(r.KeySpan(r.DK), null);
            dv = Filled(r.KeySpan(r.DV), null);
        }
        o = Filled(r.QuerySpan(r.O), null);
        dO = Filled(r.QuerySpan(r.DO), inputs.DO);
        rem = acc.Allocate1D<float>(shape.RowCount);
        logRem = acc.Allocate1D<float>(shape.RowCount);
        dRem = acc.Allocate1D(inputs.DRem.AsSpan(0, (int)shape.RowCount).ToArray());
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
            attention.Forward(stream, Shape, q.Cast<BFloat16>(), k.Cast<BFloat16>(), v.Cast<BFloat16>(), o.Cast<BFloat16>(),
                rem.View, logRem.View, options, w);
        else
            attention.Forward(stream, Shape, q.Cast<System.Half>(), k.Cast<System.Half>(), v.Cast<System.Half>(), o.Cast<System.Half>(),
                rem.View, logRem.View, options, w);
    }

    /// <summary>The backward; the last <see cref="Forward"/> must have been a training one (it filled the workspace).</summary>
    public void Backward()
    {
        var stream = attention.Accelerator.DefaultStream;
        if (bf16)
            attention.Backward(stream, Shape, q.Cast<BFloat16>(), k.Cast<BFloat16>(), v.Cast<BFloat16>(), dO.Cast<BFloat16>(), dRem.View,
                logRem.View, workspace, dq.Cast<BFloat16>(), dk.Cast<BFloat16>(), dv.Cast<BFloat16>());
        else
            attention.Backward(stream, Shape, q.Cast<System.Half>(), k.Cast<System.Half>(), v.Cast<System.Half>(), dO.Cast<System.Half>(),
                dRem.View, logRem.View, workspace, dq.Cast<System.Half>(), dk.Cast<System.Half>(), dv.Cast<System.Half>());
    }

    public void Dispose()
    {
        workspace.Dispose();
        foreach (var b in buffers)
            b.Dispose();
        foreach (var b in new MemoryBuffer[] { rem, logRem, dRem })
            b.Dispose();
    }
}
