"""Benchmark circuits learned by next-token models, with every gate as a chain token and without.

    python scripts/circuits.py --out DIR [--circuits c17 c432 c499 ...] [--kinds linear mlp transformer]
                               [--chains gates none] [--budget 2000] [--seed 0] [--set key=value ...]

One ``python train.py experiment=circuit_gates data.netlist=NAME data.chain=CHAIN model.kind=KIND
trainer.max_steps=BUDGET`` per (circuit, kind, chain); ``NAME:OUTPUT`` keeps one output's fan-in cone
(c6288:N6123 is product bit 15). A run stops when its greedy answer (all chosen outputs) is exact on every
held-out input. Beside each circuit, the best trivial predictor: each output its best constant, copied input bit
or complemented input bit (chosen on 4096 training samples; c1355's outputs are complements where c499's are
copies), scored by exact match of all outputs on the held-out set; and each run's
exact match on the held-out inputs where that predictor is wrong (a circuit counts as learned only there).
Writes DIR/circuits.csv (one row per run), DIR/circuits.md and DIR/circuits.png; runs live in DIR/runs/ (sweep.py's
cells: a finished run is reused, a stopped one continues when the command is given again).
"""
import argparse
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from cli import Parser, cell, train, write_outputs  # noqa: E402 (scripts/cli.py, beside this file)
from lightning_modules.next_token import teacher_forced_and_greedy  # noqa: E402
from runtime.cells import Cell, Runner  # noqa: E402
from runtime.experiment import load_run  # noqa: E402

KINDS = ("linear", "mlp", "transformer")
CHAINS = ("gates", "none")
CIRCUITS = ("c17", "c432", "c499", "c880", "c1355", "c1908", "int2float", "c6288:N6123", "c6288")
FIELDS = ("circuit", "kind", "chain", "inputs", "outputs_used", "cone_gates", "depth", "seq_len", "trivial_exact",
          "final_accuracy", "beyond_trivial", "token_accuracy", "solved_step", "steps", "train_wall_s", "wall_s")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--circuits", nargs="+", default=list(CIRCUITS), help="NAME or NAME:OUTPUT")
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    parser.add_argument("--chains", nargs="+", default=list(CHAINS), choices=CHAINS)
    parser.add_argument("--budget", type=int, default=2000, help="training steps per run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", dest="overrides", nargs="+", default=[], metavar="KEY=VALUE",
                        help="extra train.py overrides for every run, e.g. --set model.width=16")
    args = parser.parse_args(argv)
    if args.budget < 1:
        parser.error(f"--budget: must be >= 1, got {args.budget}")
    return args


def run_cell(circuit: str, kind: str, chain: str, args: argparse.Namespace, out: Path) -> Cell:
    netlist, _, output = circuit.partition(":")
    values = {"data.netlist": netlist, "data.chain": chain, "model.kind": kind, "seed": str(args.seed),
              "trainer.max_steps": str(args.budget), **({"data.outputs": f"[{output}]"} if output else {})}
    name = f"{circuit.replace(':', '-')}-{kind}-{chain}"
    return cell(name, values, ["experiment=circuit_gates", *args.overrides], out / "runs" / name)


def trivial_right(dm, held: torch.Tensor) -> torch.Tensor:
    """Whether the best trivial predictor (per output: a constant, a copied or a complemented input bit, chosen
    on training samples) gets all outputs of each held-out sequence (N, seq_len) right."""
    n, m = len(dm.plan.inputs), dm.answer_len
    rules = lambda tokens: torch.cat([torch.zeros_like(tokens[:, :1]), torch.ones_like(tokens[:, :1]),
                                      tokens[:, :n], 1 - tokens[:, :n]], 1)  # (N, 2 + 2n) candidate predictions
    seen = dm.sample(0, 4096, 0, held.device)
    hits = (rules(seen)[:, :, None] == seen[:, None, -m:]).float().mean(0)  # (2 + 2n, m)
    best = hits.argmax(0)
    return (rules(held)[:, best] == held[:, -m:]).all(1)


