"""Run a grid of train.py runs and fit how the solve time scales: median solved_step ~ n^(alpha k).

    python sweep.py experiment=parity_mlp --grid data.n=20,30,40 --grid data.k=2,3 model.ensemble=16 --out DIR
                    [--with trainer.max_steps=2000,20000] [--jobs J] [--slurm]

``--with key=v1,v2,...`` moves a key along with the --grid axis before it (one value per value of that
axis: e.g. a step budget and an evaluation interval per k). Every cell of the grid is one train.py run
(its ensemble members are the seeds) in DIR/runs/<cell>;
finished cells (a readable summary.json written under the same config) are reused, so a sweep can be
resumed or collected after a SLURM array job; a cell whose summary.json is unreadable is said so in one
line and trained again. Writes DIR/results.csv (one row per member; next-token members add their token and
chain accuracy), DIR/results.json (per cell: success probability with its exact Clopper-Pearson 95% interval
and median solved_step; per k: the log-log exponent of the median against n with a bootstrap 95% interval,
alpha = exponent / k) and DIR/scaling.png, and prints a table of the cells.

A cell finishes only if its train.py exits 0 and leaves a readable summary.json; any other exit (a
status, or a signal that killed it) is reported with its train.log, and the other cells' results are
still written (the status is then 1; with no finished cell, no results are written). SIGTERM or SIGINT
to the sweep is passed on to the running cells (each runs in its own session, so it gets the signal
once), which save a checkpoint and stop; no new cell starts, the finished cells' results are written,
and the sweep exits with 128 + the signal.

Unsolved members are censored at the budget (trainer.max_steps): they count as +inf in medians,
so a cell whose median is censored is reported and left out of the fit, never silently dropped.
"""
import argparse
import csv
import itertools
import json
import math
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

import datamodules  # noqa: F401  (registers every task's declarations)
import lightning_modules  # noqa: F401  (and every model family's)
from config import Config, ConfigError, compose, task_class, to_yaml
from runtime.memory import check_memory, footprint

ROOT = Path(__file__).resolve().parent
BOOTSTRAP = 2000


class SweepError(ValueError):
    """Bad sweep input: one line."""


@dataclass
class Cell:
    name: str
    values: dict[str, str]  # grid key -> value
    args: list[str]  # train.py arguments
    cfg: Config
    run_dir: Path

    @property
    def trained_here(self) -> bool:
        """Whether run_dir holds a run of this very config (its summary may still be missing or broken)."""
        config = self.run_dir / "config.yaml"
        return config.is_file() and config.read_text() == to_yaml(self.cfg)


@dataclass
class Outcome:
    """What became of a cell: finished (with its summary), failed, interrupted or never started."""
    cell: Cell
    summary: Optional[dict] = None  # summary.json, when the cell finished
    status: Optional[int] = None  # train.py's exit status (negative: killed by that signal); None: not run here
    wall: float = 0.0
    problem: str = ""  # why it did not finish


