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
status, or a signal that killed it) is reported with its train.log (appended to, never truncated), and
the other cells' results are still written, atomically (the status is then 1; with no finished cell, no
results are written). SIGTERM, SIGINT or SIGHUP to the sweep is passed on to the running cells (each runs
in its own session, so it gets the signal once), which save a checkpoint and stop; no new cell starts, the
finished cells' results are written, and the sweep exits with 128 + the signal. A sweep killed outright
(SIGKILL) takes its cells with it: the kernel sends each SIGTERM. The sweep holds DIR while it runs: a
second sweep on it is refused. With --jobs J on a node with several GPUs, each running cell gets
trainer.devices GPUs of its own (CUDA_VISIBLE_DEVICES).

Unsolved members are censored at the budget (trainer.max_steps): they count as +inf in medians,
so a cell whose median is censored is reported and left out of the fit, never silently dropped.
"""
import argparse
import csv
import io
import itertools
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import datamodules  # noqa: F401  (registers every task's declarations)
import lightning_modules  # noqa: F401  (and every model family's)
from config import ConfigError, requested_world_size, task_class
from metrics.scaling import clopper_pearson, fits, member_steps
from metrics.scaling_plots import plot
from runtime.cells import Cell, Outcome, Runner, make_cell, run_all, signal_name
from runtime.console import guard_streams
from runtime.run_dirs import RunDirLock, StorageError, write_atomic
from runtime.slurm import write_slurm


class SweepError(ValueError):
    """Bad sweep input: one line."""


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
        try:
            cells.append(make_cell(name, values, overrides, out / "runs" / name, machine))
        except ConfigError as err:
            raise SweepError(f"cell {name}: {err}") from None
    return cells


def summarize(finished: list[Outcome]) -> tuple[list[dict], list[dict]]:
    """(results.csv rows, results.json cells) of the finished cells."""
    rows, table = [], []
    for cell, summary in ((o.cell, o.summary) for o in finished):
        steps, accuracy = member_steps(summary)
        members, budget = summary["members"], cell.cfg.trainer.max_steps
        extra = {**next_token_accuracies(summary), **fit_steps(summary)}
        for i, (member, step, acc) in enumerate(zip(members, steps, accuracy)):
            rows.append({**cell.values, "seed": cell.cfg.seed, "member": member,
                         "solved_step": int(step) if np.isfinite(step) else "",
                         "censored": int(not np.isfinite(step)), "budget": budget, "final_score": acc,
                         **{key: values[i] for key, values in extra.items()}})
        median, solved = float(np.median(steps)), int(np.isfinite(steps).sum())
        task = task_class(cell.cfg.data.task).implementation()(cell.cfg)
        table.append({"cell": cell.name, "values": cell.values, **task.keys(),
                      "members": len(members), "solved": solved,
                      "success_probability": solved / len(members),
                      "success_ci95": list(clopper_pearson(solved, len(members))),
                      "median_solved_step": median if math.isfinite(median) else None,
                      "median_censored": not math.isfinite(median), "budget": budget,
                      "steps_run": summary.get("steps"), "train_wall_s": summary.get("train_wall_s"),
                      "run_dir": str(cell.run_dir), "_steps": steps})
    return rows, table


def fit_steps(summary: dict) -> dict[str, list]:
    """A finite-training-set cell's per-member fit_step (first evaluation at 100% on the training set; "" where
    never) and training-set score; {} for a cell of the endless stream."""
    if "fit_step" not in summary:
        return {}
    train = next(key for key in summary if key.startswith("final_train_"))
    fit, score = summary["fit_step"], summary[train]
    fit, score = (fit, score) if isinstance(fit, list) else ([fit], [score])
    return {"fit_step": ["" if s is None else s for s in fit], "train_score": score}


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


def write_results(finished: list[Outcome], grid: dict[str, list[str]], out: Path, extra: dict) -> dict:
    """results.csv, results.json and scaling.png, each written atomically (a reader never sees half of one)."""
    rows, table = summarize(finished)
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=list(dict.fromkeys(key for row in rows for key in row)), restval="")
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(out / "results.csv", text.getvalue())
    fitted = fits(table, grid)
    write_atomic(out / "scaling.png", lambda file: plot(table, fitted, grid, file))
    results = {"grid": grid, **extra, "cells": [{k: v for k, v in c.items() if k != "_steps"} for c in table],
               "fits": fitted}
    write_atomic(out / "results.json", json.dumps(results, indent=2) + "\n")
    return results


def prepare_out(out: Path) -> RunDirLock:
    """Make DIR/runs, check that files can be written there and lock DIR for this sweep (a second sweep on it is
    refused while this one lives); SweepError (one line) if not."""
    try:
        (out / "runs").mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out / "runs"):
            pass
    except OSError as err:
        raise SweepError(f"--out {out}: cannot write there ({err.strerror or err})") from None
    try:
        return RunDirLock(out, pid_file=".sweep.lock", key="--out", holder="sweep")
    except ConfigError as err:
        raise SweepError(str(err)) from None


def assigned_gpus(cells: list[Cell], jobs: int) -> tuple[tuple[str, ...], int]:
    """The GPUs to share among ``jobs`` cells running at once (each its own), and how many each takes: none
    where one cell runs at a time, the cells train on the CPU or this node has fewer than two GPUs."""
    import torch
    on_gpu = [c for c in cells if c.cfg.trainer.accelerator != "cpu"]
    if jobs == 1 or not on_gpu or not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        return (), 1
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    gpus = tuple(visible.split(",")) if visible else tuple(str(i) for i in range(torch.cuda.device_count()))
    per_cell = max(requested_world_size(c.cfg) or 1 for c in on_gpu)
    if any(isinstance(c.cfg.trainer.devices, list) for c in on_gpu):
        raise SweepError("trainer.devices: with --jobs > 1 each cell gets its own GPUs; give a count, not ids")
    if jobs * per_cell > len(gpus):
        raise SweepError(f"--jobs {jobs}: {jobs} cells of {per_cell} GPU(s) each need {jobs * per_cell} GPUs; "
                         f"this node has {len(gpus)}")
    return gpus, per_cell


def main(argv: list[str]) -> int:
    guard_streams()
    try:
        args, grid, linked = parse(argv)
        cells = make_cells(args.overrides, grid, linked, args.out, machine=not args.slurm)
        gpus, per_cell = assigned_gpus(cells, args.jobs or 1) if not args.slurm else ((), 1)
        lock = prepare_out(args.out)
    except SweepError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    with lock:  # no second sweep writes into DIR while this one runs
        return run_sweep(args, grid, linked, cells, gpus, per_cell)


def run_sweep(args: argparse.Namespace, grid: dict[str, list[str]], linked: dict[str, tuple[str, list[str]]],
              cells: list[Cell], gpus: tuple[str, ...], per_cell: int) -> int:
    """Write the SLURM array job, or run the cells and write the results: the exit status."""
    if args.slurm:
        script = write_slurm(cells, args.out, args.jobs)
        print(f"wrote {script} ({len(cells)} array tasks): sbatch {script}; afterwards rerun this command "
              "without --slurm to collect (finished cells are reused)")
        return 0
    start = time.perf_counter()
    with Runner(gpus, per_cell).handling_signals() as runner:
        outcomes = run_all(cells, args.jobs or 1, runner)
    finished = [o for o in outcomes if o.summary is not None]
    failed = [o.cell.name for o in outcomes if o.summary is None and o.status is not None]
    not_run = [o.cell.name for o in outcomes if o.summary is None and o.status is None]
    wall = round(time.perf_counter() - start, 1)
    if finished:
        extra = {"linked": {k: dict(zip(grid[axis], items)) for k, (axis, items) in linked.items()},
                 "overrides": args.overrides, "failed": failed, "not_run": not_run, "jobs": args.jobs or 1,
                 "wall_s": wall}  # of this invocation: reused cells cost nothing here
        try:
            results = write_results(finished, grid, args.out, extra)
        except StorageError as err:
            print(f"error: {err}; the cells' own results stay in {args.out / 'runs'}", file=sys.stderr)
            return 2
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
