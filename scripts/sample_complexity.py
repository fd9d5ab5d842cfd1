"""Sample complexity of the MLP on (n, k) sparse parity: success probability and steps to solve against the size N
of a finite training set, for dense and sparse initialization at several widths (the data axis of Edelman et
al. 2023's Pareto frontier), with the endless stream as the last column.

    python scripts/sample_complexity.py --out DIR [--n 20] [--k 3] [--sizes 128 256 ... 8192] [--widths 100 1000]
                                        [--inits dense sparse] [--weight-decay 0.0] [--budget 10000] [--every 250]
                                        [--members 16] [--set key=value ...]

One ``python train.py experiment=pareto_<init> model.width=W data.train_size=N`` run per (init, width, N), and one
without ``data.train_size`` per (init, width): 16 members a run (the seeds), the experiment's optimizer (SGD lr 0.1,
batch 32, hinge loss), a step budget and an evaluation every --every steps, which also measures the fit on the
training set. A member is solved at 100% on the 8192 held-out samples, fit at 100% on its training set's first
min(N, 8192) samples. Writes DIR/sample_complexity.csv (one row per member), DIR/sample_complexity.md (per cell:
members solved with the Clopper-Pearson 95% interval, median steps to solve and to fit; per init and width the
smallest N at which at least half the members solve) and DIR/sample_complexity.png. Runs are sweep.py's cells in
DIR/runs/, reused once finished, so the command resumes.
"""
import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from cli import Parser, cell, per_member, train, write_outputs  # noqa: E402 (scripts/cli.py, beside this file)
from metrics.scaling import clopper_pearson  # noqa: E402 (cli puts the repository on sys.path)
from runtime.cells import Cell, Runner  # noqa: E402

