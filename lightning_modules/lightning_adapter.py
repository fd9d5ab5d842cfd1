"""The one place that uses Lightning's private API: SGD steps taken inside one Lightning batch.

A module may run many SGD steps per Lightning batch (a fused loop, a C++ step, a CUDA graph). Lightning counts
``trainer.global_step`` in ``LightningOptimizer.step`` through two private hooks, ``_on_before_step`` and
``_on_after_step``; calling them around each of our steps keeps step-based checkpoints, ``max_steps`` and
logging exact. Calling ``opt.step()`` itself would also dispatch its per-step callback hooks, which costs more
than the step of a small model. ``tests/test_lightning_adapter.py`` fails loudly if Lightning changes this;
pyproject.toml pins the tested range.
"""
import os
from pathlib import Path
from typing import Callable, NamedTuple

import lightning as L


class StepCounter(NamedTuple):
    """Calls around one optimizer step that make Lightning count it."""
    before: Callable[[], None]
    after: Callable[[], None]


def step_counter(opt) -> StepCounter:
    """The step counter of Lightning's optimizer wrapper ``opt`` (``self.optimizers()`` in a LightningModule)."""
    try:
        return StepCounter(opt._on_before_step, opt._on_after_step)
    except AttributeError:
        raise RuntimeError(f"lightning {L.__version__}: LightningOptimizer has no _on_before_step/_on_after_step; "
                           "lightning_modules/lightning_adapter.py needs updating for this version") from None


def batches_that_stepped(trainer: L.Trainer) -> int:
    """Lightning's count of finished batches that stepped: its x-axis for logged metrics without a "step" value."""
    return trainer.fit_loop.epoch_loop._batches_that_stepped


def set_default_root_dir(trainer: L.Trainer, path: Path) -> None:
    """Give a Trainer built before its run directory was known that directory as ``default_root_dir`` (where
    Lightning's SLURM requeue looks for hpc_ckpt_N.ckpt to resume); the constructor argument is its only setter."""
    if not hasattr(trainer, "_default_root_dir"):
        raise RuntimeError(f"lightning {L.__version__}: Trainer has no _default_root_dir; "
                           "lightning_modules/lightning_adapter.py needs updating for this version")
    trainer._default_root_dir = os.fspath(path)
