namespace StickBreaking.ILGPU.Kernels.Cuda;

/// <summary>
/// Four floats held in registers. ILGPU does not unroll loops, and an array indexed by a loop variable
/// lives in local memory; fixed fields of a struct value stay in registers.
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
