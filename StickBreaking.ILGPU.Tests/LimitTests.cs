using System;
using System.IO;
using NUnit.Framework;
using StickBreaking.ILGPU.Launch;
using StickBreaking.ILGPU.Tests.Infrastructure;
using StickBreaking.ILGPU.Tests.Reference;

namespace StickBreaking.ILGPU.Tests;

/// <summary>Sizes in 64-bit arithmetic, with each limit named in its refusal (no accelerator needed).</summary>
public sealed class ShapeArithmeticTests
{
    [Test]
    public void HugeShapesDoNotWrap()
    {
        var shape = new AttentionShape(1 << 30, 1 << 30, 16, 1);   // 2^64 floats: wrapped to 0 in 64-bit before
        Assert.Throws<OverflowException>(() => _ = shape.TensorLength);
        Assert.That(shape.HeadCount, Is.EqualTo(1L << 60));
        var ex = Assert.Throws<ArgumentOutOfRangeException>(() => shape.Validate("shape"));
        Assert.That(ex!.Message, Does.Contain("18446744073709551616").And.Contain("2147483647"));
    }

    [Test]
    public void RowCountOfAnAbsurdShapeThrowsRatherThanWraps() =>
        Assert.Throws<OverflowException>(() => _ = new AttentionShape(int.MaxValue, int.MaxValue, int.MaxValue, 1).RowCount);

    [Test]
    public void LengthAboveTheLimitIsRefusedNamingIt()
    {
        var ex = Assert.Throws<ArgumentOutOfRangeException>(() => new AttentionShape(1, 1, int.MaxValue, 1).Validate("shape"));
        Assert.That(ex!.ParamName, Is.EqualTo("shape"));
        Assert.That(ex.Message, Does.Contain("Length").And.Contain($"{AttentionShape.MaxLength}"));
    }

    [Test]
    public void TooManyFloatsPerTensorIsRefusedNamingTheLimit()
    {
        var ex = Assert.Throws<ArgumentOutOfRangeException>(() => new AttentionShape(64, 64, 4096, 128).Validate("shape"));
        Assert.That(ex!.Message, Does.Contain("2147483647").And.Contain("MaxTensorLength"));
    }

    /// <summary>
    /// The tensor-core kernels address a head's rows with 32-bit offsets in 16-byte pieces: a fused [B, T, 3, H, D] layout of
    /// 32 heads of 128 at T = 131072 passes; a token stride that spans more than 2^31 pieces per head (a view over 32 GiB) is refused,
    /// naming the argument.
    /// </summary>
    [Test]
    public void HeadOffsetsBeyond32BitsAreRefusedNamingTheArgument()
    {
        Assert.DoesNotThrow(() => Guards.HeadOffsets(new TensorLayout(0, 128, 3 * 32 * 128), 131072, 2, "k"));
        var ex = Assert.Throws<ArgumentException>(() => Guards.HeadOffsets(new TensorLayout(0, 128, 1L << 20), 1 << 15, 2, "k"));
        Assert.That(ex!.ParamName, Is.EqualTo("k"));
        Assert.That(ex.Message, Does.Contain("32-bit offsets"));
        Assert.DoesNotThrow(() => Guards.HeadOffsets(new TensorLayout(0, 128, 1L << 20), (1 << 14) - 65, 2, "k"));
    }

    [TestCase(1, 1, AttentionShape.MaxLength, 1)]
    [TestCase(int.MaxValue, 1, 1, 1)]
    [TestCase(1, 15, 1 << 20, 128)]
    [TestCase(1, 1, (1 << 24) - 1, 128)]
    public void WorkspaceBytesArePositiveAndExact(int b, int h, int t, int d)
    {
        var shape = new AttentionShape(b, h, t, d);
        long tiles = (t + 31L) / 32;
        Assert.That(StickBreakingWorkspace.BytesFor(shape), Is.EqualTo(8L * b * h * t * tiles).And.Positive);
    }

    [TestCase(0, 1, 1, 1)]
    [TestCase(1, 1, int.MaxValue, 1)]
    [TestCase(1 << 30, 1 << 30, 16, 1)]
    public void WorkspaceBytesOfAnInvalidShapeAreRefused(int b, int h, int t, int d) =>
        Assert.Throws<ArgumentOutOfRangeException>(() => StickBreakingWorkspace.BytesFor(new AttentionShape(b, h, t, d)));

    /// <summary>docs/limits.md's table of the largest T is <see cref="LimitsTable.Markdown"/>'s output.</summary>
    [Test]
    public void DocumentedLargestLengthsMatchTheFormulas()
    {
        string table = LimitsTable.Markdown();
        TestContext.Out.WriteLine(table);
        var dir = new DirectoryInfo(TestContext.CurrentContext.TestDirectory);
        while (dir is not null && !File.Exists(Path.Combine(dir.FullName, "docs", "limits.md")))
            dir = dir.Parent;
        if (dir is null)
            Assert.Ignore("docs/limits.md is not above the test directory (a published copy)");
        string doc = File.ReadAllText(Path.Combine(dir.FullName, "docs", "limits.md")).Replace("\r\n", "\n");
        Assert.That(doc, Does.Contain(table));
    }
}

