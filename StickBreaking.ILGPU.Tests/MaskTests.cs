using System;
using System.Collections.Generic;
using System.Linq;
using System.Text;
using ILGPU;
using ILGPU.Runtime;
using ILGPU.Runtime.CPU;
using NUnit.Framework;
using StickBreaking.ILGPU.Launch;
using StickBreaking.ILGPU.Tests.Infrastructure;
using StickBreaking.ILGPU.Tests.Reference;
using static StickBreaking.ILGPU.Tests.Rounding;

namespace StickBreaking.ILGPU.Tests;

/// <summary>
/// Masks select, never multiply (docs/math.md, Masks): a NaN or an infinity where the math cannot see it
/// (a key after the row's visible range, another query's q, dO or dRem, the tail of the sequence, a key no
/// row sees) leaves every output that does not depend on it bitwise unchanged, on every backend. The rule of
/// what depends on what is <see cref="MaskDependencies"/>; <see cref="MaskRuleTests"/> checks it on the float64
/// reference.
/// </summary>
public sealed class MaskTests(string backend) : BackendFixture(backend)
{
    private readonly Dictionary<(AttentionShape, bool), MaskRun.Outputs> baselines = [];

    [TestCaseSource(typeof(MaskRun), nameof(MaskRun.Scenarios))]
    public void PoisonReachesOnlyWhatDependsOnIt(MaskScenario scenario) =>
        MaskRun.Check(Accelerator, Attention, scenario, baselines);
}

/// <summary>The same scenarios on the CUDA kernels' code, run by the CPU accelerator (as <see cref="CudaKernelOnCpuTests"/>).</summary>
[TestFixture]
public sealed class CudaKernelMaskTests : CudaCodeOnCpuFixture
{
    private readonly Dictionary<(AttentionShape, bool), MaskRun.Outputs> baselines = [];

    [TestCaseSource(typeof(MaskRun), nameof(MaskRun.AlternateScenarios))]
    public void PoisonReachesOnlyWhatDependsOnIt(MaskScenario scenario) =>
        MaskRun.Check(Accelerator, Attention, scenario, baselines);
}

/// <summary>
/// The same rule for fp16 and bf16 storage through the public 16-bit API on every backend: the tensor-core kernels
/// where they serve (CUDA), the portable 16-bit kernels elsewhere. The scenarios run at D = 64 (a head dimension the
/// tensor-core kernels serve), one visibility each, alternating, bf16 and fp16 in turn.
/// </summary>
public sealed class Mask16Tests(string backend) : BackendFixture(backend)
{
    private readonly Dictionary<(AttentionShape, bool), MaskRun.Outputs> baselines = [];

    [TestCaseSource(typeof(MaskRun), nameof(MaskRun.AlternateScenarios16))]
    public void PoisonReachesOnlyWhatDependsOnIt(MaskScenario scenario) =>
        MaskRun.Check(Accelerator, Attention, scenario, baselines);
}

/// <summary>The 16-bit scenarios on the tensor-core kernels' code, run by the CPU accelerator with the mma emulated.</summary>
[TestFixture]
public sealed class TensorCoreMaskTests : CudaCodeOnCpuFixture
{
    private readonly Dictionary<(AttentionShape, bool), MaskRun.Outputs> baselines = [];

    [TestCaseSource(typeof(MaskRun), nameof(MaskRun.EmulatedScenarios16))]
    public void PoisonReachesOnlyWhatDependsOnIt(MaskScenario scenario)
    {
        Assert.That(Attention.UsesTensorCores && Attention.UsesTensorCoreBackward, Is.True, "the tensor-core code runs");
        MaskRun.Check(Accelerator, Attention, scenario, baselines);
    }
}

