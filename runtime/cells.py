"""Cells: train.py runs whose configs are composed before any runs, each reused where it already finished.

A cell finishes only if its train.py exits 0 and leaves a readable summary.json. Each runs in its own
session, so a SIGTERM, SIGINT or SIGHUP reaches it once: from the Runner, which passes its own signals on and
starts no more cells (the stopped cells save a checkpoint; resume=auto continues them). A cell never outlives
the process that started it: the kernel sends it SIGTERM when that process dies, SIGKILL included. Its output
is appended to its train.log, never truncated. Given GPUs, each running cell gets its own
(CUDA_VISIBLE_DEVICES).
"""
import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import datamodules  # noqa: F401  (registers every task's declarations: a cell's config is composed here)
import lightning_modules  # noqa: F401  (and every model family's)
from config import Config, compose, to_yaml
from lightning_modules import stopping
from metrics.scaling import final_key
from runtime.memory import check_memory, footprint

ROOT = Path(__file__).resolve().parents[1]
LIBC = ctypes.CDLL(None, use_errno=True)  # loaded here: a forked child only calls into it
PR_SET_PDEATHSIG = 1


def dies_with(parent: int):
    """A preexec function: the child gets SIGTERM when ``parent`` (the thread that forks it) dies, or at once if
    it already has."""
    def arm() -> None:
        LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGTERM)
    return arm


@dataclass
class Cell:
    name: str
    values: dict[str, str]  # the keys that make this cell (a grid's) -> value
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


def make_cell(name: str, values: dict[str, str], overrides: list[str], run_dir: Path, machine: bool = True) -> Cell:
    """A cell training ``overrides`` then ``values`` into run_dir, its config composed now (ConfigError if bad;
    ``machine``: and checked against this machine's free memory, which a SLURM job's cells do not need)."""
    args = ["trainer.progress_bar=false", *overrides, *(f"{k}={v}" for k, v in values.items()),
            f"run_dir={run_dir}", "resume=auto"]  # a cell stopped by a signal continues from its checkpoint
    cfg = compose(args)
    if machine:
        check_memory(cfg)
    return Cell(name, values, args, cfg, run_dir)


def train_command(cell: Cell) -> list[str]:
    """The cell's train.py command line (run from ROOT)."""
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


def describe(status: int) -> str:
    """An exit status in words: 'exit 2', 'exit 143 (SIGTERM)', 'killed by SIGKILL'."""
    if status < 0:
        return f"killed by {signal_name(-status)}"
    return f"exit {status}" + (f" ({signal_name(status - 128)})" if status > 128 else "")


def signal_name(number: int) -> str:
    """SIGTERM for 15; 'signal N' for a number that names no signal."""
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


class Runner:
    """Runs cells as train.py subprocesses, each in its own session, so that a signal reaches it once: from here."""

    def __init__(self, gpus: tuple[str, ...] = (), per_cell: int = 1) -> None:
        self.lock = threading.Lock()
        self.running: set[subprocess.Popen] = set()
        self.stopped: Optional[int] = None  # the signal that stopped the runner
        self.free_gpus, self.per_cell = list(gpus), per_cell  # GPU ids no running cell holds (none: not assigned)

    def stop(self, signum: int, frame=None) -> None:
        """Signal handler: start no more cells and pass the signal on to the running ones."""
        with self.lock:
            self.stopped = signum
            for proc in self.running:
                proc.send_signal(signum)

    @contextlib.contextmanager
    def handling_signals(self) -> Iterator["Runner"]:
        """Within: SIGTERM, SIGINT and SIGHUP to this process stop the runner (see stop); the old handlers after."""
        handlers = {sig: signal.signal(sig, self.stop) for sig in stopping.SIGNALS}
        try:
            yield self
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)

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
            gpus = [self.free_gpus.pop() for _ in range(self.per_cell)] if self.free_gpus else []
            env = {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(gpus)} if gpus else None
            with open(cell.run_dir / "train.log", "a") as log:
                log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} sweep pid {os.getpid()}: "
                          f"{' '.join(train_command(cell)[1:])}\n")
                log.flush()
                proc = subprocess.Popen(train_command(cell), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True, preexec_fn=dies_with(os.getpid()))
            self.running.add(proc)
        status = proc.wait()
        with self.lock:
            self.running.discard(proc)
            self.free_gpus += gpus
        wall = time.perf_counter() - start
        if status != 0:
            return Outcome(cell, status=status, wall=wall, problem=describe(status))
        try:
            return Outcome(cell, read_summary(cell), status, wall)
        except SummaryError as err:
            return Outcome(cell, status=status, wall=wall, problem=f"exit 0 but {err}")


def cost(cell: Cell) -> int:
    """Steps x the bytes of the largest tensors: the order cells start in."""
    c = cell.cfg
    return c.trainer.max_steps * sum(term.bytes for term in footprint(c))


def run_all(cells: list[Cell], jobs: int, runner: Runner) -> list[Outcome]:
    """Run the cells, ``jobs`` at a time and most expensive first, printing a line per cell as it ends."""
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
