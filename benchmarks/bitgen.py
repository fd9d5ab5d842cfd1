"""Sparse-parity data generation: the fused kernel against a plain PyTorch baseline, side by side.

    python -m benchmarks.bitgen [--layout bits|pm1|tokens] [--k 3] [--repeats 5] [--json PATH]

"fused" is ``kernels.sparse_parity`` with backend="auto": the Triton kernel on CUDA, the PyTorch
reference on a CPU. "torch" is what one would write without it: ``torch.randint`` bits, gather the
secret columns, sum mod 2 (then the same encoding as the layout). Rates: samples/s and bytes
written/s (the outputs each side returns), on a GPU also as a share of the device's peak memory
bandwidth. Times are medians over repeats (CUDA events on a GPU). On any machine it then times the
default training step on the CPU (width-100 ReLU MLP, n=50, batch 32, hinge loss, SGD lr 0.1) and
reports the share of the step that generating its batch takes (pm1 layout, 100 steps per call).
"""
import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from kernels import sparse_parity
from kernels.sparse_parity import SEPARATOR, on_device

PEAK_BW = [  # (substrings of torch.cuda.get_device_name, bytes/s); first match wins
    (("H200",), 4.8e12),
    (("H100", "PCIE"), 2.0e12),
    (("H100",), 3.35e12),  # SXM
    (("A100", "80GB"), 2.0e12),
]
GPU_BATCHES = [2**e for e in range(10, 21, 2)]
CPU_BATCHES = [2**10, 2**12, 2**14]
NS = [50, 256, 1024]


def peak_bandwidth(name: str) -> float | None:
    up = name.upper()
    for keys, bw in PEAK_BW:
        if all(key in up for key in keys):
            return bw
    return None


def baseline(batch: int, n: int, secret: torch.Tensor, gen: torch.Generator, layout: str):
    """Plain PyTorch: random bits, gather the secret columns, sum mod 2."""
    x = torch.randint(0, 2, (batch, n), dtype=torch.uint8, device=secret.device, generator=gen)
    y = x[:, secret].sum(1, dtype=torch.int32).remainder_(2).to(torch.uint8)
    if layout == "pm1":
        return 1.0 - 2.0 * x.float(), 1.0 - 2.0 * y.float()
    if layout == "tokens":
        cot = x[:, secret].cumsum(1, dtype=torch.int32).remainder_(2)
        sep = torch.full((batch, 1), SEPARATOR, dtype=torch.int64, device=x.device)
        return torch.cat([x.long(), sep, cot.long()], 1), y
    return x, y


