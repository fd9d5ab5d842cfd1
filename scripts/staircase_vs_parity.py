"""Leap complexity: steps to solve the k-step staircase and the k-sparse parity, against k and against n.

    python scripts/staircase_vs_parity.py --out DIR [--k 2 3 4 5 6 7 8] [--n 20 30 40 50 60 80]
                                          [--at-n 50] [--at-k 5] [--budget 20000] [--jobs J]

Two sweep.py grids of ``experiment=staircase_mlp`` (16 members a cell, square loss, SGD lr 0.05), each over
data.task=staircase,parity: one against k at n = --at-n (DIR/vs_k), one against n at k = --at-k
(DIR/vs_n). Both tasks draw the same secret from the seed, so the parity is the staircase's top monomial.
Members unsolved at the budget are censored there (counted as more than the budget). Finished cells are
reused, so the command resumes. Writes DIR/staircase_vs_parity.md (median steps and solved members per
cell, and the fraction solved within 5000 steps at (--at-n, --at-k)) and DIR/staircase_vs_parity.png.
"""
import argparse
import csv
import math
import statistics
import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from cli import Parser  # noqa: E402 (scripts/cli.py, beside this file)

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("staircase", "parity")
EARLY = 5000  # the step count at which the two are compared member by member


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--k", type=int, nargs="+", default=[2, 3, 4, 5, 6, 7, 8])
    parser.add_argument("--n", type=int, nargs="+", default=[20, 30, 40, 50, 60, 80])
    parser.add_argument("--at-n", type=int, default=50, help="n of the sweep against k")
    parser.add_argument("--at-k", type=int, default=5, help="k of the sweep against n")
    parser.add_argument("--budget", type=int, default=20000, help="training steps per cell")
    parser.add_argument("--jobs", type=int, default=1, help="cells run at once")
    args = parser.parse_args(argv)
    if not all(1 <= k <= args.at_n for k in args.k):
        parser.error(f"--k: every k must be in [1, --at-n ({args.at_n})], got {args.k}")
    if not all(n >= args.at_k for n in args.n):
        parser.error(f"--n: every n must be >= --at-k ({args.at_k}), got {args.n}")
    return args


def sweep(out: Path, axis: str, values: list[int], fixed: str, budget: int, jobs: int) -> list[dict]:
    """Run (or reuse) one sweep.py grid; its results.csv rows (one per member)."""
    cmd = [sys.executable, "sweep.py", "experiment=staircase_mlp", f"trainer.max_steps={budget}", fixed,
           "--grid", f"data.task={','.join(TASKS)}", "--grid", f"{axis}={','.join(map(str, values))}",
           "--out", str(out), "--jobs", str(jobs)]
    print("$ python " + " ".join(cmd[1:]), flush=True)
    if subprocess.run(cmd, cwd=ROOT).returncode != 0:
        sys.exit(f"error: {' '.join(cmd[1:])} failed")
    with open(out / "results.csv") as f:
        return list(csv.DictReader(f))


def steps(rows: list[dict], task: str, key: str, value: int) -> list[float]:
    """Members' solved steps of one cell, +inf where censored."""
    return [float(r["solved_step"]) if r["solved_step"] else math.inf
            for r in rows if r["data.task"] == task and int(r[key]) == value]


def cell(found: list[float], budget: int) -> str:
    median = statistics.median(found)
    shown = f"{median:.0f}" if math.isfinite(median) else f"> {budget}"
    return f"{shown} ({sum(map(math.isfinite, found))}/{len(found)})"


def table(rows: list[dict], key: str, values: list[int], budget: int) -> list[str]:
    name = key.split(".")[1]
    lines = [f"| {name} | staircase | parity |", "|---|---|---|"]
    lines += [f"| {v} | " + " | ".join(cell(steps(rows, t, key, v), budget) for t in TASKS) + " |" for v in values]
    return lines


def panel(ax, rows: list[dict], key: str, values: list[int], budget: int, title: str) -> None:
    for i, task in enumerate(TASKS):
        medians = [statistics.median(steps(rows, task, key, v)) for v in values]
        for v in values:
            found = steps(rows, task, key, v)
            done = [s for s in found if math.isfinite(s)]
            ax.plot([v] * len(done), done, ".", color=f"C{i}", alpha=0.3, ms=3)
        solved = [(v, m) for v, m in zip(values, medians) if math.isfinite(m)]
        ax.plot([v for v, _ in solved], [m for _, m in solved], "o-", color=f"C{i}", label=f"{task} (median)")
        censored = [v for v, m in zip(values, medians) if not math.isfinite(m)]
        ax.plot(censored, [budget] * len(censored), "^", color=f"C{i}", markerfacecolor="none", ms=9,
                label=f"{task}: median censored" if censored else None)
    ax.axhline(budget, color="grey", linestyle=":", linewidth=1)
    ax.set(xlabel=key, ylabel="steps to solve", yscale="log", xticks=values, title=title)
    ax.legend(fontsize=8)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    out = args.out.resolve()
    by_k = sweep(out / "vs_k", "data.k", args.k, f"data.n={args.at_n}", args.budget, args.jobs)
    by_n = sweep(out / "vs_n", "data.n", args.n, f"data.k={args.at_k}", args.budget, args.jobs)
    lines = [f"Steps to solve, median over members (members solved within {args.budget} steps / members).", "",
             f"Against k at n = {args.at_n}:", "", *table(by_k, "data.k", args.k, args.budget), "",
             f"Against n at k = {args.at_k}:", "", *table(by_n, "data.n", args.n, args.budget), ""]
    if args.at_k in args.k:
        early = {t: steps(by_k, t, "data.k", args.at_k) for t in TASKS}
        lines.append(f"Solved within {EARLY} steps at (n, k) = ({args.at_n}, {args.at_k}): " + ", ".join(
            f"{t} {sum(s <= EARLY for s in found)}/{len(found)}" for t, found in early.items()))
    markdown = "\n".join(lines) + "\n"
    (out / "staircase_vs_parity.md").write_text(markdown)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    panel(axes[0], by_k, "data.k", args.k, args.budget, f"n = {args.at_n}")
    panel(axes[1], by_n, "data.n", args.n, args.budget, f"k = {args.at_k}")
    fig.suptitle("staircase (leap 1) vs sparse parity: steps to solve (dots: members)")
    fig.tight_layout()
    fig.savefig(out / "staircase_vs_parity.png", dpi=120)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
