"""Training throughput: train.py's Lightning step against a plain PyTorch loop, side by side.

    python -m benchmarks.train_throughput [--steps 20000] [--ensemble 1] [--repeats 3] [--json PATH]
                                          [--breakdown] [--compile] [--device cpu|cuda]

The Lightning side is train.py itself (a subprocess; its summary.json gives steps and training wall
time, data generation included). The plain side is the textbook loop doing the identical update —
nn.Linear MLP, hinge loss, torch.optim.SGD — timed twice: drawing each step's batch with torch.randint
(as a plain training script does; train.py pays for its data too), and with all data generated before
the clock starts (it pays for nothing but the update). Rates are member-steps/s: an ensemble of E
counts E per step. Two figures for train.py: the step alone (one evaluation, at the end), and end to end
(evaluations every 500 steps with the hidden-progress measures, over the whole training wall time). ``--compile`` runs train.py with kernels.compile=true. ``--device cuda`` runs both sides
on the GPU (train.py with trainer.accelerator=gpu: its plain-SGD step replays as a CUDA graph).
``--breakdown`` adds, in this process, where an ensemble step's time goes: data generation and the fused
plain-SGD step train.py runs (each eager and C++; on a GPU eager and as a CUDA graph), and the same step as
hand-written gradients + torch.optim.SGD.
"""
import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
BATCH = 32  # the default experiment's batch, used by both sides


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a CUDA clock reads nothing but launches otherwise)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def lightning_rate(steps: int, ensemble: int, threads: int, compile: bool, device: torch.device,
                   end_to_end: bool = False) -> tuple[float, int]:
    """Member-steps/s of `python train.py` on the default experiment, and the steps it ran (an ensemble stops
    early once every member is solved).

    Step only (``end_to_end`` False): one evaluation, at the end, and summary.json's samples_per_s, timed from
    the end of the first batch (start-up excluded; the plain loop likewise starts its clock after building the
    model and the data). End to end: the default evaluation interval with the hidden-progress measures, and the
    whole training loop's wall time (train_wall_s: first batch, evaluations and checkpoints included).
    """
    with tempfile.TemporaryDirectory() as tmp:
        accelerator = "gpu" if device.type == "cuda" else "cpu"
        cmd = [sys.executable, "train.py", f"run_dir={tmp}/run", f"trainer.accelerator={accelerator}",
               f"trainer.max_steps={steps}", f"model.ensemble={ensemble}", f"trainer.cpu_threads={threads}",
               "trainer.progress_bar=false", f"kernels.compile={str(compile).lower()}"]
        if not end_to_end:
            cmd += [f"eval.every_n_steps={steps}", f"checkpoint.every_n_steps={steps}", "eval.hidden_progress=false"]
        subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True)
        summary = json.loads(Path(tmp, "run", "summary.json").read_text())
    if end_to_end:
        return summary["steps"] * ensemble / summary["train_wall_s"], summary["steps"]
    return summary["samples_per_s"] / BATCH, summary["steps"]  # samples = steps x batch x members