/// <summary>The dependency rule of <see cref="MaskDependencies"/> against the float64 reference.</summary>
[TestFixture]
public sealed class MaskRuleTests
{
    /// <summary>
    /// Every input element in turn moved by a finite amount: each output the rule calls independent of it is
    /// exactly unchanged in the float64 reference (where 0 times a finite value is 0). This checks the rule,
    /// not the kernels: an output it wrongly called independent would change.
    /// </summary>
    [TestCase(false, 2, 2)]
    [TestCase(true, 2, 2)]
    [TestCase(false, 4, 2)]   // grouped heads: k, v and dk, dv of 2 key/value heads, 2 query heads each
    [TestCase(true, 3, 1)]
    public void RuleHoldsOnTheReference(bool attendCurrent, int heads, int keyValueHeads)
    {
        var shape = new AttentionShape(1, heads, 11, 3) { KeyValueHeads = keyValueHeads };
        var x = TestInputs.Standard(shape.Batch, shape.Heads, shape.Length, shape.HeadDim, seed: 17);
        x = x with { K = x.K[..(int)shape.KeyValueTensorLength], V = x.V[..(int)shape.KeyValueTensorLength] };
        var baseline = Reference(x, shape, attendCurrent);
        int independent = 0, dependent = 0;
        foreach (MaskInput input in Enum.GetValues<MaskInput>())
        {
            int columns = input == MaskInput.DRem ? 1 : shape.HeadDim;
            long inputHeads = input is MaskInput.K or MaskInput.V ? shape.KeyValueHeadCount : shape.HeadCount;
            for (int head = 0; head < inputHeads; head++)
                for (int token = 0; token < shape.Length; token++)
                    for (int column = 0; column < columns; column++)
                    {
                        var poison = new Poison(input, head, token, column, float.NaN);
                        var moved = Reference(MaskRun.Apply(x, shape, [poison], (_, old) => old + 0.375f), shape, attendCurrent);
                        foreach (MaskOutput output in Enum.GetValues<MaskOutput>())
                        {
                            MaskRun.ForEachElement(output, shape, (h, t, d, at) =>
                            {
                                if (MaskDependencies.MayDepend(output, h, t, d, poison, shape.Length, attendCurrent, shape.GroupSize))
                                {
                                    dependent++;
                                    return;
                                }
                                independent++;
                                if (moved[(int)output][at] != baseline[(int)output][at])
                                    Assert.Fail($"{output}[{h},{t},{d}] changed when {input}[{head},{token},{column}] moved: " +
                                        $"{baseline[(int)output][at]:R} -> {moved[(int)output][at]:R}");
                            });
                        }
                    }
        }
        TestContext.Out.WriteLine($"{independent} independent (unchanged) and {dependent} possibly dependent output elements");
        Assert.That(independent, Is.GreaterThan(dependent / 4), "the rule leaves something to check");
    }

    /// <summary>
    /// The float64 reference, grouped heads by their definition: each query head reads its key/value head's k and v (repeated
    /// per query head), and a key/value head's dk and dv are the sums over its query heads, in head order.
    /// </summary>
    private static double[][] Reference(AttentionInputs x, AttentionShape shape, bool attendCurrent)
    {
        double scale = 1.0 / Math.Sqrt(shape.HeadDim);
        int rows = shape.Length * shape.HeadDim, group = shape.GroupSize;
        double[] Repeat(double[] kv)
        {
            var r = new double[shape.TensorLength];
            for (int h = 0; h < shape.HeadCount; h++)
                Array.Copy(kv, (long)(h / group) * rows, r, (long)h * rows, rows);
            return r;
        }
        double[] SumGroups(double[] g)
        {
            var r = new double[shape.KeyValueTensorLength];
            for (int h = 0; h < shape.HeadCount; h++)
                for (int e = 0; e < rows; e++)
                    r[(long)(h / group) * rows + e] += g[(long)h * rows + e];
            return r;
        }
        double[] q = TestInputs.ToDouble(x.Q), k = Repeat(TestInputs.ToDouble(x.K)), v = Repeat(TestInputs.ToDouble(x.V));
        var f = Float64Reference.Forward(q, k, v, shape.Batch, shape.Heads, shape.Length, shape.HeadDim, scale, attendCurrent);
        var g = Float64Reference.Backward(q, k, v, TestInputs.ToDouble(x.DO), TestInputs.ToDouble(x.DRem),
            shape.Batch, shape.Heads, shape.Length, shape.HeadDim, scale, attendCurrent);
        return [f.O, f.Rem, f.LogRem, g.DQ, SumGroups(g.DK), SumGroups(g.DV)];   // in MaskOutput order
    }
}

/// <summary>One poisoned run: the shape, the visibility, the poisoned input elements and the storage type.</summary>
public sealed record MaskScenario(string Name, AttentionShape Shape, bool AttendCurrent, Poison[] Poisons, StorageType Storage = StorageType.Fp32)
{
    public override string ToString() => Name;
}

/// <summary>Runs a scenario against its unpoisoned baseline and compares every output bitwise where the rule allows.</summary>
internal static class MaskRun
{
    /// <summary>All outputs of one forward and backward, in <see cref="MaskOutput"/> order (16-bit ones widened to fp32).</summary>
    internal sealed record Outputs(float[][] All, StorageType Storage);