class SummaryError(ValueError):
    """A summary.json that is missing or cannot be read: one line."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:
        raise SweepError(message)


class Axis(argparse.Action):
    """--grid and --with, kept in command-line order (a --with belongs to the --grid before it)."""

    def __call__(self, parser, namespace, value, option_string=None) -> None:
        namespace.axes = [*namespace.axes, (option_string, value)]


def split_axis(option: str, axis: str) -> tuple[str, list[str]]:
    key, sep, values = axis.partition("=")
    items = values.split(",")
    if not sep or not key or not all(items):
        raise SweepError(f"{option} {axis!r}: expected key=v1,v2,...")
    return key, items


def parse(argv: list[str]) -> tuple[argparse.Namespace, dict[str, list[str]], dict[str, tuple[str, list[str]]]]:
    """The arguments, the grid (key -> values) and the linked keys (key -> (grid key, values))."""
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="train.py arguments shared by every cell")
    parser.add_argument("--grid", action=Axis, dest="axes", default=[], help="key=v1,v2,...: one axis of the grid")
    parser.add_argument("--with", action=Axis, dest="axes", default=[],
                        help="key=v1,v2,...: one value per value of the preceding --grid axis")
    parser.add_argument("--out", type=Path, required=True, help="sweep directory")
    parser.add_argument("--jobs", type=int, help="cells run at once (default 1; with --slurm: array throttle)")
    parser.add_argument("--slurm", action="store_true", help="write DIR/sweep.sbatch (an array job) instead of running")
    args = parser.parse_intermixed_args(argv)
    if args.jobs is not None and args.jobs < 1:
        raise SweepError(f"--jobs: must be >= 1, got {args.jobs}")
    grid: dict[str, list[str]] = {}
    linked: dict[str, tuple[str, list[str]]] = {}
    for option, axis in args.axes:
        key, items = split_axis(option, axis)
        if key in grid or key in linked:
            raise SweepError(f"{option} {key}: given twice")
        if option == "--grid":
            if len(set(items)) != len(items):
                raise SweepError(f"--grid {key}: repeated value in {axis!r}")
            grid[key] = items
        elif not grid:
            raise SweepError(f"--with {key}: needs a --grid axis before it")
        else:
            last = list(grid)[-1]
            if len(items) != len(grid[last]):
                raise SweepError(f"--with {key}: {len(items)} values for the {len(grid[last])} of --grid {last}")
            linked[key] = (last, items)
    if not grid:
        raise SweepError("--grid: at least one axis is needed (key=v1,v2,...)")
    for key in [arg.partition("=")[0] for arg in args.overrides] + list(grid) + list(linked):
        if key in ("run_dir", "resume"):
            raise SweepError(f"{key}: set by the sweep (DIR/runs/<cell>, resume=auto: a stopped cell continues)")
    for arg in args.overrides:
        key = arg.partition("=")[0]
        if key in grid or key in linked:
            raise SweepError(f"{key}: both swept and a fixed override")
    if args.out.exists() and not args.out.is_dir():
        raise SweepError(f"--out {args.out}: exists and is not a directory")
    return args, grid, linked


def make_cells(overrides: list[str], grid: dict[str, list[str]], linked: dict[str, tuple[str, list[str]]],
               out: Path, machine: bool = True) -> list[Cell]:
    """Every cell, its config composed and validated now, before anything runs (``machine``: and checked
    against this machine's free memory; not for a SLURM job, whose cells run elsewhere)."""
    cells = []
    for combo in itertools.product(*grid.values()):
        values = dict(zip(grid, combo))
        name = "_".join(f"{k}={v}" for k, v in values.items()).replace("/", "-")
        values.update({k: items[grid[axis].index(values[axis])] for k, (axis, items) in linked.items()})
        run_dir = out / "runs" / name
        args = ["trainer.progress_bar=false", *overrides, *(f"{k}={v}" for k, v in values.items()),
                f"run_dir={run_dir}", "resume=auto"]  # a cell stopped by a signal continues from its checkpoint
        try:
            cfg = compose(args)
            if machine:
                check_memory(cfg)
        except ConfigError as err:
            raise SweepError(f"cell {name}: {err}") from None
        cells.append(Cell(name, values, args, cfg, run_dir))
    return cells


def command(cell: Cell) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), *cell.args]