def plain_rate(steps: int, with_data: bool, device: torch.device, n: int = 50, width: int = 100,
               batch: int = BATCH, lr: float = 0.1) -> float:
    """Steps/s of the plain loop: forward, hinge loss, backward, SGD step; ``with_data``: each step first
    draws its batch (torch.randint, the label a product of secret columns), else all data is made up front."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(n, width), nn.ReLU(), nn.Linear(width, 1)).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    secret = torch.tensor([0, 1, 2], device=device)
    if not with_data:
        xs = torch.randint(0, 2, (steps, batch, n), device=device).float().mul_(-2).add_(1)
        ys = xs[:, :, secret].prod(-1)
    synchronize(device)
    start = time.perf_counter()
    for t in range(steps):
        if with_data:
            x = torch.randint(0, 2, (batch, n), device=device).float().mul_(-2).add_(1)
            y = x[:, secret].prod(-1)
        else:
            x, y = xs[t], ys[t]
        loss = (1 - y * model(x).squeeze(-1)).relu().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    synchronize(device)
    return steps / (time.perf_counter() - start)


def breakdown(ensemble: int, device: torch.device, steps: int = 100, repeats: int = 5) -> dict[str, float]:
    """Member-steps/s of each part of an ensemble step (best of ``repeats`` runs of ``steps`` steps)."""
    import datamodules, lightning_modules  # noqa: F401,E401  (register the tasks and model families)
    from config import compose
    from datamodules.parity import ParityTask
    from datamodules.stream import Ticket, pm1
    from kernels import mlp_step_cpu
    from lightning_modules.parity_mlp import ParityMLP

    cfg = compose(["experiment=parity_mlp", f"model.ensemble={ensemble}"])
    data, model = ParityTask(cfg), ParityMLP(cfg).to(device)
    ticket = Ticket(0, steps, 0, 1)
    batch = data.generate(ticket, device)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.optim.lr, foreach=True)
    params, lr = list(model.net.parameters()), cfg.optim.lr

    def optimizer_steps() -> None:
        for j in range(steps):
            for p, grad in zip(params, model.loss_and_grads(pm1(batch.x[:, j]), batch.y[:, j])[1]):
                p.grad = grad
            opt.step()

    parts = {"data generation": lambda: data.generate(ticket, device)}
    if device.type == "cuda":  # train.py's step is the graph; a key's first call is eager, its second captures
        graphed = ParityMLP(cfg).to(device)
        parts["fused SGD step, eager"] = lambda: model.plain_sgd_steps(batch.x, batch.y, lr)
        parts["fused SGD step as a CUDA graph (train.py)"] = \
            lambda: graphed.plain_sgd_steps(batch.x, batch.y, lr, path="cuda_graph")
    else:
        compiled_cfg = compose(["experiment=parity_mlp", f"model.ensemble={ensemble}", "kernels.compile=true"])
        compiled = ParityTask(compiled_cfg)
        compiled_model = ParityMLP.build(compiled_cfg, compiled)  # the family hands the task kernels.compile
        parts["data generation, C++ (kernels.compile)"] = lambda: compiled.generate(ticket, device)
        parts["fused SGD step (train.py)"] = lambda: model.plain_sgd_steps(batch.x, batch.y, lr)
        if mlp_step_cpu.extension() is not None:
            parts["fused SGD step, C++ (kernels.compile)"] = \
                lambda: compiled_model.plain_sgd_steps(batch.x, batch.y, lr, path="cpp")
    parts["gradients + torch.optim.SGD"] = optimizer_steps
    rates, warm_up = {}, 2 if device.type == "cuda" else 1  # on a GPU the second run captures the graph
    for name, part in parts.items():
        times = []
        for _ in range(repeats + warm_up):
            synchronize(device)
            start = time.perf_counter()
            part()
            synchronize(device)
            times.append(time.perf_counter() - start)
        rates[name] = steps * ensemble / min(times[warm_up:])
    return rates


def library_versions() -> dict[str, str | None]:
    """Versions of triton and lightning, None where one is missing."""
    from importlib.metadata import PackageNotFoundError, version
    versions = {}
    for name in ("triton", "lightning"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    return versions


def cpu_name() -> str:
    """The CPU's model name (Linux), else the platform's processor string."""
    try:
        line = next(ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("model name"))
        return line.split(":", 1)[1].strip()
    except (OSError, StopIteration):
        return platform.processor()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20000)
    parser.add_argument("--ensemble", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads, the same on both sides")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--breakdown", action="store_true", help="also time the parts of an ensemble step")
    parser.add_argument("--compile", action="store_true", help="train.py with kernels.compile=true (C++ data "
                        "generation and SGD step; their one-off build is start-up, outside the rate)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where both sides train")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.exit(2, "error: --device cuda: no CUDA device is available\n")
    device = torch.device(args.device)
    # similar wall time per side; an ensemble runs >= 10000 steps, so its one evaluation (E x 8192 held-out
    # samples, at the end) and first batch stay small parts of it
    lightning_steps = max(100 if args.ensemble == 1 else 10000, args.steps // args.ensemble // 100 * 100)
    torch.set_num_threads(args.threads)
    # end to end: evaluations every 500 steps; seed 0's single model solves (50, 3) at step 5000, so 4000 steps
    # are never cut short; an ensemble may stop early once every member is solved (its rate counts the steps run)
    e2e_steps = 4000 if args.ensemble == 1 else lightning_steps
    ours, ours_e2e, plain, plain_data, e2e_run = [], [], [], [], []
    for _ in range(args.repeats):  # interleaved, so drifting machine load hits all sides alike
        plain.append(plain_rate(args.steps, with_data=False, device=device))
        plain_data.append(plain_rate(args.steps, with_data=True, device=device))
        ours.append(lightning_rate(lightning_steps, args.ensemble, args.threads, args.compile, device)[0])
        rate, steps = lightning_rate(e2e_steps, args.ensemble, args.threads, args.compile, device, end_to_end=True)
        ours_e2e.append(rate)
        e2e_run.append(steps)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    result = {
        "device": gpu or platform.processor() or platform.machine(), "device_type": device.type, "cpu": cpu_name(),
        "threads": torch.get_num_threads(), "torch": torch.__version__, **library_versions(),
        "ensemble": args.ensemble, "compile": args.compile, "repeats": args.repeats,
        "plain_steps_per_s": statistics.median(plain), "plain_with_data_steps_per_s": statistics.median(plain_data),
        "train_py_member_steps_per_s": statistics.median(ours),
        "train_py_end_to_end_member_steps_per_s": statistics.median(ours_e2e), "end_to_end_steps": e2e_steps,
        "end_to_end_steps_run": e2e_run,
    }
    result["ratio"] = result["train_py_member_steps_per_s"] / result["plain_steps_per_s"]
    result["ratio_with_data"] = result["train_py_member_steps_per_s"] / result["plain_with_data_steps_per_s"]
    result["ratio_end_to_end"] = result["train_py_end_to_end_member_steps_per_s"] / result["plain_steps_per_s"]
    where = gpu or f"CPU, {result['threads']} threads"
    print(f"default parity MLP (n=50, width 100, batch 32, SGD), {where}, median of {args.repeats}")
    print(f"  plain PyTorch loop, data made up front   {result['plain_steps_per_s']:10.0f} steps/s")
    print(f"  plain PyTorch loop, data drawn each step {result['plain_with_data_steps_per_s']:10.0f} steps/s")
    print(f"  train.py (E={args.ensemble}{', kernels.compile' if args.compile else ''})"
          f"{'':{max(0, 25 - len(str(args.ensemble)) - 15 * args.compile)}}"
          f"{result['train_py_member_steps_per_s']:10.0f} member-steps/s (its data generation included)")
    print(f"  ratio to the loop with its data made up front {result['ratio']:6.2f}x")
    print(f"  ratio to the loop drawing its data            {result['ratio_with_data']:6.2f}x")
    print(f"  end to end (train_wall_s: evaluations every 500 steps with the hidden-progress measures, "
          f"{e2e_steps} steps, run: {', '.join(map(str, e2e_run))})")
    print(f"    train.py {result['train_py_end_to_end_member_steps_per_s']:10.0f} member-steps/s = "
          f"{result['ratio_end_to_end']:.2f}x the loop with its data made up front")
    if args.breakdown:
        result["breakdown_member_steps_per_s"] = breakdown(args.ensemble, device)
        print(f"  parts of an E={args.ensemble} step, in process (best of 5):")
        for name, rate in result["breakdown_member_steps_per_s"].items():
            print(f"    {name:42s}{rate:10.0f} member-steps/s ({rate / result['plain_steps_per_s']:.1f}x)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