    private static readonly float[] Values = [float.NaN, float.PositiveInfinity, float.NegativeInfinity];

    // Shapes that cross the tiles' edges: the issue's report (2 heads, 64 tokens: one 64-row CUDA tile, two
    // 32-row portable blocks), 70 tokens (a second, partial 64-tile), 100 tokens with D = 20 (a partial
    // 16-column chunk of the portable kernels, partial 4-column steps of the CUDA kernels).
    private static readonly AttentionShape Report = new(1, 2, 64, 16);
    private static readonly AttentionShape T70 = new(1, 1, 70, 16);
    private static readonly AttentionShape T100 = new(1, 1, 100, 20);

    /// <summary>
    /// Eleven scenarios per visibility. The poison value rotates through NaN, +Inf and -Inf with the scenario
    /// (rather than every scenario with every value, which took minutes on the CPU accelerator): each scenario
    /// runs with two of the three values over the two visibilities, and those with several poisoned elements
    /// mix all three.
    /// </summary>
    public static IEnumerable<TestCaseData> Scenarios() => Generate(alternate: false);

    /// <summary>
    /// The CUDA kernels' code on the CPU accelerator (256 OS threads a group) is about ten times slower than the
    /// portable kernels there: each scenario runs under one visibility only, alternating, and the report's under
    /// both. On a CUDA device the per-backend fixture runs them all on these kernels.
    /// </summary>
    public static IEnumerable<TestCaseData> AlternateScenarios() => Generate(alternate: true);

    /// <summary>
    /// The alternate scenarios in 16-bit storage at D = 64 (the poisoned columns are all below 20), bf16 and fp16 in
    /// turn: the tensor-core kernels serve D = 64 on CUDA.
    /// </summary>
    public static IEnumerable<TestCaseData> AlternateScenarios16()
    {
        int n = 0;
        foreach (var data in Generate(alternate: true))
        {
            var s = (MaskScenario)data.Arguments[0]!;
            var storage = n++ % 2 == 0 ? StorageType.Bf16 : StorageType.Fp16;
            var wide = s with
            {
                Shape = new AttentionShape(s.Shape.Batch, s.Shape.Heads, s.Shape.Length, 64), Storage = storage,
                Name = $"{storage} {s.Name.Replace($"x{s.Shape.HeadDim},", "x64,", StringComparison.Ordinal)}",
            };
            yield return new TestCaseData(wide).SetArgDisplayNames(wide.Name);
        }
        var strict = Grouped().First(g => !g.AttendCurrent);
        yield return new TestCaseData(strict).SetArgDisplayNames(strict.Name);
    }

    /// <summary>
    /// Grouped heads, 4 query heads over 2 key/value heads, T = 70, D = 64: bf16 with the default visibility (in
    /// <see cref="AlternateScenarios16"/>) and fp16 with AttendCurrent (in <see cref="EmulatedScenarios16"/>). Poisoned: a later key's
    /// k and v of key/value head 1 (read by query heads 2 and 3 only), q of row 33 of query head 1 (whose dk, dv go to key/value
    /// head 0, summed with query head 0's), dO and dRem of row 62 of query head 2. The dk/dv passes sum each group's query
    /// heads into one accumulator: the rule checks that a poison in one query head reaches only what the group's sum
    /// may take from it, and nothing of the other group.
    /// </summary>
    private static IEnumerable<MaskScenario> Grouped()
    {
        var shape = new AttentionShape(1, 4, 70, 64) { KeyValueHeads = 2 };
        int n = 0;
        foreach (bool attendCurrent in new[] { false, true })
        {
            var storage = attendCurrent ? StorageType.Fp16 : StorageType.Bf16;
            Poison[] poisons =
            [
                new(MaskInput.K, 1, 66, 2, Value(n)), new(MaskInput.V, 1, 66, 9, Value(n + 1)),
                new(MaskInput.Q, 1, 33, 5, Value(n + 2)),
                new(MaskInput.DO, 2, 62, 4, Value(n)), new(MaskInput.DRem, 2, 62, 0, Value(n + 1)),
            ];
            n++;
            string tag = float.IsNaN(poisons[0].Value) ? "NaN" : poisons[0].Value > 0 ? "+Inf" : "-Inf";
            yield return new MaskScenario($"{storage} grouped heads 4 over 2: k, v of key 66, q of row 33, dO and dRem of row 62, " +
                $"70x64, {(attendCurrent ? "AttendCurrent" : "Strict")}, {tag}", shape, attendCurrent, poisons, storage);
        }
    }