def read_summary(cell: Cell) -> dict:
    """The cell's summary.json, checked to hold what the results need; SummaryError (one line) if not."""
    path = cell.run_dir / "summary.json"
    try:
        summary = json.loads(path.read_text())
        solved, members = summary["solved_step"], summary["members"]
        accuracy = summary[final_key(summary)]
    except FileNotFoundError:
        raise SummaryError(f"{path}: missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, StopIteration) as err:
        raise SummaryError(f"{path}: unreadable ({type(err).__name__}: {str(err).splitlines()[0]})") from None
    per_member = isinstance(solved, list)
    if (not isinstance(members, list) or not members or per_member != isinstance(accuracy, list)
            or (per_member and not len(solved) == len(accuracy) == len(members))):
        raise SummaryError(f"{path}: unreadable (solved_step, {final_key(summary)} and members do not match)")
    return summary


def final_key(summary: dict) -> str:
    """The summary's final held-out score: final_accuracy, or the task's own (final_relative_mse, ...)."""
    return next(key for key in summary if key.startswith("final_"))


def describe(status: int) -> str:
    """An exit status in words: 'exit 2', 'exit 143 (SIGTERM)', 'killed by SIGKILL'."""
    if status < 0:
        return f"killed by {signal_name(-status)}"
    return f"exit {status}" + (f" ({signal_name(status - 128)})" if status > 128 else "")


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


class Runner:
    """Runs cells as train.py subprocesses, each in its own session, so that a signal reaches it once: from here."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running: set[subprocess.Popen] = set()
        self.stopped: Optional[int] = None  # the signal that stopped the sweep

    def stop(self, signum: int, frame=None) -> None:
        """Signal handler: start no more cells and pass the signal on to the running ones."""
        with self.lock:
            self.stopped = signum
            for proc in self.running:
                proc.send_signal(signum)

    def run(self, cell: Cell) -> Outcome:
        """Train one cell unless it already finished here; reused and finished cells come with their summary."""
        if cell.trained_here and (cell.run_dir / "summary.json").exists():
            try:
                return Outcome(cell, read_summary(cell))
            except SummaryError as err:
                print(f"{cell.name}: {err}; training it again", flush=True)
        start = time.perf_counter()
        with self.lock:
            if self.stopped is not None:
                return Outcome(cell, problem="not run")
            cell.run_dir.mkdir(parents=True, exist_ok=True)
            with open(cell.run_dir / "train.log", "w") as log:
                proc = subprocess.Popen(command(cell), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
            self.running.add(proc)
        status = proc.wait()
        with self.lock:
            self.running.discard(proc)
        wall = time.perf_counter() - start
        if status != 0:
            return Outcome(cell, status=status, wall=wall, problem=describe(status))
        try:
            return Outcome(cell, read_summary(cell), status, wall)
        except SummaryError as err:
            return Outcome(cell, status=status, wall=wall, problem=f"exit 0 but {err}")


def cost(cell: Cell) -> int:
    c = cell.cfg
    return c.trainer.max_steps * sum(term.bytes for term in footprint(c))  # steps x the largest tensors


def run_all(cells: list[Cell], jobs: int, runner: Runner) -> list[Outcome]:
    """Run the cells, most expensive first, printing a line per cell as it ends."""
    outcomes, order = [], sorted(cells, key=cost, reverse=True)
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for i, outcome in enumerate(pool.map(runner.run, order), 1):
            outcomes.append(outcome)
            if outcome.summary is not None:
                note = "reused" if outcome.status is None else f"{outcome.wall:.1f} s"
            elif outcome.status is None:
                note = "not run (the sweep was stopped)"
            elif runner.stopped is not None:
                note = f"stopped ({outcome.problem}; its checkpoint stays in {outcome.cell.run_dir})"
            else:
                note = f"FAILED ({outcome.problem}, see {outcome.cell.run_dir / 'train.log'})"
            print(f"[{i}/{len(cells)}] {outcome.cell.name}: {note}", flush=True)
    return outcomes


def write_slurm(cells: list[Cell], out: Path, jobs: int | None) -> Path:
    """DIR/cells.txt (one train.py command a line) and DIR/sweep.sbatch, an array job over its lines."""
    (out / "cells.txt").write_text("".join(shlex.join(command(c)) + "\n" for c in cells))
    throttle = f"%{jobs}" if jobs else ""
    script = out / "sweep.sbatch"
    script.write_text(f"""#!/bin/bash
#SBATCH --job-name=paritylab-sweep
#SBATCH --array=0-{len(cells) - 1}{throttle}
#SBATCH --cpus-per-task=1
#SBATCH --output={out.resolve()}/runs/slurm-%A_%a.log
# One array task per grid cell; add partition / GPU / time lines for your cluster here.
cd {shlex.quote(str(ROOT))}
eval "$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" {shlex.quote(str((out / 'cells.txt').resolve()))})"
""")
    return script


# --- results -----------------------------------------------------------------------------------
def binomial_cdf(successes: int, trials: int, p: float) -> float:
    """P(X <= successes) for X ~ Binomial(trials, p), 0 < p < 1, summed in log space (no overflow)."""
    log_p, log_q = math.log(p), math.log1p(-p)
    return min(1.0, sum(math.exp(math.lgamma(trials + 1) - math.lgamma(i + 1) - math.lgamma(trials - i + 1)
                                 + i * log_p + (trials - i) * log_q) for i in range(successes + 1)))


def bisect_decreasing(f, target: float, iterations: int = 60) -> float:
    """The p in (0, 1) where a decreasing function f crosses ``target``, by bisection (to 2**-60)."""
    lo, hi = 0.0, 1.0
    for _ in range(iterations):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if f(mid) > target else (lo, mid)
    return (lo + hi) / 2


def clopper_pearson(successes: int, trials: int, confidence: float = 0.95) -> tuple[float, float]:
    """The exact (Clopper-Pearson 1934) interval of a binomial success probability: the p whose tail
    probabilities of the observed count are (1 - confidence) / 2, P(X >= x | lower) and P(X <= x | upper)."""
    tail = (1 - confidence) / 2
    lower = 0.0 if successes == 0 else bisect_decreasing(lambda p: binomial_cdf(successes - 1, trials, p), 1 - tail)
    upper = 1.0 if successes == trials else bisect_decreasing(lambda p: binomial_cdf(successes, trials, p), tail)
    return lower, upper


def member_steps(summary: dict) -> tuple[np.ndarray, list[float]]:
    """(solved steps with +inf for censored members, final scores) of a finished cell's summary."""
    solved, accuracy = summary["solved_step"], summary[final_key(summary)]
    solved, accuracy = (solved, accuracy) if isinstance(solved, list) else ([solved], [accuracy])
    steps = np.array([math.inf if s is None else float(s) for s in solved])
    return steps, accuracy


