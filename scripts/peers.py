#!/usr/bin/env python3
"""Peer timings for StickBreaking.ILGPU's benchmark, on a machine with an NVIDIA GPU and PyTorch.

    python3 scripts/peers.py B H D T [T ...] [--dtype fp32,bf16] [--reps 10] [--warmup 3]
                             [--triton-path DIR] [--no-naive] [--no-ceilings]
    python3 scripts/peers.py --decode B Hq Hkv D L [L ...] [--dtype bf16,fp32]

--decode times one query per sequence and query head (n = 1) against a cache of L keys per sequence in Hkv
key/value heads ([B, Hkv, L, D] each for k and v), emitting per L and dtype:
  - sdpa_decode: PyTorch SDPA (softmax) with enable_gqa=True, the decode a user would otherwise call;
  - naive_torch_stickbreaking_decode: stick-breaking decode in plain PyTorch (z, log-sigmoids, a reverse cumulative
    sum over the keys, exp, the weighted sum), as model code without a kernel decodes;
  - copy_d2d: a device-to-device copy of k and v (reads and writes the same bytes: a bandwidth yardstick);
each with "ms" and "tb_s", the K + V bytes per ms (what a decode must read).

Prints one JSON object per line, in the schema that the benchmark's report mode reads
(`dotnet run -c Release --project StickBreaking.ILGPU.Bench -- --report ours.jsonl peers.jsonl ...`):

    {"peer": "sdpa_causal", "dtype": "torch.float32", "B": .., "H": .., "T": .., "D": ..,
     "fwd_ms": .., "fwd_tflops": .., "fwdbwd_ms": .., "fwdbwd_tflops": .., ...}

Peers, each on random inputs of shape [B, H, T, D]:
  - sdpa_causal: PyTorch's scaled_dot_product_attention with is_causal=True (softmax attention: a
    different attention, there for scale), forward and forward + backward;
  - triton_stickbreaking: the published Triton stick-breaking kernel, if the package
    `stickbreaking_attention` is importable (pip-installed, or a source checkout named by --triton-path);
    otherwise one line {"peer": "triton_stickbreaking", "error": ...} says why;
  - naive_torch_stickbreaking: stick-breaking written with dense T x T PyTorch tensors (forward only;
    skipped where those tensors would exceed --naive-max-gib);
  - cublas_sgemm_fp32 and cublas_gemm_bf16: the GEMM ceilings (8192^3), as {"peer": .., "tflops": ..}.

Times are medians over --reps runs measured with CUDA events, after --warmup runs. FLOP counts follow the
benchmark: 4 T^2 D / 2 per (batch, head) for a causal forward, and 3.5 times that for forward + backward
(the backward counted as 2.5 forwards).

Exit codes: 0 done; 2 bad arguments; 3 PyTorch missing; 4 no CUDA device.
"""
import argparse
import json
import math
import statistics
import sys

DTYPES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
          "fp16": "float16", "float16": "float16"}


def emit(obj):
    print(json.dumps(obj), flush=True)


def parse_args(argv):
    ap = argparse.ArgumentParser(description="Peer timings (PyTorch SDPA, Triton stick-breaking) as JSON lines.")
    ap.add_argument("sizes", nargs="+", type=int, metavar="N", help="B H D T [T ...]")
    ap.add_argument("--dtype", default="fp32,bf16", help="comma-separated among fp32, bf16, fp16 (default fp32,bf16)")
    ap.add_argument("--reps", type=int, default=10, help="timed runs per figure; the median is printed (default 10)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed runs before timing (default 3)")
    ap.add_argument("--triton-path", default=None, help="a directory holding the stickbreaking_attention package")
    ap.add_argument("--triton-fp32-backward", action="store_true",
                    help="also time the Triton kernel's fp32 backward (off by default: it has been seen to hang)")
    ap.add_argument("--no-naive", action="store_true", help="skip the dense PyTorch stick-breaking")
    ap.add_argument("--naive-max-gib", type=float, default=8.0, help="largest T x T tensor for the dense peer (GiB)")
    ap.add_argument("--no-ceilings", action="store_true", help="skip the cuBLAS GEMM ceilings")
    args = ap.parse_args(argv)
    if len(args.sizes) < 4:
        ap.error("need B H D and at least one T")
    if any(n < 1 for n in args.sizes) or args.reps < 1 or args.warmup < 0:
        ap.error("sizes and --reps must be >= 1, --warmup >= 0")
    dtypes = []
    for name in args.dtype.split(","):
        name = name.strip().lower()
        if name not in DTYPES:
            ap.error(f"unknown dtype {name!r}; use fp32, bf16 or fp16")
        if DTYPES[name] not in dtypes:
            dtypes.append(DTYPES[name])
    args.dtypes = dtypes
    return args


