using System;
using System.Collections.Generic;

namespace StickBreaking.ILGPU.Tests.Reference;

/// <summary>The inputs of a forward and backward call.</summary>
public enum MaskInput
{
    Q,
    K,
    V,
    DO,
    DRem,
}

/// <summary>The outputs of a forward (O, Rem, LogRem) and backward (DQ, DK, DV) call.</summary>
public enum MaskOutput
{
    O,
    Rem,
    LogRem,
    DQ,
    DK,
    DV,
}

/// <summary>
/// One poisoned input element: <paramref name="Input"/>[head, token, column] (head = b H + h for q, dO and dRem, b Hkv + g
/// for k and v; the column is ignored for dRem, which has none) set to <paramref name="Value"/>.
/// </summary>
public readonly record struct Poison(MaskInput Input, int Head, int Token, int Column, float Value)
{
    public override string ToString() =>
        Input == MaskInput.DRem ? $"{Input}[{Head},{Token}]={Value}" : $"{Input}[{Head},{Token},{Column}]={Value}";
}

/// <summary>
/// Which outputs can depend on which inputs, from the definition (docs/math.md, Masks; the forward and
/// the backward formulas), for one (batch, head); nothing crosses heads. With visible(i, j) = j &lt; i, or
/// j &lt;= i with AttendCurrent, and "row i sees a key" = some j is visible from i (every row but row 0
/// under the default visibility):
/// <list type="bullet">
/// <item>o_i[d] = sum_j A_ij v_j[d]: q_i (only if row i sees a key), k_j and column d of v_j for j visible
/// from i. A row that sees no key has o = 0 whatever its q.</item>
/// <item>rem_i, LogRem_i = prod/sum over the visible keys of 1 - beta_ij: q_i (if row i sees a key) and k_j for
/// j visible from i; never v.</item>
/// <item>dq_i = s sum_j dz_ij k_j over j visible from i: q_i, dO_i, dRem_i and k_j, v_j for j visible from i;
/// nothing at all when row i sees no key (the sum is empty: dq_i = 0).</item>
/// <item>dk_j = s sum_i dz_ij q_i over the rows i that see j: for each such i, what dz_ij depends on, which is
/// at most q_i, dO_i, dRem_i and k_l, v_l for l visible from i (A_ij, a_ij, P_ij and rem_i). A key no row
/// sees (the last key under the default visibility) has dk = 0.</item>
/// <item>dv_j[d] = sum_i A_ij dO_i[d] over the rows i that see j: q_i, column d of dO_i and k_l for l visible
/// from i; never v or dRem. A key no row sees has dv = 0.</item>
/// </list>
/// With grouped heads (Hq = <c>groupSize</c> Hkv), query head b H + h reads key/value head (b H + h) / groupSize, and the
/// dk, dv of a key/value head sum over the query heads of its group: an element crosses heads exactly along that map.
/// The rule is deliberately coarse where the definition is finer (dk_j does not in fact depend on v_l for
/// l &gt; j, nor A_ij on k_l for l &lt; j): an output the rule calls independent certainly is, so the tests
/// assert those bitwise unchanged and assert nothing about the others.
/// </summary>
public static class MaskDependencies
{
    public static bool Visible(int query, int key, bool attendCurrent) => key < query || (attendCurrent && key == query);

    public static bool SeesAKey(int query, bool attendCurrent) => attendCurrent || query > 0;

    /// <summary>True when no key is visible from any row: the key's dk and dv are exactly 0.</summary>
    public static bool SeenByNoRow(int key, int length, bool attendCurrent) => !(attendCurrent || key < length - 1);

    /// <summary>
    /// Whether <paramref name="output"/>[head, token, column] may depend on the poisoned element <paramref name="x"/>; heads
    /// of dk and dv (and of k and v) are key/value heads, <paramref name="groupSize"/> query heads to each.
    /// </summary>
    public static bool MayDepend(MaskOutput output, int head, int token, int column, Poison x, int length, bool attendCurrent,
        int groupSize = 1)
    {
        bool outputOnKeys = output is MaskOutput.DK or MaskOutput.DV, poisonOnKeys = x.Input is MaskInput.K or MaskInput.V;
        int outputKeyHead = outputOnKeys ? head : head / groupSize, poisonKeyHead = poisonOnKeys ? x.Head : x.Head / groupSize;
        bool sameHead = outputOnKeys == poisonOnKeys ? x.Head == head : outputKeyHead == poisonKeyHead;
        if (!sameHead)
            return false;
        switch (output)
        {
            case MaskOutput.O:
                return RowForward(token, x, attendCurrent, values: true, valueColumn: column);
            case MaskOutput.Rem:
            case MaskOutput.LogRem:
                return RowForward(token, x, attendCurrent, values: false, valueColumn: -1);
            case MaskOutput.DQ:
                return RowBackward(token, x, attendCurrent, values: true, dRem: true, dOColumn: -1);
            case MaskOutput.DK:
            case MaskOutput.DV:
            {
                // The rows that see key `token`, and what each of them reads. A poisoned q, dO or dRem belongs to
                // one row; a poisoned k_l or v_l is read by every row that sees l, and a row that sees a key also
                // sees every farther key, so some row sees both l and `token` exactly when the last row does.
                bool dk = output == MaskOutput.DK;
                int row = x.Input is MaskInput.K or MaskInput.V ? length - 1 : x.Token;
                return Visible(row, token, attendCurrent)
                    && RowBackward(row, x, attendCurrent, values: dk, dRem: dk, dOColumn: dk ? -1 : column);
            }
            default:
                throw new ArgumentOutOfRangeException(nameof(output), output, null);
        }
    }

    /// <summary>Whether the output element may depend on any of <paramref name="poisons"/>.</summary>
    public static bool MayDepend(MaskOutput output, int head, int token, int column, IReadOnlyList<Poison> poisons,
        int length, bool attendCurrent, int groupSize = 1)
    {
        foreach (var x in poisons)
        {
            if (MayDepend(output, head, token, column, x, length, attendCurrent, groupSize))
                return true;
        }
        return false;
    }

    // What row i's weights (and, with values, its output column valueColumn, or every column for -1) read.
    private static bool RowForward(int i, Poison x, bool attendCurrent, bool values, int valueColumn)
    {
        if (!SeesAKey(i, attendCurrent))
            return false;
        return x.Input switch
        {
            MaskInput.Q => x.Token == i,
            MaskInput.K => Visible(i, x.Token, attendCurrent),
            MaskInput.V => values && Visible(i, x.Token, attendCurrent) && (valueColumn < 0 || valueColumn == x.Column),
            _ => false,
        };
    }

    // What row i's dz_i* (values and dRem: true) or A_i* dO_i[dOColumn] (false, false) read.
    private static bool RowBackward(int i, Poison x, bool attendCurrent, bool values, bool dRem, int dOColumn)
    {
        if (!SeesAKey(i, attendCurrent))
            return false;
        return x.Input switch
        {
            MaskInput.DO => x.Token == i && (dOColumn < 0 || dOColumn == x.Column),
            MaskInput.DRem => dRem && x.Token == i,
            _ => RowForward(i, x, attendCurrent, values, valueColumn: -1),
        };
    }
}
