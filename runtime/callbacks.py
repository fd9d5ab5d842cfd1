"""Callbacks every experiment uses: a step-based progress bar, a throughput meter and the stop on a signal."""
import logging
import signal
import time
import warnings
from typing import Optional

import lightning as L
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from lightning_modules import stopping


def quiet_lightning() -> None:
    """Lightning's notices that say nothing about a run. At import: ddp_spawn workers, which unpickle these
    callbacks and never import runtime/training.py, are quieted too."""
    for noise in (".*does not have many workers.*", ".*weights_only.*", ".*treespec.*LeafSpec.*",
                  ".*no pre-optimization state was saved.*", ".*dirpath has changed from.*"):
        warnings.filterwarnings("ignore", noise)
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)


quiet_lightning()


class StepProgressBar(L.Callback):
    """One bar over SGD steps (not Lightning batches) with the metrics marked prog_bar."""
    # Not Lightning's TQDMProgressBar: it counts batches per epoch, and here one infinite epoch's batch is many steps.

    def __init__(self, solved_key: str = "eval/members_solved"):
        self.solved_key = solved_key
        self.bar = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            self.bar = tqdm(total=trainer.max_steps, initial=trainer.global_step, desc="train",
                            unit="step", dynamic_ncols=True, smoothing=0.1)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.bar is None:
            return
        self.bar.update(trainer.global_step - self.bar.n)
        metrics = trainer.callback_metrics
        postfix = {"loss": f"{float(metrics['train/loss']):.4f}"} if "train/loss" in metrics else {}
        if "eval/accuracy_mean" in metrics:
            postfix["acc"] = f"{float(metrics['eval/accuracy_mean']):.4f}"
        if self.solved_key in metrics:
            members = getattr(pl_module, "members", [0])
            postfix["solved"] = f"{int(metrics[self.solved_key])}/{len(members)}"
        self.bar.set_postfix(postfix, refresh=False)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class Throughput(L.Callback):
    """Training wall time, and steady-state samples/s (samples = steps x global batch x members).
    Not Lightning's ThroughputMonitor: it times per batch on a rolling window and logs against its own batch
    count, while this reports one rate per run for summary.json, and logs against SGD steps.

    The rate is timed from the end of the first batch, so one-off start-up work (the TensorBoard
    writer, first-call allocations) does not count; ``wall_s`` is the whole training loop. A run that ends
    in its first batch has no such window: its rate is then its steps over ``wall_s``, start-up included.
    """

    def __init__(self, samples_per_step: int, log_every_n_steps: int = 500):
        self.samples_per_step = samples_per_step
        self.log_every_n_steps = log_every_n_steps
        self.wall_s = self.rate_s = 0.0
        self.rate_steps = 0
        self._start = self._mark = self._first = None
        self._mark_step = self._first_step = self._start_step = 0

    def on_train_start(self, trainer, pl_module) -> None:
        self._start, self._start_step = time.perf_counter(), trainer.global_step
        self._first = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now, step = time.perf_counter(), trainer.global_step
        if self._first is None:
            self._first = self._mark = now
            self._first_step = self._mark_step = step
        elif step - self._mark_step >= self.log_every_n_steps:
            self._log(trainer, (step - self._mark_step) * self.samples_per_step / (now - self._mark))
            self._mark, self._mark_step = now, step

    def on_train_end(self, trainer, pl_module) -> None:
        now = time.perf_counter()
        self.wall_s = now - self._start
        if self._first is not None and trainer.global_step > self._first_step:
            self.rate_s, self.rate_steps = now - self._first, trainer.global_step - self._first_step
            if trainer.global_step > self._mark_step:
                self._log(trainer, (trainer.global_step - self._mark_step) * self.samples_per_step / (now - self._mark))
        elif trainer.global_step > self._start_step:
            self.rate_s, self.rate_steps = self.wall_s, trainer.global_step - self._start_step
        # callback_metrics travel back from ddp_spawn workers, where this callback ran, to the main process
        trainer.callback_metrics.update({"run/samples_per_s": torch.tensor(self.samples_per_s, dtype=torch.float64),
                                         "run/train_wall_s": torch.tensor(self.wall_s, dtype=torch.float64)})

    @staticmethod
    def _log(trainer, rate: float) -> None:
        if trainer.logger is not None:
            trainer.logger.log_metrics({"perf/samples_per_s": rate}, step=trainer.global_step)

    @property
    def samples_per_s(self) -> float:
        return self.rate_steps * self.samples_per_step / self.rate_s if self.rate_s else 0.0


def stopped_by(trainer: L.Trainer) -> Optional[int]:
    """The signal that ended ``trainer``'s fit early (set by StopOnSignal on every rank), or None."""
    signum = trainer.callback_metrics.get("run/stop_signal")
    return None if signum is None else int(signum)


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
        stopping.install()
        launcher = trainer.strategy.launcher
        stopping.FORWARD[:] = [launcher.kill] if getattr(launcher, "procs", None) else []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        stop = stopping.requested()
        if self._group is not None:
            stop = self._agreed(stop)
        if stop:  # callback_metrics travel back from ddp_spawn workers to the main process
            trainer.callback_metrics["run/stop_signal"] = torch.tensor(stopping.received() or signal.SIGTERM)
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
        stopping.FORWARD.clear()
