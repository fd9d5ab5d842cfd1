"""What the experiment scripts share: an argument parser whose errors are one line and exit status 2, and
their train.py runs, made and run as sweep.py's cells (composed before any runs, reused once finished)."""
import csv
import argparse
import sys
from pathlib import Path
from typing import NoReturn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from config import ConfigError  # noqa: E402
from runtime.cells import Cell, Runner, make_cell, signal_name  # noqa: E402


def refuse(message: str) -> NoReturn:
    """One line naming the problem, exit status 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line naming the option, exit status 2
        refuse(message)


def cell(name: str, values: dict[str, str], overrides: list[str], run_dir: Path) -> Cell:
    """One run's cell; a config train.py would refuse is one line and exit status 2, before anything runs."""
    try:
        return make_cell(name, values, overrides, run_dir)
    except ConfigError as err:
        refuse(f"{name}: {err}")


def train(runner: Runner, cell: Cell) -> dict:
    """The cell's summary.json, trained now or reused; otherwise one line and exit 1 (128 + signal if stopped)."""
    outcome = runner.run(cell)
    if outcome.summary is not None:
        return outcome.summary
    if runner.stopped is not None:
        print(f"error: stopped by {signal_name(runner.stopped)}: {cell.name} keeps its checkpoint in "
              f"{cell.run_dir}; run the same command again to go on", file=sys.stderr)
        sys.exit(128 + runner.stopped)
    sys.exit(f"error: {cell.name} failed ({outcome.problem}, see {cell.run_dir / 'train.log'})")


def per_member(summary: dict, key: str) -> list:
    """A summary field as a list, one value per member (a lone member's run writes plain values)."""
    value = summary[key]
    return value if isinstance(value, list) else [value]


def write_outputs(out: Path, name: str, rows: list[dict], fields: list[str], markdown: str, fig) -> None:
    """An experiment's results in DIR: NAME.csv (``rows``), NAME.md (``markdown``) and NAME.png (``fig``)."""
    with open(out / f"{name}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    (out / f"{name}.md").write_text(markdown)
    fig.savefig(out / f"{name}.png", dpi=120)
