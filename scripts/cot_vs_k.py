"""Steps to solve sparse parity against k at fixed n, with and without chain of thought.

    python scripts/cot_vs_k.py --out DIR [--k 2 3 4 6 8 12] [--budget 3000] [--chains none sequential tree gates]
                               [--seeds 0] [--set key=value ...]

One ``python train.py experiment=cot_parity data.chain=C data.k=K trainer.max_steps=BUDGET`` per
(chain, k, seed): every other setting is the experiment's (n = 30, the same transformer and optimizer).
A run stops when it solves (greedy accuracy 100% on the 8192 held-out prompts); one still unsolved at the
budget counts as "> budget". Writes DIR/cot_vs_k.csv (one row per run), DIR/cot_vs_k.md (median steps
over seeds), DIR/cot_vs_k.png and TensorBoard figures and scalars under DIR/tb; runs live in DIR/runs/.
Every run's config is checked before the first starts; runs are sweep.py's cells, so a finished run is reused
and a run stopped by SIGTERM or SIGINT continues when the command is given again.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from torch.utils.tensorboard import SummaryWriter  # noqa: E402

from cli import Parser, cell, train, write_outputs  # noqa: E402 (scripts/cli.py, beside this file)
from datamodules.parity_config import CHAINS  # noqa: E402 (cli puts the repository on sys.path)
from runtime.cells import Cell, Runner  # noqa: E402

N = 30  # configs/experiment/cot_parity.yaml
FIELDS = ("chain", "k", "seed", "solved_step", "steps", "greedy_accuracy", "token_accuracy", "chain_accuracy",
          "train_wall_s", "tokens_per_s")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--k", type=int, nargs="+", default=[2, 3, 4, 6, 8, 12])
    parser.add_argument("--budget", type=int, default=3000, help="training steps per run")
    parser.add_argument("--chains", nargs="+", default=["none", "sequential"], choices=CHAINS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--set", dest="overrides", nargs="+", default=[], metavar="KEY=VALUE",
                        help="extra train.py overrides for every run, e.g. --set model.d_model=32")
    args = parser.parse_args(argv)
    if not all(1 <= k <= N for k in args.k):
        parser.error(f"--k: every k must be in [1, {N}], got {args.k}")
    if args.budget < 1:
        parser.error(f"--budget: must be >= 1, got {args.budget}")
    return args


def run_cell(chain: str, k: int, seed: int, args: argparse.Namespace, out: Path) -> Cell:
    """The train.py run of (chain, k, seed): the experiment's settings, then --set, then these."""
    values = {"data.chain": chain, "data.k": str(k), "seed": str(seed), "trainer.max_steps": str(args.budget)}
    name = f"{chain}-k{k}-seed{seed}"
    return cell(name, values, ["experiment=cot_parity", *args.overrides], out / "runs" / name)


def run_grid(args: argparse.Namespace, out: Path) -> list[dict]:
    """Every (chain, k, seed) run, one row each."""
    cells = {(chain, k, seed): run_cell(chain, k, seed, args, out)
             for chain in args.chains for k in args.k for seed in args.seeds}
    results = []
    with Runner().handling_signals() as runner:
        for (chain, k, seed), run in cells.items():
            start = time.perf_counter()
            summary = train(runner, run)
            row = {"chain": chain, "k": k, "seed": seed, **{f: summary[f] for f in FIELDS[3:]}}
            results.append(row)
            print(f"chain={chain:<10} k={k:<3} seed={seed}: solved_step={row['solved_step']} "
                  f"greedy_accuracy={row['greedy_accuracy']:.4f} ({time.perf_counter() - start:.0f}s)", flush=True)
    return results


def median_steps(rows: list[dict]) -> float:
    """Median steps to solve over seeds; unsolved runs count as infinitely many."""
    return statistics.median(r["solved_step"] if r["solved_step"] is not None else float("inf") for r in rows)


def table(results: list[dict], ks: list[int], chains: list[str], budget: int) -> str:
    head = "| k | " + " | ".join(f"steps to solve, chain={c}" for c in chains) + " |"
    lines = [head, "|---" * (len(chains) + 1) + "|"]
    for k in ks:
        cells = []
        for chain in chains:
            rows = [r for r in results if r["chain"] == chain and r["k"] == k]
            steps = median_steps(rows)
            accuracy = statistics.median(r["greedy_accuracy"] for r in rows)
            cells.append(f"{steps:.0f}" if steps != float("inf") else f"> {budget} (greedy acc {accuracy:.3f})")
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def figure(results: list[dict], ks: list[int], chains: list[str], budget: int) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(6, 4))
    for chain in chains:
        steps = [median_steps([r for r in results if r["chain"] == chain and r["k"] == k]) for k in ks]
        solved = [(k, s) for k, s in zip(ks, steps) if s != float("inf")]
        line, = ax.plot([k for k, _ in solved], [s for _, s in solved], "o-",
                        label=f"chain = {chain}" if solved else None)
        unsolved = [k for k, s in zip(ks, steps) if s == float("inf")]
        ax.plot(unsolved, [budget] * len(unsolved), "^", color=line.get_color(), markerfacecolor="none",
                markersize=9, label=f"chain = {chain}: unsolved at budget" if unsolved else None)
    ax.axhline(budget, color="grey", linestyle=":", linewidth=1)
    ax.set(xlabel="k (secret size)", ylabel="steps to solve (median over seeds)", yscale="log", xticks=ks,
           title=f"sparse parity, n = {N}: steps to 100% greedy accuracy")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    out = args.out.resolve()
    results = run_grid(args, out)
    markdown = table(results, args.k, args.chains, args.budget)
    fig = figure(results, args.k, args.chains, args.budget)
    write_outputs(out, "cot_vs_k", results, FIELDS,
                  f"n = {N}, batch 64, budget {args.budget} steps, seeds {args.seeds}\n\n{markdown}", fig)
    with SummaryWriter(out / "tb") as writer:
        writer.add_figure("cot_vs_k/steps_to_solve", fig)
        for row in results:
            tag = f"{row['chain']}/seed{row['seed']}"
            steps = row["solved_step"] if row["solved_step"] is not None else float("nan")
            writer.add_scalar(f"steps_to_solve/{tag}", steps, global_step=row["k"])
            writer.add_scalar(f"greedy_accuracy/{tag}", row["greedy_accuracy"], global_step=row["k"])
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
