"""Steps to solve sparse parity against the sequential chain's stride b (secret bits folded into each token).

    python scripts/chain_stride.py --out DIR [--kinds transformer mlp] [--strides 1 2 3 4 5 6 7 8]
                                   [--n 30] [--k 8] [--budget 1000] [--seeds 0] [--stop-after-unsolved M]
                                   [--set key=value ...]

One ``python train.py experiment=cot_parity model.kind=KIND data.n=N data.k=K data.chain_stride=B
trainer.max_steps=BUDGET`` per (kind, b, seed): every other setting is the experiment's. Stride b writes
ceil(k / b) chain tokens, each the parity of b more secret bits than the one before; b = 1 is the
sequential chain, b >= k the answer alone. A run stops when it solves (greedy accuracy 100% on the
held-out prompts); one unsolved at the budget counts as "> budget". With ``--stop-after-unsolved M`` a
kind's larger strides are not run once M strides in a row went unsolved by every seed (coarser chains are
assumed no easier). Writes DIR/chain_stride.csv (one row
per run), DIR/chain_stride.md (median steps over seeds) and DIR/chain_stride.png; runs live in DIR/runs/.
Every run's config is checked before the first starts; runs are sweep.py's cells, so a finished run is reused
and a run stopped by SIGTERM or SIGINT continues when the command is given again.
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

from cli import Parser, cell, train, write_outputs  # noqa: E402 (scripts/cli.py, beside this file)
from runtime.cells import Cell, Runner  # noqa: E402 (cli puts the repository on sys.path)

KINDS = ("transformer", "mlp", "linear")
FIELDS = ("kind", "stride", "seed", "solved_step", "steps", "greedy_accuracy", "token_accuracy", "train_wall_s")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--kinds", nargs="+", default=["transformer", "mlp"], choices=KINDS)
    parser.add_argument("--strides", type=int, nargs="+", default=list(range(1, 9)))
    parser.add_argument("--n", type=int, default=30)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--budget", type=int, default=1000, help="training steps per run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--stop-after-unsolved", type=int, default=0, metavar="M",
                        help="skip a kind's larger strides after M unsolved strides in a row (0: run all)")
    parser.add_argument("--set", dest="overrides", nargs="+", default=[], metavar="KEY=VALUE",
                        help="extra train.py overrides for every run, e.g. --set optim.lr=0.003")
    args = parser.parse_args(argv)
    if not all(b >= 1 for b in args.strides):
        parser.error(f"--strides: every stride must be >= 1, got {args.strides}")
    if not 1 <= args.k <= args.n:
        parser.error(f"--k: must be in [1, --n], got {args.k} with --n {args.n}")
    if args.budget < 1:
        parser.error(f"--budget: must be >= 1, got {args.budget}")
    if args.stop_after_unsolved < 0:
        parser.error(f"--stop-after-unsolved: must be >= 0, got {args.stop_after_unsolved}")
    return args


def run_cell(kind: str, stride: int, seed: int, args: argparse.Namespace, out: Path) -> Cell:
    """The train.py run of (kind, stride, seed): the experiment's settings, then --set, then these."""
    values = {"model.kind": kind, "data.n": str(args.n), "data.k": str(args.k), "data.chain_stride": str(stride),
              "seed": str(seed), "trainer.max_steps": str(args.budget)}
    name = f"{kind}-b{stride}-seed{seed}"
    return cell(name, values, ["experiment=cot_parity", *args.overrides], out / "runs" / name)


def median_steps(rows: list[dict]) -> float:
    """Median steps to solve over seeds; unsolved runs count as infinitely many."""
    return statistics.median(r["solved_step"] if r["solved_step"] is not None else math.inf for r in rows)


def table(results: list[dict], args: argparse.Namespace) -> str:
    lines = ["| b | chain tokens | " + " | ".join(f"steps to solve, {kind}" for kind in args.kinds) + " |",
             "|---|---" + "|---" * len(args.kinds) + "|"]
    for b in args.strides:
        cells = []
        for kind in args.kinds:
            rows = [r for r in results if r["kind"] == kind and r["stride"] == b]
            if not rows:
                cells.append("not run (smaller strides unsolved)")
                continue
            steps = median_steps(rows)
            greedy = statistics.median(r["greedy_accuracy"] for r in rows)
            token = statistics.median(r["token_accuracy"] for r in rows)
            cells.append(f"{steps:.0f}" if steps != math.inf
                         else f"> {args.budget} (greedy {greedy:.3f}, token {token:.3f})")
        lines.append(f"| {b} | {math.ceil(args.k / b)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def figure(results: list[dict], args: argparse.Namespace) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(6, 4))
    for kind in args.kinds:
        ran = [b for b in args.strides if any(r["kind"] == kind and r["stride"] == b for r in results)]
        steps = [median_steps([r for r in results if r["kind"] == kind and r["stride"] == b]) for b in ran]
        solved = [(b, s) for b, s in zip(ran, steps) if s != math.inf]
        line, = ax.plot([b for b, _ in solved], [s for _, s in solved], "o-", label=kind if solved else None)
        unsolved = [b for b, s in zip(ran, steps) if s == math.inf]
        ax.plot(unsolved, [args.budget] * len(unsolved), "^", color=line.get_color(), markerfacecolor="none",
                markersize=9, label=f"{kind}: unsolved at budget" if unsolved else None)
    ax.axhline(args.budget, color="grey", linestyle=":", linewidth=1)
    ax.set(xlabel="chain stride b (secret bits per chain token)", ylabel="steps to solve (median over seeds)",
           yscale="log", xticks=args.strides,
           title=f"sparse parity, n = {args.n}, k = {args.k}: steps to 100% greedy accuracy")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def run_grid(args: argparse.Namespace, out: Path) -> list[dict]:
    """Every (kind, stride, seed) run, strides in order, a kind's larger ones skipped per --stop-after-unsolved."""
    cells = {(kind, b, seed): run_cell(kind, b, seed, args, out)
             for kind in args.kinds for b in args.strides for seed in args.seeds}
    results = []
    with Runner().handling_signals() as runner:
        for kind in args.kinds:
            unsolved_in_a_row = 0
            for b in args.strides:
                if args.stop_after_unsolved and unsolved_in_a_row >= args.stop_after_unsolved:
                    break
                for seed in args.seeds:
                    start = time.perf_counter()
                    summary = train(runner, cells[kind, b, seed])
                    row = {"kind": kind, "stride": b, "seed": seed, **{f: summary[f] for f in FIELDS[3:]}}
                    results.append(row)
                    print(f"kind={kind:<11} b={b:<2} seed={seed}: solved_step={row['solved_step']} "
                          f"greedy_accuracy={row['greedy_accuracy']:.4f} ({time.perf_counter() - start:.0f}s)",
                          flush=True)
                solved = any(r["solved_step"] is not None for r in results[-len(args.seeds):])
                unsolved_in_a_row = 0 if solved else unsolved_in_a_row + 1
    return results


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    out = args.out.resolve()
    results = run_grid(args, out)
    markdown = table(results, args)
    write_outputs(out, "chain_stride", results, FIELDS, f"n = {args.n}, k = {args.k}, budget {args.budget} steps, "
                  f"seeds {args.seeds}\n\n{markdown}", figure(results, args))
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