def fit_exponent(ns: np.ndarray, medians: np.ndarray) -> float:
    """Slope of log(median) against log(n), least squares."""
    return float(np.polyfit(np.log(ns), np.log(medians), 1)[0])


def bootstrap_exponents(points: list[tuple[int, np.ndarray]], rng: np.random.Generator) -> np.ndarray:
    """Exponents refitted on members resampled within each cell; a resample with a censored median drops
    that cell, and a replicate left with fewer than two distinct n is skipped."""
    exponents = []
    for _ in range(BOOTSTRAP):
        ns, medians = [], []
        for n, steps in points:
            median = np.median(rng.choice(steps, size=steps.size))
            if np.isfinite(median):
                ns.append(n)
                medians.append(median)
        if len(set(ns)) >= 2:
            exponents.append(fit_exponent(np.array(ns), np.array(medians)))
    return np.array(exponents)


def summarize(finished: list[Outcome]) -> tuple[list[dict], list[dict]]:
    """(results.csv rows, results.json cells) of the finished cells."""
    rows, table = [], []
    for cell, summary in ((o.cell, o.summary) for o in finished):
        steps, accuracy = member_steps(summary)
        members, budget = summary["members"], cell.cfg.trainer.max_steps
        extra = next_token_accuracies(summary)
        for i, (member, step, acc) in enumerate(zip(members, steps, accuracy)):
            rows.append({**cell.values, "seed": cell.cfg.seed, "member": member,
                         "solved_step": int(step) if np.isfinite(step) else "",
                         "censored": int(not np.isfinite(step)), "budget": budget, "final_score": acc,
                         **{key: values[i] for key, values in extra.items()}})
        median, solved = float(np.median(steps)), int(np.isfinite(steps).sum())
        table.append({"cell": cell.name, "values": cell.values, **task_class(cell.cfg.data.task).implementation()(cell.cfg).keys(),
                      "members": len(members), "solved": solved,
                      "success_probability": solved / len(members),
                      "success_ci95": list(clopper_pearson(solved, len(members))),
                      "median_solved_step": median if math.isfinite(median) else None,
                      "median_censored": not math.isfinite(median), "budget": budget,
                      "steps_run": summary.get("steps"), "train_wall_s": summary.get("train_wall_s"),
                      "run_dir": str(cell.run_dir), "_steps": steps})
    return rows, table


