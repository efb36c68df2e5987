using System;
using NUnit.Framework;
using StickBreaking.ILGPU.Tests.Infrastructure;
using StickBreaking.ILGPU.Tests.Reference;

namespace StickBreaking.ILGPU.Tests;

/// <summary>
/// A context built without EnableAlgorithms(): where the backend needs ILGPU.Algorithms for exp and log
/// (CUDA's PTX backend), the constructor says what to add; where it does not, the kernels work.
/// </summary>
public sealed class ContextRequirementTests(string backend) : BackendFixture(backend)
{
    [Test]
    public void ContextWithoutEnableAlgorithms()
    {
        var (context, accelerator, reason) = Backends.Open(Backend, enableAlgorithms: false);
        Assert.That(accelerator, Is.Not.Null, reason);
        using (context)
        using (accelerator)
        {
            if (Backend == Backends.Cuda)
            {
                var ex = Assert.Throws<InvalidOperationException>(() => new StickBreakingAttention(accelerator!));
                Assert.That(ex!.Message, Does.Contain("EnableAlgorithms()"));
                return;
            }
            using var attention = new StickBreakingAttention(accelerator!);
            var shape = new AttentionShape(1, 1, 40, 8);
            var x = TestInputs.Standard(1, 1, 40, 8, seed: 9);
            var output = attention.Forward(x.Q, x.K, x.V, shape);
            var expected = Float64Reference.Forward(TestInputs.ToDouble(x.Q), TestInputs.ToDouble(x.K), TestInputs.ToDouble(x.V),
                1, 1, 40, 8, 1 / Math.Sqrt(8), false);
            Assert.That(Errors.MaxAbs(output.O, expected.O), Is.LessThanOrEqualTo(ForwardTolerance));
        }
    }
}
