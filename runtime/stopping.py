"""Stop on SIGTERM or SIGINT at the current SGD step, with a checkpoint there (docs/multinode.md).

``install()`` (train.py, before anything is built) makes both signals set a flag instead of killing the
process or raising KeyboardInterrupt mid-write; a second signal of either kind ends the process at
once (exit 128 + signal; checkpoint writes are atomic, so nothing on disk is torn). The training
loops call ``requested()`` between SGD steps and cut their batch short; ``StopOnSignal`` then ends
fit at that batch's end, every rank at the same step, and train.py saves last.ckpt, says so in one
line and exits 128 + signal without a summary.json.
"""
import os
import signal
from typing import Optional

import lightning as L
import torch
import torch.distributed as dist

SIGNALS = (signal.SIGTERM, signal.SIGINT)
_received: Optional[int] = None


def requested() -> bool:
    """Whether a stop signal has arrived (cheap: the training loops call it every step)."""
    return _received is not None


def received() -> Optional[int]:
    """The signal number that asked this process to stop, or None."""
    return _received


def stopped_by(trainer: L.Trainer) -> Optional[int]:
    """The signal that ended ``trainer``'s fit early (set by StopOnSignal on every rank), or None."""
    signum = trainer.callback_metrics.get("run/stop_signal")
    return None if signum is None else int(signum)


def _handler(signum: int, frame) -> None:
    global _received
    if _received is not None:  # asked twice: stop now
        os._exit(128 + signum)
    _received = signum
    for forward in _forward:
        forward(signum)


_forward: list = []  # where to pass a signal on: the ranks Lightning's launcher started


def install() -> None:
    """Route SIGTERM and SIGINT to the stop flag (main thread only, as Python requires)."""
    for signum in SIGNALS:
        signal.signal(signum, _handler)


class StopOnSignal(L.Callback):
    """Ends fit at the end of the batch in which a stop signal arrived, on every rank at the same step.

    Lightning registers its own SIGTERM handler when fit starts (it stops only at a batch end, saves
    nothing and lets the process exit 0); ``on_train_start`` puts ours back and forwards to the ranks
    Lightning's launcher started, as its handler did. Under DDP the ranks agree through a non-blocking
    all-reduce (MAX) of their flags on a CPU group, waited for one batch later: no per-step sync.
    """

    def __init__(self):
        self._group = None
        self._flag: Optional[torch.Tensor] = None
        self._work = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            self._group = dist.new_group(backend="gloo")  # collective: every rank builds it here

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        install()
        launcher = trainer.strategy.launcher
        _forward[:] = [launcher.kill] if getattr(launcher, "procs", None) else []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        stop = requested()
        if self._group is not None:
            stop = self._agreed(stop)
        if stop:  # callback_metrics travel back from ddp_spawn workers to the main process
            trainer.callback_metrics["run/stop_signal"] = torch.tensor(received() or signal.SIGTERM)
            trainer.should_stop = True

    def _agreed(self, local: bool) -> bool:
        """Whether any rank had asked to stop one batch ago (every rank answers alike)."""
        stop = False
        if self._work is not None:
            self._work.wait()
            stop = bool(self._flag.item())
        self._flag = torch.tensor([int(local)], dtype=torch.int32)
        self._work = dist.all_reduce(self._flag, op=dist.ReduceOp.MAX, group=self._group, async_op=True)
        return stop

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._work is not None:  # every rank issued the same number of all-reduces
            self._work.wait()
            self._work = None
        _forward.clear()