def main(argv):
    if argv and argv[0] == "--decode":
        return decode_main(argv[1:])
    args = parse_args(argv)
    B, H, D = args.sizes[:3]
    lengths = args.sizes[3:]

    try:
        import torch
        import torch.nn.functional as F
    except ImportError as e:
        emit({"peer": "torch", "error": f"PyTorch is not importable: {e}"})
        print("peers.py: PyTorch is not installed here; the peers need PyTorch with CUDA "
              "(pip install torch) on a machine with an NVIDIA GPU.", file=sys.stderr)
        return 3
    if not torch.cuda.is_available():
        emit({"peer": "torch", "error": f"torch {torch.__version__} sees no CUDA device"})
        print("peers.py: PyTorch sees no CUDA device; run this on a machine with an NVIDIA GPU.", file=sys.stderr)
        return 4

    device = torch.cuda.get_device_name(0)
    torch.backends.cuda.matmul.allow_tf32 = False   # fp32 means fp32 for the peers we compare with
    torch.backends.cudnn.allow_tf32 = False

    def median_ms(fn):
        """Median wall time of fn on the GPU, in ms, from CUDA events around each run."""
        for _ in range(args.warmup):
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(args.reps):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)

    common = {"device": device, "torch": torch.__version__, "timing": "cuda events", "reps": args.reps,
              "warmup": args.warmup}

    # The published Triton kernel, when it can be imported.
    sb_attn = None
    if args.triton_path:
        sys.path.insert(0, args.triton_path)
    try:
        import stickbreaking_attention
        sb_attn = getattr(stickbreaking_attention, "sb_attn", None)
        if not callable(sb_attn):   # older layouts: the function lives in the sb_attn submodule
            from stickbreaking_attention.sb_attn import sb_attn
    except Exception as e:  # ImportError, or Triton failing to load
        sb_attn = None
        emit({"peer": "triton_stickbreaking", "error": f"stickbreaking_attention is not importable: "
                                                       f"{type(e).__name__}: {e}"})

    if not args.no_ceilings:
        n = 8192
        a = torch.randn(n, n, device="cuda")
        b = torch.randn(n, n, device="cuda")
        emit({"peer": "cublas_sgemm_fp32", "tflops": 2 * n ** 3 / median_ms(lambda: a @ b) / 1e9, **common})
        a, b = a.bfloat16(), b.bfloat16()
        emit({"peer": "cublas_gemm_bf16", "tflops": 2 * n ** 3 / median_ms(lambda: a @ b) / 1e9, **common})
        del a, b
        torch.cuda.empty_cache()

    for T in lengths:
        fwd_flops = 4 * T * T * D / 2 * B * H      # q k^T and A v over the causal half
        fwdbwd_flops = 3.5 * fwd_flops
        scale = 1 / math.sqrt(D)
        for dtype_name in args.dtypes:
            dt = getattr(torch, dtype_name)
            gen = torch.Generator(device="cuda").manual_seed(T)
            q, k, v, do = (torch.randn(B, H, T, D, device="cuda", dtype=dt, generator=gen) for _ in range(4))
            for t in (q, k, v):
                t.requires_grad_(True)
            shape = {"dtype": str(dt), "B": B, "H": H, "T": T, "D": D}

            def sdpa():
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)

            def sdpa_fwdbwd():
                torch.autograd.grad(sdpa(), (q, k, v), do)

            with torch.no_grad():
                fwd = median_ms(sdpa)
            fb = median_ms(sdpa_fwdbwd)
            emit({"peer": "sdpa_causal", **shape, "fwd_ms": fwd, "fwd_tflops": fwd_flops / fwd / 1e9,
                  "fwdbwd_ms": fb, "fwdbwd_tflops": fwdbwd_flops / fb / 1e9, **common})

            if sb_attn is not None:
                row = {"peer": "triton_stickbreaking", **shape}
                try:
                    def triton_fwd():
                        return sb_attn(q, k, v, inv_temp=scale)

                    def triton_fwdbwd():
                        o, _rem = triton_fwd()
                        torch.autograd.grad(o, (q, k, v), do)

                    with torch.no_grad():
                        fwd = median_ms(triton_fwd)
                    row.update({"fwd_ms": fwd, "fwd_tflops": fwd_flops / fwd / 1e9})
                    if dt != torch.float32 or args.triton_fp32_backward:
                        fb = median_ms(triton_fwdbwd)
                        row.update({"fwdbwd_ms": fb, "fwdbwd_tflops": fwdbwd_flops / fb / 1e9})
                    else:
                        row["fwdbwd_note"] = "fp32 backward not timed (it has been seen to hang); --triton-fp32-backward times it"
                except Exception as e:
                    row["error"] = f"{type(e).__name__}: {e}"
                emit({**row, **common})

            if not args.no_naive:
                if B * H * T * T * 4 <= args.naive_max_gib * 2 ** 30:
                    with torch.no_grad():
                        fwd = median_ms(lambda: naive_stick_breaking(torch, F, q, k, v, scale))
                    emit({"peer": "naive_torch_stickbreaking", **shape, "fwd_ms": fwd,
                          "fwd_tflops": fwd_flops / fwd / 1e9, **common})
                else:
                    emit({"peer": "naive_torch_stickbreaking", **shape,
                          "skipped": f"its T x T tensors would exceed {args.naive_max_gib:g} GiB"})
            del q, k, v, do
            torch.cuda.empty_cache()
    return 0


