using System.Collections.Generic;
using System.Text;
using System.Text.RegularExpressions;

namespace StickBreaking.ILGPU.Launch;

/// <summary>
/// Turns the 4-byte <c>.local</c> operand slots that ILGPU 1.5.3 writes for every operand of inline PTX
/// (<c>CudaAsm.Emit</c>/<c>EmitRef</c>: a store before the instruction, a load after) into 32-bit registers.
/// <para>
/// ptxas does not always promote them itself: the tensor-core forward (80 mma and 48 pair conversions, 848 slots)
/// kept all of them in memory (ptxas 11.8 and the H200's driver alike: a 3392-byte stack frame per thread and
/// 255 registers), while the same PTX with the slots as registers compiled to 253 registers and no stack. A slot
/// is a 32-bit variable that only its own thread reads and writes, at one constant address: a register has the
/// same meaning.
/// </para>
/// <para>
/// The rewrite is strict: it applies only when the PTX has exactly one function, every <c>.local</c> declaration
/// is such a slot, each slot's address is taken once (<c>mov.b64 %rdN, __local_depotM;</c>) into a register that
/// nothing else writes, and that register is used only as the whole address of 32-bit <c>st.local</c> and
/// <c>ld.local</c>. Otherwise the PTX is returned unchanged.
/// </para>
/// </summary>
internal static class PtxOperandSlots
{
    private static readonly Regex SlotDeclaration = new(@"^\s*\.local \.align 4 \.b8 (__local_depot\d+)\[4\];\s*$", RegexOptions.Compiled);
    private static readonly Regex AddressOf = new(@"^\s*mov\.(?:b64|u64)\s+(%rd\d+),\s*(__local_depot\d+);\s*$", RegexOptions.Compiled);
    private static readonly Regex Store = new(@"^(\s*)st\.local\.(?:b32|f32|u32|s32)\s+\[(%rd\d+)\],\s*([^;\s]+);\s*$", RegexOptions.Compiled);
    private static readonly Regex Load = new(@"^(\s*)ld\.local\.(?:b32|f32|u32|s32)\s+([^,\s]+),\s*\[(%rd\d+)\];\s*$", RegexOptions.Compiled);
    private static readonly Regex Register64 = new(@"%rd\d+\b", RegexOptions.Compiled);

    /// <summary>The PTX with its operand slots as registers <c>%slot0</c> ..; unchanged where the rewrite does not apply.</summary>
    public static string Promote(string ptx) => TryPromote(ptx, out string promoted) ? promoted : ptx;

    /// <summary>True (with the rewritten PTX) when every local declaration was an operand slot and is now a register.</summary>
    public static bool TryPromote(string ptx, out string promoted)
    {
        promoted = ptx;
        if (Regex.Matches(ptx, @"\.(?:entry|func)\b").Count != 1)
            return false;
        string[] lines = ptx.Split('\n');
        var slots = new Dictionary<string, int>();            // depot name -> slot number
        foreach (string line in lines)
        {
            var m = SlotDeclaration.Match(line);
            if (m.Success)
                slots[m.Groups[1].Value] = slots.Count;
            else if (line.Contains(".local"))
            {
                if (!Store.IsMatch(line) && !Load.IsMatch(line) && !line.TrimStart().StartsWith("//"))
                    return false;                               // another local declaration or access
            }
        }
        if (slots.Count == 0)
            return false;

        var address = new Dictionary<string, int>();          // %rd register -> slot number
        foreach (string line in lines)
        {
            var m = AddressOf.Match(line);
            if (!m.Success)
                continue;
            if (!slots.TryGetValue(m.Groups[2].Value, out int slot) || address.ContainsKey(m.Groups[1].Value))
                return false;
            address[m.Groups[1].Value] = slot;
        }

        var output = new StringBuilder(ptx.Length);
        bool declared = false;
        foreach (string line in lines)
        {
            if (SlotDeclaration.IsMatch(line))
                continue;
            var m = AddressOf.Match(line);
            if (m.Success && address.ContainsKey(m.Groups[1].Value))
                continue;
            m = Store.Match(line);
            if (m.Success && address.TryGetValue(m.Groups[2].Value, out int slot))
            {
                output.Append(m.Groups[1].Value).Append("mov.b32\t%slot").Append(slot).Append(", ").Append(m.Groups[3].Value).Append(";\n");
                continue;
            }
            m = Load.Match(line);
            if (m.Success && address.TryGetValue(m.Groups[3].Value, out slot))
            {
                output.Append(m.Groups[1].Value).Append("mov.b32\t").Append(m.Groups[2].Value).Append(", %slot").Append(slot).Append(";\n");
                continue;
            }
            if (line.Contains(".local") || line.Contains("__local_depot"))
                return false;                                   // a slot used in another way
            foreach (Match r in Register64.Matches(line))
            {
                if (address.ContainsKey(r.Value))
                    return false;                               // a slot's address used in another way
            }
            output.Append(line).Append('\n');
            if (!declared && line.TrimEnd() == "{")
            {
                output.Append("\t.reg .b32 %slot<").Append(slots.Count).Append(">;\n");
                declared = true;
            }
        }
        if (!declared)
            return false;
        output.Length--;                                        // the split added no final line break
        promoted = output.ToString();
        return true;
    }
}
