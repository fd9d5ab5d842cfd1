"""Callbacks every experiment uses: a step-based progress bar and a throughput meter; evaluation logging."""
import time

import lightning as L
import torch
from tqdm.auto import tqdm


def log_evaluation(module: L.LightningModule, metrics: dict[str, float], step: int) -> None:
    """Write evaluation metrics to the logger once, at SGD step ``step``, and show them to callbacks.

    ``self.log(on_step=True)`` would rewrite the last evaluation's values at every later batch until the
    next evaluation (a staircase of stale points in TensorBoard).
    """
    values = {name: float(value) for name, value in metrics.items()}
    if module.logger is not None:
        module.logger.log_metrics(values, step=step)  # rank zero only
    module.trainer.callback_metrics.update({name: torch.tensor(value) for name, value in values.items()})


LOSS_WINDOW = 100  # train/loss is the mean over each window of this many SGD steps, however long a batch is


def log_training(module: L.LightningModule, losses: torch.Tensor, step: int,
                 extra: dict[str, float] | None = None) -> None:
    """A batch's per-step losses (steps, ...) ending at SGD step ``step``: train/loss, the mean of each window of
    LOSS_WINDOW steps at the window's last step, written as log_evaluation writes; ``extra`` scalars at ``step``;
    and ``step`` in callback_metrics (the step checkpoints record as logged). Not ``LightningModule.log``: it
    costs about a millisecond a call (it moves its stored metric to the value's device each time)."""
    first = step - losses.shape[0]
    ends = [*range((first // LOSS_WINDOW + 1) * LOSS_WINDOW, step, LOSS_WINDOW), step]
    for start, end in zip([first, *ends], ends):
        log_evaluation(module, {"train/loss": losses[start - first:end - first].mean(),
                                **((extra or {}) if end == step else {})}, end)
    module.trainer.callback_metrics["step"] = torch.tensor(float(step))


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