def next_token_accuracies(summary: dict) -> dict[str, list[float]]:
    """A next-token cell's per-member token and chain accuracy (its final_accuracy is the greedy one); {} for
    other models."""
    keys = [key for key in ("token_accuracy", "chain_accuracy") if key in summary]
    return {key: summary[key] if isinstance(summary[key], list) else [summary[key]] for key in keys}


def cell_table(table: list[dict]) -> str:
    """The cells as a text table: success probability with its 95% interval, and median solved_step."""
    width = max(len("cell"), *(len(c["cell"]) for c in table))
    lines = [f"{'cell':<{width}}  solved  success  95% CI (Clopper-Pearson)  median solved_step"]
    for c in table:
        lo, hi = c["success_ci95"]
        median = f"> {c['budget']} (censored)" if c["median_censored"] else f"{c['median_solved_step']:g}"
        lines.append(f"{c['cell']:<{width}}  {c['solved']:>3}/{c['members']:<3} {c['success_probability']:7.3f}"
                     f"  [{lo:.3f}, {hi:.3f}]{'':<14}  {median}")
    return "\n".join(lines)


def fits(table: list[dict], grid: dict[str, list[str]]) -> list[dict]:
    """One power-law fit of the median against n per combination of the other grid keys."""
    if "data.n" not in grid:
        return []
    others = [k for k in grid if k != "data.n"]
    groups: dict[tuple, list[dict]] = {}
    for cell in table:
        groups.setdefault(tuple(cell["values"][k] for k in others), []).append(cell)
    rng, results = np.random.default_rng(0), []
    for key, cells in groups.items():
        used = [c for c in cells if not c["median_censored"]]
        ks = {c["k"] for c in cells}
        k = ks.pop() if len(ks) == 1 else None
        fit = {"group": dict(zip(others, key)), "k": k, "cells": [c["cell"] for c in used],
               "excluded_censored": [c["cell"] for c in cells if c["median_censored"]],
               "exponent": None, "exponent_ci95": None, "alpha": None, "alpha_ci95": None}
        if len({c["n"] for c in used}) >= 2:
            exponent = fit_exponent(np.array([c["n"] for c in used]), np.array([c["median_solved_step"] for c in used]))
            boot = bootstrap_exponents([(c["n"], c["_steps"]) for c in used], rng)
            ci = [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))]
            fit.update(exponent=exponent, exponent_ci95=ci, bootstrap_replicates=int(boot.size))
            if k:
                fit.update(alpha=exponent / k, alpha_ci95=[ci[0] / k, ci[1] / k])
        results.append(fit)
    return results


def plot_scaling(ax, table: list[dict], fitted: list[dict]) -> None:
    """Median solved_step against n, log-log, with each fit; members as dots, censored ones as x."""
    for i, fit in enumerate(fitted):
        cells = [c for c in table if all(c["values"][k] == v for k, v in fit["group"].items())]
        for c in cells:
            done = np.isfinite(c["_steps"])
            ax.plot([c["n"] * 1.02] * done.sum(), c["_steps"][done], ".", color=f"C{i}", alpha=0.25, ms=3)
            ax.plot([c["n"] * 1.02] * (~done).sum(), [c["budget"]] * (~done).sum(), "x", color=f"C{i}", ms=4)
        used = [c for c in cells if not c["median_censored"]]
        ns, medians = np.array([c["n"] for c in used], float), np.array([c["median_solved_step"] for c in used])
        label = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in fit["group"].items()) or "median"
        if fit["exponent"] is not None:
            label += f": n^{fit['exponent']:.2f}"
            intercept = np.mean(np.log(medians) - fit["exponent"] * np.log(ns))
            ax.plot(ns, np.exp(intercept) * ns ** fit["exponent"], "-", color=f"C{i}", alpha=0.6)
        ax.plot(ns, medians, "o", color=f"C{i}", label=label)
    ticks = sorted({c["n"] for c in table})
    ax.set(xscale="log", yscale="log", xlabel="n (input bits)", ylabel="solved_step",
           title="median steps to 100% held-out accuracy\n(dots: members; x: censored at the budget)")
    ax.set_xticks(ticks, [str(n) for n in ticks])


