"""Attention throughput: the Triton kernel against every SDPA backend, as TFLOP/s and % of peak.

    python -m benchmarks.attention [--json PATH] [--head-dims 64 128] [--seqs 128 ... 4096]

On a GPU it ends by printing the ``kernels.attention.TRITON_FASTER`` entries these numbers support
(forward + backward faster than the best SDPA backend; a win at seq s covers [s, next measured seq)).

bf16, causal by default; a fixed number of tokens per batch (batch = tokens // seq) and a fixed
model width (heads = width // head_dim), so every row does the same projection work. FLOPs follow
FlashAttention's convention: forward 4 * b * h * s^2 * d (two matmuls), backward 2.5x the
forward, both halved for causal. Times are CUDA-event medians (triton.testing.do_bench).
On a machine without CUDA only the reference (SDPA's math backend, fp32, tiny shapes) runs.
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from kernels.attention import attention

# dense bf16 tensor-core peak, FLOP/s, by a substring of torch.cuda.get_device_name()
PEAK_BF16 = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12),
             ("GH200", 989e12), ("A100", 312e12))
SDPA_BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                 "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def peak_flops(device_name: str) -> float | None:
    for key, peak in PEAK_BF16:
        if key in device_name:
            return peak
    return None


def attn_flops(b, h, s, d, causal, mode):
    fwd = 4 * b * h * s * s * d / (2 if causal else 1)
    return fwd if mode == "fwd" else 3.5 * fwd


def _providers(causal):
    out = {"triton": lambda q, k, v: attention(q, k, v, causal=causal, backend="triton")}
    for name, backend in SDPA_BACKENDS.items():
        def run(q, k, v, backend=backend):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        out[name] = run
    return out


def _bench_ms(fn, device):
    if device.type == "cuda":
        from triton.testing import do_bench
        return do_bench(fn, warmup=25, rep=100, return_mode="median")
    fn()
    times = []
    for _ in range(5):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def measure(provider, b, h, s, d, dtype, device, mode):
    """(milliseconds for one call (mode 'fwd') or forward + backward ('fwd_bwd'), None) or (None, error)."""
    q, k, v = (torch.randn(b, h, s, d, device=device, dtype=dtype, requires_grad=mode != "fwd")
               for _ in range(3))
    do = torch.randn(b, h, s, d, device=device, dtype=dtype)

    def fwd():
        with torch.no_grad():
            provider(q, k, v)

    def fwd_bwd():
        provider(q, k, v).backward(do)
        q.grad = k.grad = v.grad = None
    fn = fwd if mode == "fwd" else fwd_bwd
    try:
        fn()  # compiles the kernel, or raises if this backend can't take the shape
        return _bench_ms(fn, device), None
    except Exception as e:  # SDPA "no available kernel", OOM, a Triton compile error: report, go on
        return None, f"{type(e).__name__}: {str(e).strip().splitlines()[0][:160] if str(e).strip() else ''}"
    finally:
        del q, k, v, do
        if device.type == "cuda":
            torch.cuda.empty_cache()


def run(head_dims, seqs, tokens, width, dtype, causal, modes, device, names):
    peak = peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    providers = {n: p for n, p in _providers(causal).items() if n in names}
    rows = []
    for d in head_dims:
        for s in seqs:
            b, h = max(1, tokens // s), max(1, width // d)
            for mode in modes:
                row = {"head_dim": d, "seq": s, "batch": b, "heads": h, "mode": mode, "tflops": {}, "ms": {}}
                flops = attn_flops(b, h, s, d, causal, mode)
                for name, provider in providers.items():
                    ms, err = measure(provider, b, h, s, d, dtype, device, mode)
                    row["ms"][name] = ms
                    if err:
                        row.setdefault("errors", {})[name] = err
                        print(f"  [{name} hd={d} seq={s} {mode}] {err}", file=sys.stderr, flush=True)
                    row["tflops"][name] = None if ms is None else flops / (ms * 1e-3) / 1e12
                if peak is not None:
                    row["frac_peak"] = {n: None if t is None else t * 1e12 / peak for n, t in row["tflops"].items()}
                sdpa = [t for n, t in row["tflops"].items() if n != "triton" and t is not None]
                if row["tflops"].get("triton") is not None and sdpa:
                    row["best_sdpa"] = max((t, n) for n, t in row["tflops"].items() if n != "triton" and t)[1]
                    row["ratio_vs_best_sdpa"] = row["tflops"]["triton"] / max(sdpa)
                rows.append(row)
                _print_row(row, list(providers), peak)
    return rows, peak


def dispatch_entries(rows: list[dict], arch: int, dtype: str) -> dict:
    """TRITON_FASTER entries: (arch, dtype, head_dim) -> seq ranges where Triton's fwd_bwd beat every SDPA."""
    out = {}
    for d in sorted({r["head_dim"] for r in rows}):
        timed = sorted((r["seq"], r.get("ratio_vs_best_sdpa")) for r in rows
                       if r["head_dim"] == d and r["mode"] == "fwd_bwd")
        ranges = [(s, timed[i + 1][0] if i + 1 < len(timed) else s + 1)
                  for i, (s, ratio) in enumerate(timed) if ratio is not None and ratio > 1]
        if ranges:
            out[(arch, dtype, d)] = tuple(ranges)
    return out