    /// <summary>
    /// One of <see cref="AlternateScenarios16"/> for the tensor-core code on the CPU accelerator, where the mma is an
    /// emulation run thread by thread (the whole set there takes minutes): a later key's k and v (in the diagonal tile
    /// of some rows, an earlier tile of others), and the fp16 grouped-heads scenario; every scenario runs on the real kernels in <see cref="Mask16Tests"/>
    /// on a CUDA device.
    /// </summary>
    public static IEnumerable<TestCaseData> EmulatedScenarios16()
    {
        foreach (var data in AlternateScenarios16())
        {
            if (((MaskScenario)data.Arguments[0]!).Name.Contains("later key 66", StringComparison.Ordinal))
                yield return data;
        }
        var current = Grouped().First(g => g.AttendCurrent);
        yield return new TestCaseData(current).SetArgDisplayNames(current.Name);
    }

    private static IEnumerable<TestCaseData> Generate(bool alternate)
    {
        foreach (bool attendCurrent in new[] { false, true })
        {
            string visibility = attendCurrent ? "AttendCurrent" : "Strict";
            int shift = attendCurrent ? 1 : 0;
            var list = new List<Func<int, MaskScenario>>
            {
                // (a) a key after the rows that cannot see it: v of key 40 (the report), k and v of a key inside a
                // tile (47) and of a key in the partial last tile (66).
                n => new("report: v of key 40", Report, attendCurrent, [new(MaskInput.V, 0, 40, 5, Value(n))]),
                n => new("later key 66", T70, attendCurrent, [new(MaskInput.K, 0, 66, 2, Value(n)), new(MaskInput.V, 0, 66, 9, Value(n + 1))]),
                n => new("later key 47", T100, attendCurrent, [new(MaskInput.K, 0, 47, 19, Value(n)), new(MaskInput.V, 0, 47, 0, Value(n + 2))]),
                // (b) one query's own inputs, each alone and all together.
                n => new("q of row 33", T70, attendCurrent, [new(MaskInput.Q, 0, 33, 1, Value(n))]),
                n => new("dO of row 62", T100, attendCurrent, [new(MaskInput.DO, 0, 62, 4, Value(n))]),
                n => new("dRem of row 20, head 1", Report, attendCurrent, [new(MaskInput.DRem, 1, 20, 0, Value(n))]),
                n => new("q, dO, dRem of row 95", T100, attendCurrent,
                    [new(MaskInput.Q, 0, 95, 17, Value(n)), new(MaskInput.DO, 0, 95, 3, Value(n + 1)), new(MaskInput.DRem, 0, 95, 0, Value(n + 2))]),
                // (c) the tail as padding: every input of the tokens from L on.
                n => Padding(T70, attendCurrent, 50, n),
                n => Padding(Report, attendCurrent, 41, n),
                // (d) the last key (no row sees it under the default visibility) and row 0 (sees no key then).
                n => Unseen(T100, attendCurrent, n),
                n => Unseen(Report, attendCurrent, n),
            };
            for (int i = 0; i < list.Count; i++)
            {
                if (alternate && i > 0 && i % 2 != shift)
                    continue;
                var scenario = list[i](i + shift);
                float first = scenario.Poisons[0].Value;
                string tag = float.IsNaN(first) ? "NaN" : first > 0 ? "+Inf" : "-Inf";
                var named = scenario with { Name = $"{scenario.Name}, {scenario.Shape.Length}x{scenario.Shape.HeadDim}, {visibility}, {tag}" };
                yield return new TestCaseData(named).SetArgDisplayNames(named.Name);
            }
        }
    }

    private static float Value(int n) => Values[n % Values.Length];