def plot_success(ax, table: list[dict], grid: dict[str, list[str]]) -> None:
    """Success probability against the first grid key, one line per value of the other keys."""
    axis, rest = list(grid)[0], list(grid)[1:]
    numeric = all(v.replace(".", "", 1).isdigit() for v in grid[axis])
    position = {v: float(v) if numeric else i for i, v in enumerate(grid[axis])}
    for i, combo in enumerate(itertools.product(*(grid[k] for k in rest))):
        cells = [c for c in table if all(c["values"][k] == v for k, v in zip(rest, combo))]
        label = ", ".join(f"{k}={v}" for k, v in zip(rest, combo)) or None
        ax.plot([position[c["values"][axis]] for c in cells], [c["success_probability"] for c in cells], "o-",
                color=f"C{i}", label=label)
    ax.set(xscale="log" if numeric else "linear", xlabel=axis, ylabel="success probability", ylim=(-0.05, 1.05),
           title="solved within the step budget")
    ax.set_xticks(list(position.values()), list(position))


def plot(table: list[dict], fitted: list[dict], grid: dict[str, list[str]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    plot_scaling(ax, table, fitted) if fitted else plot_success(ax, table, grid)
    ax.minorticks_off()
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(finished: list[Outcome], grid: dict[str, list[str]], out: Path, extra: dict) -> dict:
    rows, table = summarize(finished)
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(key for row in rows for key in row)), restval="")
        writer.writeheader()
        writer.writerows(rows)
    fitted = fits(table, grid)
    plot(table, fitted, grid, out / "scaling.png")
    results = {"grid": grid, **extra, "cells": [{k: v for k, v in c.items() if k != "_steps"} for c in table],
               "fits": fitted}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def prepare_out(out: Path) -> None:
    """Make DIR/runs and check that files can be written there; SweepError (one line) if not."""
    try:
        (out / "runs").mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out / "runs"):
            pass
    except OSError as err:
        raise SweepError(f"--out {out}: cannot write there ({err.strerror or err})") from None


def main(argv: list[str]) -> int:
    try:
        args, grid, linked = parse(argv)
        cells = make_cells(args.overrides, grid, linked, args.out, machine=not args.slurm)
        prepare_out(args.out)
    except SweepError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.slurm:
        script = write_slurm(cells, args.out, args.jobs)
        print(f"wrote {script} ({len(cells)} array tasks): sbatch {script}; afterwards rerun this command "
              "without --slurm to collect (finished cells are reused)")
        return 0
    start, runner = time.perf_counter(), Runner()
    handlers = {sig: signal.signal(sig, runner.stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        outcomes = run_all(cells, args.jobs or 1, runner)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    finished = [o for o in outcomes if o.summary is not None]
    failed = [o.cell.name for o in outcomes if o.summary is None and o.status is not None]
    not_run = [o.cell.name for o in outcomes if o.summary is None and o.status is None]
    wall = round(time.perf_counter() - start, 1)
    if finished:
        extra = {"linked": {k: dict(zip(grid[axis], items)) for k, (axis, items) in linked.items()},
                 "overrides": args.overrides, "failed": failed, "not_run": not_run, "jobs": args.jobs or 1,
                 "wall_s": wall}  # of this invocation: reused cells cost nothing here
        results = write_results(finished, grid, args.out, extra)
        print(cell_table(results["cells"]))
        for fit in results["fits"]:
            if fit["exponent"] is not None:
                lo, hi = fit["exponent_ci95"]
                print(f"{fit['group']}: median solved_step ~ n^{fit['exponent']:.2f} (95% CI {lo:.2f}..{hi:.2f})"
                      + (f", alpha = {fit['alpha']:.2f}" if fit["alpha"] is not None else ""))
        print(f"wrote {args.out / 'results.csv'}, results.json, scaling.png ({wall} s)")
    written = f"results of the {len(finished)} finished written" if finished else "no results written"
    if runner.stopped is not None:
        print(f"error: stopped by {signal_name(runner.stopped)}: {len(failed)} cells stopped or failed, "
              f"{len(not_run)} not run; {written} (run the same command again to go on)", file=sys.stderr)
        return 128 + runner.stopped
    if failed:
        print(f"error: {len(failed)} of {len(cells)} cells failed ({', '.join(failed)}); {written}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
