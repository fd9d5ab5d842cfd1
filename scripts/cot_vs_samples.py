"""Chain of thought against sample size: held-out greedy accuracy of next-token models on (n, k) sparse parity against
the size N of a finite training set, with the sequential chain and with the answer alone, and the endless stream as
the last column.

    python scripts/cot_vs_samples.py --out DIR [--kinds transformer mlp] [--chains sequential none]
                                     [--sizes 256 1024 4096 16384] [--budget 1000] [--set key=value ...]

One ``python train.py experiment=cot_parity model.kind=K data.chain=C data.train_size=N trainer.max_steps=BUDGET``
per (kind, chain, N), and one without data.train_size per (kind, chain); every other setting is the experiment's
((n, k) = (30, 8), batch 64, AdamW) unless --set changes it. A run stops once solved (greedy accuracy 100% on the
held-out prompts); each evaluation also measures the greedy accuracy on the training set's first min(N, eval.size)
prompts (fit_step: the first at 100%). Writes DIR/cot_vs_samples.csv (one row per run), DIR/cot_vs_samples.md
(solved_step, or the final held-out greedy accuracy, per cell; the smallest N at which each chain solves) and
DIR/cot_vs_samples.png. Runs are sweep.py's cells in DIR/runs/, reused once finished.
"""
import argparse
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from cli import Parser, cell, train, write_outputs  # noqa: E402 (scripts/cli.py, beside this file)
from runtime.cells import Cell, Runner  # noqa: E402 (cli puts the repository on sys.path)

ONLINE = 0  # the size column of the endless stream
FIELDS = ("kind", "chain", "train_size", "solved_step", "fit_step", "greedy_accuracy", "final_train_accuracy",
          "token_accuracy", "steps", "train_wall_s")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--kinds", nargs="+", default=["transformer", "mlp"], choices=["transformer", "mlp", "linear"])
    parser.add_argument("--chains", nargs="+", default=["sequential", "none"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 1024, 4096, 16384])
    parser.add_argument("--budget", type=int, default=1000, help="training steps per run")
    parser.add_argument("--set", dest="overrides", nargs="+", default=[], metavar="KEY=VALUE",
                        help="extra train.py overrides for every run, e.g. --set eval.size=1024")
    return parser.parse_args(argv)


def run_cell(kind: str, chain: str, size: int, args: argparse.Namespace, out: Path) -> Cell:
    values = {"model.kind": kind, "data.chain": chain, "trainer.max_steps": str(args.budget)}
    if size != ONLINE:
        values["data.train_size"] = str(size)
    name = f"{kind}-{chain}-{f'N{size}' if size else 'online'}"
    return cell(name, values, ["experiment=cot_parity", "checkpoint.every_n_steps=100000", *args.overrides],
                out / "runs" / name)


def run_grid(args: argparse.Namespace, out: Path) -> list[dict]:
    cells = {(kind, chain, size): run_cell(kind, chain, size, args, out)
             for kind in args.kinds for chain in args.chains for size in [*sorted(args.sizes), ONLINE]}
    rows = []
    with Runner().handling_signals() as runner:
        for (kind, chain, size), run in cells.items():
            start = time.perf_counter()
            summary = train(runner, run)
            rows.append({"kind": kind, "chain": chain, "train_size": size, **{f: summary.get(f) for f in FIELDS[3:]}})
            print(f"{run.name}: solved_step={summary['solved_step']} greedy={summary['greedy_accuracy']:.4f} "
                  f"fit_step={summary.get('fit_step')} ({time.perf_counter() - start:.0f} s)", flush=True)
    return rows


def shown(row: dict) -> str:
    fit = f", fit {row['fit_step']}" if row["train_size"] and row["fit_step"] is not None else ""
    if row["solved_step"] is not None:
        return f"**solved at {row['solved_step']}**{fit}"
    return f"{row['greedy_accuracy']:.3f}{fit}"


def tables(rows: list[dict], args: argparse.Namespace) -> str:
    sizes = sorted(args.sizes)
    lines = [f"Budget {args.budget} steps; overrides: {' '.join(args.overrides) or 'none'}. Each cell: the step "
             "at which the run solved, else its final held-out greedy accuracy; fit: first evaluation at 100% "
             "on the training set.", "",
             "| model | chain | " + " | ".join(f"N = {s}" for s in sizes) + " | online |",
             "|---|---|" + "---|" * (len(sizes) + 1)]
    for kind in args.kinds:
        for chain in args.chains:
            found = {r["train_size"]: r for r in rows if r["kind"] == kind and r["chain"] == chain}
            lines.append(f"| {kind} | {chain} | " + " | ".join(shown(found[s]) for s in [*sizes, ONLINE]) + " |")
    lines += ["", "Smallest N at which the run solves:", "", "| model | " + " | ".join(args.chains) + " |",
              "|---|" + "---|" * len(args.chains)]
    for kind in args.kinds:
        smallest = []
        for chain in args.chains:
            solved = [s for s in sizes if any(r["kind"] == kind and r["chain"] == chain and r["train_size"] == s
                                              and r["solved_step"] is not None for r in rows)]
            smallest.append(str(solved[0]) if solved else f"> {sizes[-1]}")
        lines.append(f"| {kind} | " + " | ".join(smallest) + " |")
    return "\n".join(lines) + "\n"


def figure(rows: list[dict], args: argparse.Namespace) -> plt.Figure:
    sizes = sorted(args.sizes)
    online_x = sizes[-1] * 4
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, (kind, chain) in enumerate((k, c) for k in args.kinds for c in args.chains):
        found = {r["train_size"]: r for r in rows if r["kind"] == kind and r["chain"] == chain}
        ax.plot([*sizes, online_x], [found[s]["greedy_accuracy"] for s in [*sizes, ONLINE]], marker="o",
                color=f"C{args.kinds.index(kind)}", linestyle="-" if chain != "none" else "--",
                label=f"{kind}, chain = {chain}")
    ax.set_xscale("log", base=2)
    ax.set_xticks([*sizes, online_x], [*map(str, sizes), "online"])
    ax.set(xlabel="training set size N", ylabel="held-out greedy accuracy (final)", ylim=(0.4, 1.02),
           title="(30, 8) parity: chain of thought against sample size")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    out = args.out.resolve()
    start = time.perf_counter()
    rows = run_grid(args, out)
    markdown = tables(rows, args)
    write_outputs(out, "cot_vs_samples", rows, FIELDS, markdown, figure(rows, args))
    print(markdown + f"\n({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
