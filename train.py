"""Train one experiment: python train.py [experiment=NAME] [trainer=PRESET] [dotted.key=value ...]

compose config -> plan the run (directory, resume, identity) -> build -> fit -> run_dir/summary.json

A bad command line is refused here, in one line and exit status 2, before torch and Lightning are imported:
the config's schema and checks are the tasks' and model families' declarations (their ``*_config`` modules),
which import neither. runtime/training.py does the rest.
"""
import os
import sys
from pathlib import Path

import datamodules  # noqa: F401  (registers every task's declarations)
import lightning_modules  # noqa: F401  (and every model family's)
from config import Config, ConfigError, compose
from lightning_modules import stopping
from runtime.console import guard_streams
from runtime.run_dirs import RUN_DIR_ENV, check_free

LAUNCHED_RANK = ("LOCAL_RANK", "RANK", "SLURM_PROCID")  # set where a launcher started this process as one rank


def error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def check_early(cfg: Config) -> None:
    """What needs no torch: a run_dir that a live run holds, where this process is the one that starts the run
    (not a rank that a launcher or Lightning started: the run's own rank 0 may hold that lock already)."""
    launched = any(os.environ.get(name, "0") != "0" for name in LAUNCHED_RANK) or os.environ.get(RUN_DIR_ENV)
    if cfg.run_dir and not launched:
        check_free(Path(cfg.run_dir))


def main(argv: list[str]) -> int:
    guard_streams()  # a closed or ASCII-only stdout never stops a run
    stopping.install()  # from here on SIGTERM / SIGINT stop the run at a step, with a checkpoint
    try:
        cfg = compose(argv)
        check_early(cfg)
    except ConfigError as err:
        return error(str(err))
    from runtime.training import train  # torch and Lightning load only for a command line that passed
    return train(cfg)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
