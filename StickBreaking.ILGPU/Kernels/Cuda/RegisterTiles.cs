using StickBreaking.ILGPU.Kernels.Common;
using static StickBreaking.ILGPU.Kernels.Cuda.CudaTiles;

namespace StickBreaking.ILGPU.Kernels.Cuda;

/// <summary>
/// Four floats held in registers. ILGPU does not unroll loops, and an array indexed by a loop variable
/// lives in local memory; fixed fields of a struct value stay in registers. A shared-memory view cast to
/// <see cref="F4"/> is read and written with 16-byte vector instructions (ld.shared.v4, st.shared.v4).
/// </summary>
internal struct F4
{
    public float X0, X1, X2, X3;

    public F4(float x0, float x1, float x2, float x3)
    {
        X0 = x0; X1 = x1; X2 = x2; X3 = x3;
    }

    /// <summary>this + a * b, element-wise.</summary>
    public readonly F4 Fma(float a, F4 b) => new(X0 + a * b.X0, X1 + a * b.X1, X2 + a * b.X2, X3 + a * b.X3);

    /// <summary>this + (z0 . x, z1 . x, z2 . x, z3 . x): one column of a product, four rows at a time.</summary>
    public readonly F4 AddDots(F4 z0, F4 z1, F4 z2, F4 z3, F4 x) =>
        new(Dot(X0, z0, x), Dot(X1, z1, x), Dot(X2, z2, x), Dot(X3, z3, x));

    /// <summary>acc + a . b, as four chained multiply-adds.</summary>
    private static float Dot(float acc, F4 a, F4 b) => acc + a.X0 * b.X0 + a.X1 * b.X1 + a.X2 * b.X2 + a.X3 * b.X3;

    /// <summary>
    /// <see cref="AddDots"/> with the term (i, m) of element i (z_i.Xm x.Xm) selected away unless
    /// <paramref name="lo"/> &lt;= m - i &lt;= <paramref name="hi"/>: the diagonal block of a masked product.
    /// </summary>
    public readonly F4 AddDotsInBand(F4 z0, F4 z1, F4 z2, F4 z3, F4 x, int lo, int hi) =>
        new(DotInBand(X0, z0, x, lo, hi), DotInBand(X1, z1, x, lo + 1, hi + 1),
            DotInBand(X2, z2, x, lo + 2, hi + 2), DotInBand(X3, z3, x, lo + 3, hi + 3));

    /// <summary>acc + the terms a.Xm b.Xm with lo &lt;= m &lt;= hi, in <see cref="Dot"/>'s order.</summary>
    private static float DotInBand(float acc, F4 a, F4 b, int lo, int hi)
    {
        acc += lo <= 0 && 0 <= hi ? a.X0 * b.X0 : 0f;
        acc += lo <= 1 && 1 <= hi ? a.X1 * b.X1 : 0f;
        acc += lo <= 2 && 2 <= hi ? a.X2 * b.X2 : 0f;
        acc += lo <= 3 && 3 <= hi ? a.X3 * b.X3 : 0f;
        return acc;
    }
}

/// <summary>Eight floats held in registers (see <see cref="F4"/>).</summary>
internal struct F8
{
    public F4 Lo, Hi;

    public F8(F4 lo, F4 hi)
    {
        Lo = lo; Hi = hi;
    }

    /// <summary>this + a * b, element-wise.</summary>
    public readonly F8 Fma(float a, F8 b) => new(Lo.Fma(a, b.Lo), Hi.Fma(a, b.Hi));
}

/// <summary>
/// A 4 x 8 register tile stored by column: column c (one <see cref="F4"/>, element i for row i). The backward
/// accumulates dq, dk and dv so, one column per 16-byte load of the right-hand operand.
/// </summary>
internal struct Columns
{
    public F4 C0, C1, C2, C3, C4, C5, C6, C7;

    /// <summary>Row 0 as 8 floats (column c in field c).</summary>
    public readonly F8 Row0 => new(new F4(C0.X0, C1.X0, C2.X0, C3.X0), new F4(C4.X0, C5.X0, C6.X0, C7.X0));

    /// <summary>Row 1 as 8 floats.</summary>
    public readonly F8 Row1 => new(new F4(C0.X1, C1.X1, C2.X1, C3.X1), new F4(C4.X1, C5.X1, C6.X1, C7.X1));

    /// <summary>Row 2 as 8 floats.</summary>
    public readonly F8 Row2 => new(new F4(C0.X2, C1.X2, C2.X2, C3.X2), new F4(C4.X2, C5.X2, C6.X2, C7.X2));

    /// <summary>Row 3 as 8 floats.</summary>
    public readonly F8 Row3 => new(new F4(C0.X3, C1.X3, C2.X3, C3.X3), new F4(C4.X3, C5.X3, C6.X3, C7.X3));
}
