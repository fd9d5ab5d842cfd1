"""One training step of each next-token family against the sequence length T: time, peak memory, and the memory
check's estimate (runtime/memory.py), on circuit chains of growing length.

    python -m benchmarks.next_token_length [--cases c17 c432 c499 c6288:N6123 c6288] [--kinds linear mlp transformer]
                                           [--batch 64] [--steps 3] [--set key=value ...] [--json PATH]

A case is ``experiment=circuit_gates data.netlist=NAME`` (``NAME:OUTPUT`` keeps one output's cone), so T is the
circuit's chain length. Each (case, kind) runs in a fresh process: it builds the run as train.py does, takes one
warm-up AdamW step on a batch of the task's samples and times ``--steps`` more (median), and reports the growth of
its peak resident memory over what it held before building (ru_maxrss), beside the family's footprint estimate.
"""
import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("linear", "mlp", "transformer")


def rss_mib() -> float:
    """This process's current resident memory, MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def one(case: str, kind: str, batch: int, steps: int, overrides: list[str]) -> dict:
    """Measure one (case, kind) in this process."""
    sys.path.insert(0, str(ROOT))
    import torch
    import datamodules  # noqa: F401
    import lightning_modules  # noqa: F401
    from config import compose
    from lightning_modules.next_token import completion_loss
    from runtime.experiment import build
    from runtime.memory import footprint

    torch.set_num_threads(1)
    netlist, _, output = case.partition(":")
    args = ["experiment=circuit_gates", f"data.netlist={netlist}", f"model.kind={kind}", f"data.batch_size={batch}",
            "eval.size=64", *([f"data.outputs=[{output}]"] if output else []), *overrides]
    cfg = compose(args)
    before = rss_mib()
    dm, module = build(cfg)
    net = module.backbones[0]
    tokens = dm.sample(0, batch, 0, torch.device("cpu"))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        loss = completion_loss(net(tokens), tokens, dm.prompt_len)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    estimate = sum(term.bytes for term in footprint(cfg)) / 2**20
    return {"case": case, "kind": kind, "seq_len": dm.seq_len, "batch": batch,
            "parameters": sum(p.numel() for p in net.parameters()), "step_s": round(statistics.median(times[1:]), 4),
            "peak_growth_mib": round(peak - before, 1), "estimate_mib": round(estimate, 1)}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=["c17", "c432", "c499", "c6288:N6123", "c6288"])
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--set", dest="overrides", nargs="+", default=[], metavar="KEY=VALUE")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--one", nargs=2, metavar=("CASE", "KIND"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(one(*args.one, args.batch, args.steps, args.overrides)))
        return 0
    rows = []
    print("| case | kind | T | parameters | step (s) | peak memory growth (MiB) | estimate (MiB) |\n"
          "|---|---|---|---|---|---|---|")
    for case in args.cases:
        for kind in args.kinds:
            done = subprocess.run([sys.executable, "-m", "benchmarks.next_token_length", "--one", case, kind,
                                   "--batch", str(args.batch), "--steps", str(args.steps),
                                   *(["--set", *args.overrides] if args.overrides else [])],
                                  cwd=ROOT, capture_output=True, text=True)
            if done.returncode:
                print(f"| {case} | {kind} | failed: {done.stderr.strip().splitlines()[-1]} |", flush=True)
                continue
            row = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"| {case} | {kind} | {row['seq_len']} | {row['parameters']:,} | {row['step_s']} | "
                  f"{row['peak_growth_mib']} | {row['estimate_mib']} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"machine": platform.processor() or platform.machine(), "rows": rows},
                                        indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
