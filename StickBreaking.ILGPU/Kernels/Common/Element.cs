using ILGPU;

namespace StickBreaking.ILGPU.Kernels.Common;

/// <summary>
/// How a portable kernel reads and writes the storage of its tensors: every computation is fp32, each element is
/// converted on load (<see cref="Load"/>) and on the final store (<see cref="Store"/>). Kernels are generic over the
/// implementing struct; ILGPU specializes a generic kernel per type argument, so the calls inline, fp32's identity
/// vanishes and <see cref="Wide"/> is a constant in each specialization.
/// </summary>
/// <typeparam name="T">The stored element: <see cref="float"/>, or <see cref="ushort"/> bits of a 16-bit type.</typeparam>
internal interface IElement<T>
    where T : unmanaged
{
    /// <summary>True where the storage is fp32, so that an output tensor can hold a running fp32 sum itself.</summary>
    bool Wide { get; }

    /// <summary>The exact float value of a stored element.</summary>
    float Load(T x);

    /// <summary>A float rounded to the storage (nearest, ties to even).</summary>
    T Store(float x);

    /// <summary>
    /// Where a kernel that cannot use shared memory (<see cref="OutputAccumulator.InOutput"/>) keeps a running fp32
    /// sum of <paramref name="output"/>: the output itself when it is fp32, else <paramref name="scratch"/>.
    /// </summary>
    ArrayView<float> Accumulator(ArrayView<T> output, ArrayView<float> scratch);
}

/// <summary>fp32 storage: loads and stores are the identity (the fp32 kernels' results bit for bit).</summary>
internal readonly struct Fp32Element : IElement<float>
{
    public bool Wide => true;

    public float Load(float x) => x;

    public float Store(float x) => x;

    public ArrayView<float> Accumulator(ArrayView<float> output, ArrayView<float> scratch) => output;
}
