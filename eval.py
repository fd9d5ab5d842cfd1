"""Evaluate a finished run again: python eval.py RUN_DIR [key=value ...]

run_dir/config.yaml + checkpoints/last.ckpt -> held-out metrics -> run_dir/eval.json (or, for overrides
that differ from the run's own settings, eval-KEY=VALUE.json; runtime/experiment.py gives the rule).
It holds the run directory's lock while it works (a run still training there is refused), and writes its
record atomically: a signal or a failed write leaves nothing behind.
"""
import json
import signal
import sys
from pathlib import Path

from config import ConfigError
from lightning_modules.stopping import SIGNALS
from runtime.console import guard_streams
from runtime.run_dirs import StorageError


class Stopped(BaseException):
    """One of train.py's stop signals arrived (SIGTERM, SIGINT, SIGHUP): stop where we are (nothing half-written:
    writes are atomic)."""


def stop(signum: int, frame) -> None:
    raise Stopped(signum)


def main(argv: list[str]) -> int:
    guard_streams()
    for signum in SIGNALS:
        signal.signal(signum, stop)
    if not argv or "=" in argv[0]:
        print("error: usage: python eval.py RUN_DIR [key=value ...]", file=sys.stderr)
        return 2
    try:
        from runtime.experiment import evaluate_run  # torch loads here, after the usage check
        path, record, written = evaluate_run(Path(argv[0]), argv[1:])
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Stopped as stopped:
        signum = stopped.args[0]
        print(f"stopped by {signal.Signals(signum).name}: nothing written", file=sys.stderr)
        return 128 + signum
    except StorageError as err:
        print(f"error: {err}; nothing written", file=sys.stderr)
        return 2
    metrics = {key: value for key, value in record.items() if key not in ("experiment", "overrides", "members")}
    print(f"{path}{'' if written else ' (unchanged)'}: {json.dumps(metrics)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
