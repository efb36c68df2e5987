namespace StickBreaking.ILGPU.Kernels.Common;

/// <summary>
/// Strides of one <c>[B, H, T, D]</c> tensor in its view: element (b, h, t, d) sits at
/// <c>b * Batch + h * Head + t * Token + d</c> (docs/math.md, "Layouts and grouped heads"). D is always contiguous.
/// </summary>
internal struct RowStrides
{
    public long Batch, Head, Token;

    /// <summary>The strides of a contiguous <c>[B, heads, T, D]</c> tensor.</summary>
    public static RowStrides Contiguous(int heads, int length, int headDim) => new()
    {
        Batch = (long)heads * length * headDim, Head = (long)length * headDim, Token = headDim,
    };

    /// <summary>
    /// <see cref="Token"/> in 16-byte pieces of 16-bit storage (a multiple of 8 elements there): the tensor-core kernels
    /// address the rows of one head with 32-bit offsets from its row 0, which the host checks fit
    /// (<c>Guards.HeadOffsets</c>); 64-bit arithmetic per tile cost those kernels about 3 %.
    /// </summary>
    public readonly int TokenPieces => (int)(Token >> 3);

    /// <summary>Index of element 0 of row (b, h, t).</summary>
    public readonly long Row(int b, int h, int t) => b * Batch + h * Head + t * Token;
}

/// <summary>
/// Where every row of the attention tensors lies, and which key/value head serves each query head: the kernels' one
/// way from (head, token) to an element index, for every layout (docs/math.md, "Layouts and grouped heads"). A query
/// head is numbered <c>b * Heads + h</c> (the grid's X of the passes that walk query rows, and the row index of rem,
/// LogRem, dRem and the snapshots, which are always contiguous <c>[B, Heads, T]</c>); a key/value head
/// <c>b * KeyValueHeads + g</c> (the grid's X of the passes that walk keys). Query head h reads key/value head
/// <c>h / (Heads / KeyValueHeads)</c>.
/// </summary>
internal struct AttentionRows
{
    /// <summary>Query-side tensors (<see cref="Heads"/> heads): q, o, dO, dq.</summary>
    public RowStrides Q, O, DO, DQ;
    /// <summary>Key/value-side tensors (<see cref="KeyValueHeads"/> heads): k, v, dk, dv.</summary>
    public RowStrides K, V, DK, DV;
    /// <summary>Query heads Hq and key/value heads Hkv per sequence (Hq a multiple of Hkv).</summary>
    public int Heads, KeyValueHeads;

    /// <summary>Query heads per key/value head, Hq / Hkv.</summary>
    public readonly int GroupSize => Heads / KeyValueHeads;

    /// <summary>Every tensor contiguous: q, o, dO, dq <c>[B, Hq, T, D]</c>; k, v, dk, dv <c>[B, Hkv, T, D]</c>.</summary>
    public static AttentionRows Contiguous(int heads, int keyValueHeads, int length, int headDim)
    {
        var query = RowStrides.Contiguous(heads, length, headDim);
        var key = RowStrides.Contiguous(keyValueHeads, length, headDim);
        return new AttentionRows
        {
            Q = query, O = query, DO = query, DQ = query,
            K = key, V = key, DK = key, DV = key,
            Heads = heads, KeyValueHeads = keyValueHeads,
        };
    }

    /// <summary>Index of element 0 of row 0 of query head <paramref name="head"/> (b * Hq + h) in a query-side tensor.</summary>
    public readonly long QueryBase(RowStrides x, int head) => x.Row(head / Heads, head % Heads, 0);

    /// <summary>Index of element 0 of row 0, in a key/value-side tensor, of the key/value head that query head <paramref name="head"/> reads.</summary>
    public readonly long KeyBaseOfQuery(RowStrides x, int head)
    {
        int b = head / Heads;
        return x.Row(b, (head - b * Heads) / GroupSize, 0);
    }

    /// <summary>
    /// The key/value head (b * Hkv + g) that query head <paramref name="head"/> (b * Hq + h) reads: head / (Hq / Hkv), since
    /// Hq is a multiple of the group size. <see cref="KeyBase"/> of it is <see cref="KeyBaseOfQuery"/> of the query head: one
    /// int to keep across a loop instead of a 64-bit base per tensor.
    /// </summary>
    public readonly int KeyHeadOfQuery(int head) => head / GroupSize;

    /// <summary>Index of element 0 of row 0 of key/value head <paramref name="keyHead"/> (b * Hkv + g) in a key/value-side tensor.</summary>
    public readonly long KeyBase(RowStrides x, int keyHead) => x.Row(keyHead / KeyValueHeads, keyHead % KeyValueHeads, 0);

    /// <summary>
    /// The query head (b * Hq + h) that is member <paramref name="member"/> (0 to <see cref="GroupSize"/> - 1) of the
    /// group reading key/value head <paramref name="keyHead"/> (b * Hkv + g): h = g * GroupSize + member.
    /// </summary>
    public readonly int QueryHeadOf(int keyHead, int member)
    {
        int b = keyHead / KeyValueHeads;
        return b * Heads + (keyHead - b * KeyValueHeads) * GroupSize + member;
    }
}