def _print_header(names, peak):
    cols = "".join(f"{n:>16}" for n in names)
    unit = "TFLOP/s (% peak)" if peak else "TFLOP/s"
    print(f"{'hd':>4}{'seq':>6}{'batch':>6}{'heads':>6}{'mode':>9}{cols}{'triton/best':>13}   [{unit}]")


def _print_row(row, names, peak):
    cells = []
    for n in names:
        t = row["tflops"].get(n)
        if t is None:
            cells.append(f"{'-':>16}")
        elif peak:
            cells.append(f"{t:>9.1f} ({100 * t * 1e12 / peak:>3.0f}%)")
        else:
            cells.append(f"{t:>16.4g}")
    ratio = row.get("ratio_vs_best_sdpa")
    ratio = f"{ratio:>8.2f} ({row['best_sdpa']})" if ratio is not None else f"{'-':>13}"
    print(f"{row['head_dim']:>4}{row['seq']:>6}{row['batch']:>6}{row['heads']:>6}{row['mode']:>9}"
          + "".join(cells) + f"  {ratio}", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    p.add_argument("--seqs", type=int, nargs="+", default=[128, 256, 512, 1024, 2048, 4096])
    p.add_argument("--tokens", type=int, default=16384, help="tokens per batch: batch = tokens // seq")
    p.add_argument("--width", type=int, default=2048, help="model width: heads = width // head_dim")
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--no-causal", dest="causal", action="store_false")
    p.add_argument("--modes", nargs="+", choices=["fwd", "fwd_bwd"], default=["fwd", "fwd_bwd"])
    p.add_argument("--providers", nargs="+", choices=["triton", *SDPA_BACKENDS], default=["triton", *SDPA_BACKENDS])
    p.add_argument("--json", metavar="PATH", help="write the results (with device and versions) here")
    args = p.parse_args(argv)

    if torch.cuda.is_available():
        device = torch.device("cuda")
        device_name = torch.cuda.get_device_name(device)
        dtype, names = DTYPES[args.dtype], args.providers
        head_dims, seqs, tokens, width = args.head_dims, args.seqs, args.tokens, args.width
        note = None
        if os.environ.get("TRITON_INTERPRET") == "1":
            note = "TRITON_INTERPRET=1: the Triton kernel runs in the interpreter; its numbers mean nothing"
            print(f"WARNING: {note}")
    else:
        device, device_name = torch.device("cpu"), f"cpu ({platform.processor() or platform.machine()})"
        dtype, names = torch.float32, ["math"]
        head_dims, seqs, tokens, width = [64], [128, 256], 1024, 256
        note = ("no CUDA device: the Triton kernel and the fused SDPA backends are not benchmarked; "
                "this runs only the reference (SDPA math backend, fp32, tiny shapes) on the CPU")
        print(f"NOTE: {note}")
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    print(f"device: {device_name} | torch {torch.__version__} | triton {triton_version} | "
          f"{str(dtype).removeprefix('torch.')} | causal={args.causal} | tokens/batch {tokens}, width {width}")
    peak = peak_flops(device_name) if device.type == "cuda" else None
    _print_header(names, peak)
    rows, peak = run(head_dims, seqs, tokens, width, dtype, args.causal, args.modes, device, names)
    if device.type == "cuda" and "triton" in names:
        major, minor = torch.cuda.get_device_capability(device)
        print("kernels.attention.TRITON_FASTER entries:", dispatch_entries(rows, 10 * major + minor, args.dtype))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device_name, "torch": torch.__version__, "triton": triton_version,
                       "peak_flops": peak, "dtype": str(dtype).removeprefix("torch."), "causal": args.causal,
                       "tokens": tokens, "width": width, "note": note,
                       "flops": "fwd 4*b*h*s*s*d, fwd_bwd 3.5x fwd, halved for causal", "rows": rows}, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