ONLINE = 0  # the size column of the endless stream
FIELDS = ("init", "width", "train_size", "member", "solved_step", "fit_step", "final_accuracy",
          "final_train_accuracy", "steps", "train_wall_s")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256, 512, 1024, 2048, 4096, 8192])
    parser.add_argument("--widths", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--inits", nargs="+", default=["dense", "sparse"], choices=["dense", "sparse"])
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--budget", type=int, default=10000, help="training steps per run")
    parser.add_argument("--every", type=int, default=250, help="steps between evaluations")
    parser.add_argument("--members", type=int, default=16, help="ensemble members (seeds) per run")
    parser.add_argument("--set", dest="overrides", nargs="+", default=[], metavar="KEY=VALUE",
                        help="extra train.py overrides for every run")
    args = parser.parse_args(argv)
    if min(args.sizes) < 32:  # the experiments' batch
        parser.error(f"--sizes: every size must be at least a batch (32), got {min(args.sizes)}")
    if not 1 <= args.k <= args.n:
        parser.error(f"--k: must be in [1, --n ({args.n})], got {args.k}")
    return args


def run_cell(init: str, width: int, size: int, args: argparse.Namespace, out: Path) -> Cell:
    values = {"model.width": str(width), "trainer.max_steps": str(args.budget), "eval.every_n_steps": str(args.every),
              "optim.weight_decay": str(args.weight_decay)}
    if size != ONLINE:
        values["data.train_size"] = str(size)
    name = f"{init}-w{width}-{f'N{size}' if size else 'online'}"
    fixed = [f"experiment=pareto_{init}", f"data.n={args.n}", f"data.k={args.k}", f"model.ensemble={args.members}",
             "checkpoint.every_n_steps=100000", *args.overrides]
    return cell(name, values, fixed, out / "runs" / name)


def run_grid(args: argparse.Namespace, out: Path) -> list[dict]:
    """Every member of every (init, width, size) run, one row each."""
    cells = {(init, width, size): run_cell(init, width, size, args, out)
             for init in args.inits for width in args.widths for size in [*args.sizes, ONLINE]}
    rows = []
    with Runner().handling_signals() as runner:
        for (init, width, size), run in cells.items():
            start = time.perf_counter()
            summary = train(runner, run)
            fits = per_member(summary, "fit_step") if size else [None] * len(summary["members"])
            train_acc = per_member(summary, "final_train_accuracy") if size else [None] * len(summary["members"])
            for member, solved, fit, acc, train_a in zip(summary["members"], per_member(summary, "solved_step"), fits,
                                                        per_member(summary, "final_accuracy"), train_acc):
                rows.append({"init": init, "width": width, "train_size": size, "member": member, "solved_step": solved,
                             "fit_step": fit, "final_accuracy": acc, "final_train_accuracy": train_a,
                             "steps": summary["steps"], "train_wall_s": summary["train_wall_s"]})
            done = sum(s is not None for s in per_member(summary, "solved_step"))
            print(f"{run.name}: {done}/{len(summary['members'])} solved ({time.perf_counter() - start:.0f} s)",
                  flush=True)
    return rows


def cell_rows(rows: list[dict], init: str, width: int, size: int) -> list[dict]:
    return [r for r in rows if r["init"] == init and r["width"] == width and r["train_size"] == size]


def median_of(rows: list[dict], key: str) -> float:
    """Median over members, a member without the event counting as infinitely late."""
    return statistics.median(r[key] if r[key] is not None else math.inf for r in rows)


def shown(steps: float, budget: int) -> str:
    return f"{steps:.0f}" if math.isfinite(steps) else f"> {budget}"


def smallest_size(rows: list[dict], init: str, width: int, sizes: list[int]) -> str:
    """The smallest N at which at least half the members solve."""
    for size in sizes:
        found = cell_rows(rows, init, width, size)
        if 2 * sum(r["solved_step"] is not None for r in found) >= len(found):
            return str(size)
    return f"> {sizes[-1]}"


def tables(rows: list[dict], args: argparse.Namespace) -> str:
    sizes = sorted(args.sizes)
    lines = [f"(n, k) = ({args.n}, {args.k}), {args.members} members a cell, budget {args.budget} steps, "
             f"evaluated every {args.every}, weight decay {args.weight_decay}.", "",
             "Members solved (Clopper-Pearson 95% interval); median steps to solve / to fit the training set:", "",
             "| init | width | " + " | ".join(f"N = {s}" for s in sizes) + " | online |",
             "|---|---|" + "---|" * (len(sizes) + 1)]
    for init in args.inits:
        for width in args.widths:
            cells = []
            for size in [*sizes, ONLINE]:
                found = cell_rows(rows, init, width, size)
                solved = sum(r["solved_step"] is not None for r in found)
                low, high = clopper_pearson(solved, len(found))
                fit = f" / {shown(median_of(found, 'fit_step'), args.budget)}" if size else ""
                cells.append(f"{solved}/{len(found)} [{low:.2f}, {high:.2f}]; "
                             f"{shown(median_of(found, 'solved_step'), args.budget)}{fit}")
            lines.append(f"| {init} | {width} | " + " | ".join(cells) + " |")
    lines += ["", "Smallest N at which at least half the members solve:", "",
              "| init | " + " | ".join(f"width {w}" for w in args.widths) + " |", "|---|" + "---|" * len(args.widths)]
    lines += [f"| {init} | " + " | ".join(smallest_size(rows, init, w, sizes) for w in args.widths) + " |"
              for init in args.inits]
    return "\n".join(lines) + "\n"


def figure(rows: list[dict], args: argparse.Namespace) -> plt.Figure:
    sizes = sorted(args.sizes)
    online_x = sizes[-1] * 4  # the endless stream, drawn right of the largest N
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, (init, width) in enumerate((init, width) for init in args.inits for width in args.widths):
        xs = [*sizes, online_x]
        found = [cell_rows(rows, init, width, size) for size in [*sizes, ONLINE]]
        solved = [sum(r["solved_step"] is not None for r in f) for f in found]
        p = [s / len(f) for s, f in zip(solved, found)]
        intervals = [clopper_pearson(s, len(f)) for s, f in zip(solved, found)]
        style = {"color": f"C{i}", "linestyle": "-" if init == "dense" else "--", "marker": "o"}
        left.errorbar(xs, p, yerr=[[q - lo for q, (lo, _) in zip(p, intervals)],
                                   [hi - q for q, (_, hi) in zip(p, intervals)]],
                      capsize=3, label=f"{init}, width {width}", **style)
        medians = [median_of(f, "solved_step") for f in found]
        right.plot([x for x, m in zip(xs, medians) if math.isfinite(m)], [m for m in medians if math.isfinite(m)],
                   label=f"{init}, width {width}", **style)
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xticks([*sizes, online_x], [*map(str, sizes), "online"])
        ax.set_xlabel("training set size N")
    left.set(ylabel="fraction of members solved", ylim=(-0.03, 1.03),
             title=f"({args.n}, {args.k}) parity: success probability (95% CP)")
    right.set(ylabel="median steps to solve (solved cells)", yscale="log", title="steps to solve")
    left.legend(fontsize=8)
    fig.tight_layout()
    return fig


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    out = args.out.resolve()
    start = time.perf_counter()
    rows = run_grid(args, out)
    markdown = tables(rows, args)
    write_outputs(out, "sample_complexity", rows, FIELDS, markdown, figure(rows, args))
    print(markdown + f"\n({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