def timed(fn, device: torch.device, repeats: int, warmup: int = 2) -> float:
    """Median seconds of fn() over repeats, after warmup calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def throughput_rows(device, batches, ns, k, layout, repeats, peak):
    rows = []
    gen = torch.Generator(device=device).manual_seed(0)
    for n in ns:
        secret, stream = on_device([j * (n // k) for j in range(k)], 0, n, device)  # once: no host copy per call
        for batch in batches:
            step = iter(range(10**9))

            def fused():
                return sparse_parity(1234, next(step) * batch, batch, n, secret, stream=stream, layout=layout,
                                     device=device)

            def plain():
                return baseline(batch, n, secret, gen, layout)

            row = {"n": n, "batch": batch}
            for name, fn in (("fused", fused), ("torch", plain)):
                seconds = timed(fn, device, repeats)
                out_bytes = nbytes(fn())
                row[f"{name}_s"] = seconds
                row[f"{name}_samples_per_s"] = batch / seconds
                row[f"{name}_bytes_per_s"] = out_bytes / seconds
                row[f"{name}_peak_frac"] = out_bytes / seconds / peak if peak else None
            row["speedup"] = row["torch_s"] / row["fused_s"]
            rows.append(row)
            print(_format_row(row), flush=True)
    return rows


def _format_row(r) -> str:
    def side(p):
        frac = f"{100 * r[p + '_peak_frac']:5.1f}%" if r[p + "_peak_frac"] is not None else "    - "
        return f"{r[p + '_samples_per_s'] / 1e6:10.3f} {r[p + '_bytes_per_s'] / 1e9:8.2f} {frac}"
    return f"{r['n']:5d} {r['batch']:8d} | {side('fused')} | {side('torch')} | {r['speedup']:6.2f}x"


def train_step_share(k: int = 3, n: int = 50, width: int = 100, batch: int = 32, lr: float = 0.1,
                     chunk: int = 100, steps: int = 300) -> dict:
    """CPU: seconds of one plain training step vs generating its batch (amortized over `chunk` steps)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(n, width), nn.ReLU(), nn.Linear(width, 1))
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    secret = list(range(k))
    x, y, _ = sparse_parity(0, 0, steps * batch, n, secret, layout="pm1", device="cpu")
    x, y = x.view(steps, batch, n), y.view(steps, batch)

    def train(t):
        loss = (1 - y[t] * model(x[t]).squeeze(-1)).relu().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for t in range(20):
        train(t)
    step_times = []
    for t in range(steps):
        t0 = time.perf_counter()
        train(t)
        step_times.append(time.perf_counter() - t0)
    calls = iter(range(10**9))
    chunk_s = timed(lambda: sparse_parity(0, next(calls) * chunk * batch, chunk * batch, n, secret,
                                          layout="pm1", device="cpu"), torch.device("cpu"), 9)
    single_s = timed(lambda: sparse_parity(0, next(calls) * batch, batch, n, secret, layout="pm1",
                                           device="cpu"), torch.device("cpu"), 51)
    step_s, gen_s = statistics.median(step_times), chunk_s / chunk
    return {"step_s": step_s, "gen_per_step_s": gen_s, "gen_share": gen_s / (step_s + gen_s),
            "gen_per_step_unamortized_s": single_s, "gen_share_unamortized": single_s / (step_s + single_s),
            "chunk_steps": chunk, "n": n, "k": k, "batch": batch, "width": width}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layout", choices=["bits", "pm1", "tokens"], default="bits")
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads, as in train_throughput")
    parser.add_argument("--cpu", action="store_true", help="benchmark the CPU even when CUDA is available")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    if device.type == "cuda":
        name, batches = torch.cuda.get_device_name(device), GPU_BATCHES
        peak = peak_bandwidth(name)
    else:
        name, batches, peak = platform.processor() or platform.machine(), CPU_BATCHES, None
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    fused_backend = "triton" if device.type == "cuda" else "torch (reference)"
    print(f"sparse parity generation on {name} ({device.type}, {torch.get_num_threads()} threads), "
          f"layout={args.layout}, k={args.k}, median of {args.repeats}")
    print(f"fused = kernels.sparse_parity [{fused_backend}]; torch = randint + gather + sum mod 2; "
          f"peak bandwidth: {f'{peak / 1e12:.2f} TB/s' if peak else 'unknown'}")
    print(f"{'n':>5} {'batch':>8} | {'fused':>10} {'':>8} {'':>6} | {'torch':>10} {'':>8} {'':>6} | fused")
    print(f"{'':>5} {'':>8} | {'Msample/s':>10} {'GB/s':>8} {'%peak':>6} | {'Msample/s':>10} {'GB/s':>8} "
          f"{'%peak':>6} | speedup")
    rows = throughput_rows(device, batches, NS, args.k, args.layout, args.repeats, peak)
    speedups = [r["speedup"] for r in rows]
    print(f"fused/torch speedup: median {statistics.median(speedups):.2f}x, "
          f"min {min(speedups):.2f}x, max {max(speedups):.2f}x")

    share = train_step_share()
    print(f"default training step on the CPU (n=50, k=3, width 100, batch 32, hinge, SGD): "
          f"{share['step_s'] * 1e6:.0f} us/step")
    print(f"  data generation, {share['chunk_steps']} steps per call: {share['gen_per_step_s'] * 1e6:.1f} us/step "
          f"= {100 * share['gen_share']:.1f}% of step + generation")
    print(f"  data generation, one call per step:   {share['gen_per_step_unamortized_s'] * 1e6:.1f} us/step "
          f"= {100 * share['gen_share_unamortized']:.1f}%")
    if args.json:
        result = {"device": name, "device_type": device.type, "torch": torch.__version__, "triton": triton_version,
                  "python": platform.python_version(), "threads": torch.get_num_threads(),
                  "fused_backend": fused_backend, "layout": args.layout, "k": args.k, "repeats": args.repeats,
                  "peak_bandwidth_bytes_per_s": peak, "rows": rows,
                  "speedup_median": statistics.median(speedups), "train_step": share}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