    /// <summary>
    /// A real sequence of <paramref name="realLength"/> tokens inside the tensor, the tokens from it on being
    /// padding: one element of each of q, k, v, dO and dRem of every padding token poisoned. Rows before it see
    /// keys before it only, so by the rule their o, rem, LogRem and dq are bitwise unchanged; the dk and dv of the
    /// real keys are not checked (the padding rows see them, so they do depend on the padding rows' q and dO: in
    /// this API every token is real).
    /// </summary>
    private static MaskScenario Padding(AttentionShape shape, bool attendCurrent, int realLength, int n)
    {
        var poisons = new List<Poison>();
        int d = shape.HeadDim;
        for (int head = 0; head < shape.HeadCount; head++)
            for (int t = realLength; t < shape.Length; t++)
            {
                poisons.Add(new(MaskInput.Q, head, t, t % d, Value(n + t)));
                poisons.Add(new(MaskInput.K, head, t, (t + 1) % d, Value(n + t + 1)));
                poisons.Add(new(MaskInput.V, head, t, (t + 2) % d, Value(n + t + 2)));
                poisons.Add(new(MaskInput.DO, head, t, (t + 3) % d, Value(n + t)));
                poisons.Add(new(MaskInput.DRem, head, t, 0, Value(n + t + 1)));
            }
        return new MaskScenario($"padding from {realLength}", shape, attendCurrent, [.. poisons]);
    }

    /// <summary>
    /// k and v of the last key and q, dO, dRem of row 0 poisoned. Under the default visibility no row sees the
    /// last key and row 0 sees no key, so nothing may change: dk and dv of the last key stay exactly 0, and row 0
    /// keeps o = 0, rem = 1, LogRem = 0, dq = 0. With AttendCurrent they are ordinary inputs of their own row.
    /// </summary>
    private static MaskScenario Unseen(AttentionShape shape, bool attendCurrent, int n)
    {
        int last = shape.Length - 1;
        return new MaskScenario("last key and row 0", shape, attendCurrent,
        [
            new(MaskInput.K, 0, last, 0, Value(n)), new(MaskInput.V, 0, last, shape.HeadDim - 1, Value(n + 1)),
            new(MaskInput.Q, 0, 0, 1, Value(n + 2)), new(MaskInput.DO, 0, 0, 2, Value(n)), new(MaskInput.DRem, 0, 0, 0, Value(n + 1)),
        ]);
    }

    /// <summary>The inputs with the poisoned elements replaced by <paramref name="replace"/>(poison, old value).</summary>
    public static AttentionInputs Apply(AttentionInputs x, AttentionShape shape, IEnumerable<Poison> poisons, Func<Poison, float, float> replace)
    {
        var y = new AttentionInputs((float[])x.Q.Clone(), (float[])x.K.Clone(), (float[])x.V.Clone(),
            (float[])x.DO.Clone(), (float[])x.DRem.Clone());
        foreach (var p in poisons)
        {
            float[] target = p.Input switch
            {
                MaskInput.Q => y.Q,
                MaskInput.K => y.K,
                MaskInput.V => y.V,
                MaskInput.DO => y.DO,
                _ => y.DRem,
            };
            long at = p.Input == MaskInput.DRem
                ? (long)p.Head * shape.Length + p.Token
                : ((long)p.Head * shape.Length + p.Token) * shape.HeadDim + p.Column;
            target[at] = replace(p, target[at]);
        }
        return y;
    }

    /// <summary>Calls <paramref name="visit"/>(head, token, column, index) for every element of an output (column 0 for Rem and LogRem).</summary>
    public static void ForEachElement(MaskOutput output, AttentionShape shape, Action<int, int, int, int> visit)
    {
        bool perRow = output is MaskOutput.Rem or MaskOutput.LogRem;
        int columns = perRow ? 1 : shape.HeadDim;
        long heads = output is MaskOutput.DK or MaskOutput.DV ? shape.KeyValueHeadCount : shape.HeadCount;
        int at = 0;
        for (int head = 0; head < heads; head++)
            for (int token = 0; token < shape.Length; token++)
                for (int column = 0; column < columns; column++)
                    visit(head, token, column, at++);
    }

