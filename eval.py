"""Evaluate a finished run again: python eval.py RUN_DIR [key=value ...]

run_dir/config.yaml + checkpoints/last.ckpt -> held-out metrics -> run_dir/eval.json (or, for overrides
that differ from the run's own settings, eval-KEY=VALUE.json; runtime/experiment.py gives the rule).
"""
import json
import sys
from pathlib import Path

from config import ConfigError
from runtime.experiment import evaluate_run


def main(argv: list[str]) -> int:
    if not argv or "=" in argv[0]:
        print("error: usage: python eval.py RUN_DIR [key=value ...]", file=sys.stderr)
        return 2
    try:
        path, record, written = evaluate_run(Path(argv[0]), argv[1:])
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    metrics = {key: value for key, value in record.items() if key not in ("experiment", "overrides", "members")}
    print(f"{path}{'' if written else ' (unchanged)'}: {json.dumps(metrics)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