def decode_main(argv):
    ap = argparse.ArgumentParser(description="Decode peer timings as JSON lines.")
    ap.add_argument("sizes", nargs="+", type=int, metavar="N", help="B Hq Hkv D L [L ...]")
    ap.add_argument("--dtype", default="bf16", help="comma-separated among fp32, bf16, fp16 (default bf16)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    args = ap.parse_args(argv)
    if len(args.sizes) < 5:
        ap.error("need B Hq Hkv D L [L ...]")
    B, Hq, Hkv, D = args.sizes[:4]
    try:
        import torch
        import torch.nn.functional as F
    except ImportError as e:
        emit({"peer": "torch", "error": f"PyTorch is not importable: {e}"})
        return 3
    if not torch.cuda.is_available():
        emit({"peer": "torch", "error": "no CUDA device"})
        return 4

    def median_ms(fn):
        for _ in range(args.warmup):
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(args.reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)

    common = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "timing": "cuda events",
              "reps": args.reps, "B": B, "Hq": Hq, "Hkv": Hkv, "D": D, "n": 1}
    scale = 1 / math.sqrt(D)
    for L in args.sizes[4:]:
        for name in args.dtype.split(","):
            dt = getattr(torch, DTYPES[name.strip().lower()])
            gen = torch.Generator(device="cuda").manual_seed(L)
            q = torch.randn(B, Hq, 1, D, device="cuda", dtype=dt, generator=gen)
            k = torch.randn(B, Hkv, L, D, device="cuda", dtype=dt, generator=gen) * 0.25
            v = torch.randn(B, Hkv, L, D, device="cuda", dtype=dt, generator=gen) * 0.25
            kv_bytes = 2 * k.numel() * k.element_size()
            row = {"dtype": str(dt), "L": L, "kv_bytes": kv_bytes, **common}

            def report(peer, fn):
                try:
                    ms = median_ms(fn)
                    emit({"peer": peer, "ms": ms, "tb_s": kv_bytes / ms / 1e9, **row})
                except Exception as e:  # out of memory, or an SDPA without enable_gqa
                    emit({"peer": peer, "error": f"{type(e).__name__}: {e}", **row})
                torch.cuda.empty_cache()

            with torch.no_grad():
                report("sdpa_decode", lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
                report("naive_torch_stickbreaking_decode", lambda: naive_stick_breaking_decode(torch, F, q, k, v, scale))
                report("copy_d2d", lambda: (k.clone(), v.clone()))
            del q, k, v
            torch.cuda.empty_cache()
    return 0


def naive_stick_breaking_decode(torch, F, q, k, v, scale):
    """One new query per sequence and head at position L, seeing keys 0 .. L-1 (its own key is not in the cache):
    log A_j = log(beta_j) + sum over l > j of log(1 - beta_l), o = sum_j A_j v_j, rem = exp(sum_j log(1 - beta_j)).
    Query heads are grouped over the key/value heads ([B, Hkv, G, 1, D])."""
    B, Hq, _, D = q.shape
    Hkv = k.shape[1]
    qg = q.view(B, Hkv, Hq // Hkv, 1, D).float()
    z = torch.matmul(qg, k.float().unsqueeze(2).transpose(-1, -2)) * scale          # [B, Hkv, G, 1, L]
    log_keep = F.logsigmoid(-z)
    nearer = torch.flip(torch.cumsum(torch.flip(log_keep, [-1]), -1), [-1]) - log_keep
    a = torch.exp(F.logsigmoid(z) + nearer)
    o = torch.matmul(a, v.float().unsqueeze(2))                                      # [B, Hkv, G, 1, D]
    return o.view(B, Hq, 1, D).to(q.dtype), torch.exp(log_keep.sum(-1))


def naive_stick_breaking(torch, F, q, k, v, scale):
    """Stick-breaking from its log-space definition (docs/math.md, Log space) with dense T x T tensors:
    log A_ij = log(beta_ij) + sum over visible l > j of log(1 - beta_il); keys j < i are visible."""
    T = q.shape[-2]
    z = torch.matmul(q, k.transpose(-1, -2)) * scale
    visible = torch.ones(T, T, dtype=torch.bool, device=q.device).tril(diagonal=-1)
    log_keep = torch.where(visible, F.logsigmoid(-z), torch.zeros((), dtype=z.dtype, device=z.device))
    # sum over l > j: reverse cumulative sum, exclusive of j itself
    nearer = torch.flip(torch.cumsum(torch.flip(log_keep, [-1]), -1), [-1]) - log_keep
    log_a = torch.where(visible, F.logsigmoid(z) + nearer, torch.full((), -math.inf, dtype=z.dtype, device=z.device))
    a = torch.exp(log_a)
    return torch.matmul(a, v), 1 - a.sum(-1)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