def held_out_scores(run_dir: Path) -> tuple[float, float]:
    """(trivial exact match, the run's exact match where the trivial predictor is wrong) on the held-out set."""
    _, dm, module = load_run(run_dir)
    held = dm.eval_set(module.device)[0]
    _, generated = teacher_forced_and_greedy(module.backbones[0], held, dm.prompt_len)
    right = (generated[:, -dm.answer_len:] == held[:, -dm.answer_len:]).all(1)
    trivial = trivial_right(dm, held)
    beyond = right[~trivial].float().mean().item() if (~trivial).any() else float("nan")
    return trivial.float().mean().item(), beyond


def table(rows: list[dict]) -> str:
    lines = ["| circuit | inputs | outputs | gates in cone | depth | kind | chain | T | trivial exact | held-out exact "
             "| exact where trivial is wrong | steps to solve | train wall (s) |", "|---" * 13 + "|"]
    for r in rows:
        solved = r["solved_step"] if r["solved_step"] is not None else f"> {r['steps']}"
        lines.append(f"| {r['circuit']} | {r['inputs']} | {r['outputs_used']} | {r['cone_gates']} | {r['depth']} | "
                     f"{r['kind']} | {r['chain']} | {r['seq_len']} | {r['trivial_exact']:.3f} | "
                     f"{r['final_accuracy']:.3f} | {r['beyond_trivial']:.3f} | {solved} | {r['train_wall_s']:.0f} |")
    return "\n".join(lines) + "\n"


def figure(rows: list[dict], args: argparse.Namespace) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(8, 5))
    circuits = list(dict.fromkeys(r["circuit"] for r in rows))
    series = [(k, c) for k in args.kinds for c in args.chains]
    width = 0.8 / max(1, len(series))
    for j, (kind, chain) in enumerate(series):
        xs, ys = [], []
        for i, circuit in enumerate(circuits):
            found = [r for r in rows if (r["circuit"], r["kind"], r["chain"]) == (circuit, kind, chain)]
            if found:
                xs.append(i + (j - (len(series) - 1) / 2) * width)
                ys.append(found[0]["final_accuracy"])
        ax.bar(xs, ys, width, label=f"{kind}, chain={chain}", hatch="" if chain == "gates" else "//")
    trivial = {r["circuit"]: r["trivial_exact"] for r in rows}
    ax.scatter(range(len(circuits)), [trivial[c] for c in circuits], marker="_", s=400, color="black", zorder=3,
               label="best trivial predictor")
    ax.set(xticks=range(len(circuits)), ylabel="held-out exact match, all outputs", ylim=(0, 1.05),
           title=f"benchmark circuits, {args.budget} steps at most")
    ax.set_xticklabels(circuits, rotation=20)
    ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.18))
    fig.tight_layout()
    return fig


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    out = args.out.resolve()
    cells = {(c, k, ch): run_cell(c, k, ch, args, out) for c in args.circuits for k in args.kinds
             for ch in args.chains}  # every config checked before the first run
    rows = []
    with Runner().handling_signals() as runner:
        for (circuit, kind, chain), run in cells.items():
            start = time.perf_counter()
            summary = train(runner, run)
            trivial, beyond = held_out_scores(run.run_dir)
            layout_len = summary["inputs"] + 1 + (summary["chain_tokens"] or summary["outputs_used"])
            rows.append({"circuit": circuit, "kind": kind, "chain": chain, "seq_len": layout_len,
                         "trivial_exact": trivial, "beyond_trivial": beyond,
                         "wall_s": round(time.perf_counter() - start, 1),
                         **{f: summary[f] for f in FIELDS if f in summary}})
            print(f"{circuit} {kind} {chain}: held-out exact {summary['final_accuracy']:.4f} (trivial {trivial:.3f}, "
                  f"beyond it {beyond:.3f}) solved_step={summary['solved_step']} "
                  f"train {summary['train_wall_s']:.0f}s", flush=True)
    markdown = table(rows)
    write_outputs(out, "circuits", rows, FIELDS, f"budget {args.budget} steps, seed {args.seed}, overrides "
                  f"{' '.join(args.overrides) or 'none'}\n\n{markdown}", figure(rows, args))
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
