"""A SLURM array job over cells: one train.py command a line, one array task a line."""
import shlex
from pathlib import Path
from typing import Optional

from runtime.cells import ROOT, Cell, train_command


def write_slurm(cells: list[Cell], out: Path, jobs: Optional[int]) -> Path:
    """DIR/cells.txt (one train.py command a line) and DIR/sweep.sbatch, an array job over its lines
    (``jobs``: at most that many tasks at once)."""
    (out / "cells.txt").write_text("".join(shlex.join(train_command(c)) + "\n" for c in cells))
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
