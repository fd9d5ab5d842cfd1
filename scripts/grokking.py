"""Grokking on sparse parity: training-set and held-out accuracy against steps for one finite training set, with
and without weight decay.

    python scripts/grokking.py --out DIR [--n 30] [--k 3] [--size 1024] [--width 100] [--init dense]
                               [--weight-decays 0.0 0.01] [--budget 20000] [--every 100] [--seed 0] [--set key=value ...]

One ``python train.py experiment=pareto_<init> model.ensemble=1 data.train_size=N optim.weight_decay=WD`` run per
weight decay (SGD lr 0.1, batch 32, hinge loss; a run stops once solved). Each evaluation logs
``train_set/accuracy`` (all N training samples where N <= eval.size) and ``eval/accuracy_mean`` (8192 held-out
samples); this script reads them back from the runs' TensorBoard files. Writes DIR/grokking.md (fit_step,
solved_step and the steps between them per weight decay) and DIR/grokking.png. Runs are sweep.py's cells in
DIR/runs/, reused once finished.
"""
import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from cli import Parser, cell, train  # noqa: E402 (scripts/cli.py, beside this file)
from runtime.cells import Runner  # noqa: E402 (cli puts the repository on sys.path)

CURVES = {"train_set/accuracy": "training set", "eval/accuracy_mean": "held out"}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--n", type=int, default=30)
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--size", type=int, default=1024, help="data.train_size")
    parser.add_argument("--width", type=int, default=100)
    parser.add_argument("--init", default="dense", choices=["dense", "sparse"])
    parser.add_argument("--weight-decays", type=float, nargs="+", default=[0.0, 0.01])
    parser.add_argument("--budget", type=int, default=20000, help="training steps per run")
    parser.add_argument("--every", type=int, default=100, help="steps between evaluations")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", dest="overrides", nargs="+", default=[], metavar="KEY=VALUE",
                        help="extra train.py overrides for every run")
    args = parser.parse_args(argv)
    if not 1 <= args.k <= args.n:
        parser.error(f"--k: must be in [1, --n ({args.n})], got {args.k}")
    return args


def curves(run_dir: Path) -> dict[str, tuple[list[int], list[float]]]:
    """The logged training-set and held-out accuracy of a run: tag -> (steps, values)."""
    events = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0}).Reload()
    return {tag: ([e.step for e in events.Scalars(tag)], [e.value for e in events.Scalars(tag)]) for tag in CURVES}


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    out = args.out.resolve()
    fixed = [f"experiment=pareto_{args.init}", f"data.n={args.n}", f"data.k={args.k}", "model.ensemble=1",
             f"model.width={args.width}", f"data.train_size={args.size}", f"trainer.max_steps={args.budget}",
             f"eval.every_n_steps={args.every}", "checkpoint.every_n_steps=100000", f"seed={args.seed}",
             *args.overrides]
    cells = {wd: cell(f"wd{wd:g}", {"optim.weight_decay": str(wd)}, fixed, out / "runs" / f"wd{wd:g}")
             for wd in args.weight_decays}
    lines = [f"(n, k) = ({args.n}, {args.k}), N = {args.size} training samples, {args.init} init, width "
             f"{args.width}, seed {args.seed}, budget {args.budget} steps, evaluated every {args.every}.", "",
             "| weight decay | fit_step | solved_step | steps from fit to solve | final held-out accuracy |",
             "|---|---|---|---|---|"]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    with Runner().handling_signals() as runner:
        for i, (wd, run) in enumerate(cells.items()):
            summary = train(runner, run)
            fit, solved = summary["fit_step"], summary["solved_step"]
            gap = solved - fit if fit is not None and solved is not None else None
            lines.append(f"| {wd:g} | {fit} | {solved if solved is not None else f'> {args.budget}'} | "
                         f"{gap if gap is not None else '-'} | {summary['final_accuracy']:.4f} |")
            for tag, (steps, values) in curves(run.run_dir).items():
                ax.plot(steps, values, color=f"C{i}", linestyle="-" if tag.startswith("train") else "--",
                        label=f"{CURVES[tag]}, weight decay {wd:g}")
    ax.set(xlabel="SGD step", ylabel="accuracy", xscale="log",
           title=f"({args.n}, {args.k}) parity, N = {args.size}: fit, then (with weight decay) solve")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "grokking.png", dpi=120)
    markdown = "\n".join(lines) + "\n"
    (out / "grokking.md").write_text(markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