/// <summary>Grid and memory limits on each backend: refused before anything is allocated, the limit named.</summary>
public sealed class LimitTests(string backend) : BackendFixture(backend)
{
    private static readonly AttentionShape Small = MisuseCases.Shape;

    [TearDown]
    public void InstanceStillUsable()
    {
        Guards.MemoryBytesOverride = null;
        Assert.That(MisuseCases.CorrectCall(Accelerator, Attention), Is.EqualTo("ok"));
    }

    /// <summary>A T above what the grid's Y dimension holds: the message gives the longest T here and says splitting does not help.</summary>
    [Test]
    public void LengthAboveTheGridIsRefusedNamingTheLongestLength()
    {
        int rows = Attention.ForwardRowsPerGroup(1);
        long longest = Guards.MaxLength(Accelerator, rows);
        if (longest >= AttentionShape.MaxLength)
        {
            // This grid holds every T the shape admits: the first T refused is the shape's own limit.
            var beyond = new AttentionShape(1, 1, AttentionShape.MaxLength + 1, 1);
            Assert.That(Assert.Throws<ArgumentOutOfRangeException>(() => Attention.Forward(ReadOnlySpan<float>.Empty, ReadOnlySpan<float>.Empty, ReadOnlySpan<float>.Empty, beyond))!.Message,
                Does.Contain($"{AttentionShape.MaxLength}"));
            return;
        }
        var shape = new AttentionShape(1, 1, (int)longest + 1, 1);
        var ex = Assert.Throws<ArgumentOutOfRangeException>(() => Attention.Forward(ReadOnlySpan<float>.Empty, ReadOnlySpan<float>.Empty, ReadOnlySpan<float>.Empty, shape));
        TestContext.Out.WriteLine(ex!.Message);
        Assert.That(ex.ParamName, Is.EqualTo("shape"));
        Assert.That(ex.Message, Does.Contain($"{Accelerator.MaxGridSize.Y}").And.Contain($"is {longest}")
            .And.Contain("does not shorten T").And.Contain("accelerator #"));
        var backward = Assert.Throws<ArgumentOutOfRangeException>(() => Attention.Backward(Accelerator.DefaultStream, shape,
            default(global::ILGPU.ArrayView<float>), default, default, default, default, default, null!, default, default, default));
        Assert.That(backward!.Message, Does.Contain("grid Y"), "the device level checks the grid before the views");
    }

    /// <summary>A workspace larger than the accelerator's memory: refused with both byte counts, nothing allocated.</summary>
    [Test]
    public void WorkspaceLargerThanTheAcceleratorIsRefusedWithByteCounts()
    {
        var capacity = new AttentionShape(1, 1, 1 << 21, 1);   // 2^40 bytes = 1 TiB
        long need = StickBreakingWorkspace.BytesFor(capacity), has = Guards.MemoryBytes(Accelerator);
        TestContext.Out.WriteLine($"{Accelerator.Name}: MemorySize {Accelerator.MemorySize}, checked against {has}");
        if (need <= has)
            Assert.Ignore($"{Accelerator.Name} has {has} bytes, more than the {need} this test asks for");
        var ex = Assert.Throws<ArgumentOutOfRangeException>(() => new StickBreakingWorkspace(Accelerator, capacity));
        TestContext.Out.WriteLine(ex!.Message);
        Assert.That(ex.ParamName, Is.EqualTo("capacity"));
        Assert.That(ex.Message, Does.Contain($"{need} bytes").And.Contain($"{has} bytes").And.Contain(capacity.ToString()));
    }

    /// <summary>Host-level calls check what they will allocate (inputs, outputs, workspace) before allocating.</summary>
    [Test]
    public void HostLevelCallsCheckTheirMemoryFirst()
    {
        var x = TestInputs.Standard(Small.Batch, Small.Heads, Small.Length, Small.HeadDim, seed: 1);
        long forward = Guards.HostForwardBytes(Small), backward = Guards.HostBackwardBytes(Small);
        Assert.That(forward, Is.EqualTo(4 * (4 * Small.TensorLength + 2 * Small.RowCount)));
        Assert.That(backward, Is.EqualTo(4 * (8 * Small.TensorLength + 3 * Small.RowCount) + StickBreakingWorkspace.BytesFor(Small)));
        Guards.MemoryBytesOverride = backward - 1;   // room for the forward, not for the backward
        Assert.DoesNotThrow(() => Attention.Forward(x.Q, x.K, x.V, Small));
        var ex = Assert.Throws<ArgumentOutOfRangeException>(() => Attention.Backward(x.Q, x.K, x.V, x.DO, x.DRem, Small));
        Assert.That(ex!.ParamName, Is.EqualTo("shape"));
        Assert.That(ex.Message, Does.Contain($"{backward} bytes").And.Contain($"{backward - 1} bytes").And.Contain("Backward"));
        Guards.MemoryBytesOverride = forward - 1;
        Assert.That(Assert.Throws<ArgumentOutOfRangeException>(() => Attention.Forward(x.Q, x.K, x.V, Small))!.Message,
            Does.Contain($"{forward} bytes"));
    }
}
