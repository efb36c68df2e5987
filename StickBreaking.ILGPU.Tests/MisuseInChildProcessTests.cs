using System;
using System.Collections.Generic;
using System.Linq;
using NUnit.Framework;
using StickBreaking.ILGPU.Tests.Infrastructure;

namespace StickBreaking.ILGPU.Tests;

/// <summary>
/// Misuse that could end the process, run in child processes (<see cref="ChildProcess"/>): each case must be an
/// <see cref="ObjectDisposedException"/> naming the argument, and a correct call on the same instance afterwards
/// must give the right result. A case that kills its child fails alone, with the exit code.
/// </summary>
public sealed class MisuseInChildProcessTests(string backend) : BackendFixture(backend)
{
    private Dictionary<string, ChildProcess.Outcome>? outcomes;

    private static IEnumerable<TestCaseData> Cases() =>
        MisuseCases.All.Select(c => new TestCaseData(c.Name, c.Exception, c.Param).SetName($"{{m}}({c.Name})"));

    [TestCaseSource(nameof(Cases))]
    public void MisuseIsAnExceptionAndTheInstanceStaysUsable(string name, Type exception, string param)
    {
        _ = Accelerator;   // the backend is present (else the fixture skipped)
        outcomes ??= ChildProcess.Run(Backend, MisuseCases.All.Select(c => c.Name).ToList());
        var outcome = outcomes[name];
        Assert.That(outcome.Died, Is.Null, "the case ended the child process");
        TestContext.Out.WriteLine($"{outcome.Type}: {outcome.Message}");
        Assert.Multiple(() =>
        {
            Assert.That(outcome.Type, Is.EqualTo(exception.FullName), $"exception ({outcome.Message})");
            Assert.That(outcome.Param, Is.EqualTo(param), "the argument named");
            Assert.That(outcome.Message, Does.Contain("accelerator #"), "the message says which accelerator");
            Assert.That(outcome.After, Is.EqualTo("ok"), "a correct call on the same instance afterwards");
        });
    }
}