    public static void Check(Accelerator accelerator, StickBreakingAttention attention, MaskScenario s,
        Dictionary<(AttentionShape, bool), Outputs> baselines)
    {
        var options = new StickBreakingOptions { AttendCurrent = s.AttendCurrent };
        var x = TestInputs.Standard(s.Shape.Batch, s.Shape.Heads, s.Shape.Length, s.Shape.HeadDim, seed: 3 * s.Shape.Length + s.Shape.HeadDim);
        if (s.Shape.KeyValueHeads != s.Shape.Heads)   // k and v of the key/value heads only
            x = x with { K = x.K[..(int)s.Shape.KeyValueTensorLength], V = x.V[..(int)s.Shape.KeyValueTensorLength] };
        if (!baselines.TryGetValue((s.Shape, s.AttendCurrent), out var baseline) || baseline.Storage != s.Storage)
        {
            baseline = Run(accelerator, attention, s.Shape, x, options, s.Storage);
            baselines[(s.Shape, s.AttendCurrent)] = baseline;
        }
        var poisoned = Run(accelerator, attention, s.Shape, Apply(x, s.Shape, s.Poisons, (p, _) => p.Value), options, s.Storage);

        var failures = new StringBuilder();
        int leaks = 0, checkedCount = 0, dependents = 0, reached = 0;
        void Fail(string message)
        {
            if (++leaks <= 20)
                failures.AppendLine(message);
        }
        foreach (MaskOutput output in Enum.GetValues<MaskOutput>())
        {
            float[] before = baseline.All[(int)output], after = poisoned.All[(int)output];
            ForEachElement(output, s.Shape, (h, t, d, at) =>
            {
                bool differs = BitConverter.SingleToInt32Bits(before[at]) != BitConverter.SingleToInt32Bits(after[at]);
                if (MaskDependencies.MayDepend(output, h, t, d, s.Poisons, s.Shape.Length, s.AttendCurrent, s.Shape.GroupSize))
                {
                    dependents++;
                    if (differs)
                        reached++;
                }
                else
                {
                    checkedCount++;
                    if (differs)
                        Fail($"{output}[{h},{t},{d}]: {before[at]:R} -> {after[at]:R}");
                }
                // Exact values where the definition gives them, whatever the inputs.
                float? exact = output switch
                {
                    MaskOutput.O or MaskOutput.LogRem or MaskOutput.DQ when !MaskDependencies.SeesAKey(t, s.AttendCurrent) => 0f,
                    MaskOutput.Rem when !MaskDependencies.SeesAKey(t, s.AttendCurrent) => 1f,
                    MaskOutput.DK or MaskOutput.DV when MaskDependencies.SeenByNoRow(t, s.Shape.Length, s.AttendCurrent) => 0f,
                    _ => null,
                };
                if (exact is float e && after[at] != e)
                    Fail($"{output}[{h},{t},{d}] = {after[at]:R}, the definition gives exactly {e}");
            });
        }
        TestContext.Out.WriteLine($"{s.Name}: {s.Poisons.Length} poisoned inputs; {checkedCount} independent output elements " +
            $"bitwise checked; {reached} of {dependents} possibly dependent ones changed");
        Assert.Multiple(() =>
        {
            Assert.That(leaks, Is.Zero, $"outputs that cannot depend on {string.Join(", ", s.Poisons.Take(5))}" +
                $"{(s.Poisons.Length > 5 ? ", ..." : "")} changed ({leaks}; the first 20):\n{failures}");
            Assert.That(checkedCount, Is.GreaterThan(0), "the scenario leaves outputs to check");
            if (dependents > 0)
                Assert.That(reached, Is.GreaterThan(0), "the poison reached some output that may depend on it (it was applied)");
        });
    }

    private static Outputs Run(Accelerator accelerator, StickBreakingAttention attention, AttentionShape shape,
        AttentionInputs x, StickBreakingOptions options, StorageType storage)
    {
        if (storage == StorageType.Bf16)
        {
            var y = attention.Forward(ToBf16(x.Q), ToBf16(x.K), ToBf16(x.V), shape, options);
            var g = attention.Backward(ToBf16(x.Q), ToBf16(x.K), ToBf16(x.V), ToBf16(x.DO), x.DRem, shape, options);
            return new Outputs([Widen(y.O), y.Rem, y.LogRem, Widen(g.DQ), Widen(g.DK), Widen(g.DV)], storage);
        }
        if (storage == StorageType.Fp16)
        {
            var y = attention.Forward(ToHalf(x.Q), ToHalf(x.K), ToHalf(x.V), shape, options);
            var g = attention.Backward(ToHalf(x.Q), ToHalf(x.K), ToHalf(x.V), ToHalf(x.DO), x.DRem, shape, options);
            return new Outputs([Widen(y.O), y.Rem, y.LogRem, Widen(g.DQ), Widen(g.DK), Widen(g.DV)], storage);
        }
        using var tensors = new DeviceTensors(accelerator, shape, x);
        var stream = accelerator.DefaultStream;
        tensors.Forward(attention, stream, options);
        tensors.Backward(attention, stream);
        stream.Synchronize();
        return new Outputs([tensors.O, tensors.Rem, tensors.LogRem, tensors.DQ, tensors.DK, tensors.DV], storage);
    }
}
