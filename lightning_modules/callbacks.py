"""Callbacks every experiment uses: a step-based progress bar and a throughput meter."""
import time

import lightning as L
from tqdm.auto import tqdm


class StepProgressBar(L.Callback):
    """One bar over SGD steps (not Lightning batches) with the metrics marked prog_bar."""

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
    """Wall time of the training loop and samples/s (samples = steps x global batch x members)."""

    def __init__(self, samples_per_step: int, log_every_n_steps: int = 500):
        self.samples_per_step = samples_per_step
        self.log_every_n_steps = log_every_n_steps
        self.wall_s = 0.0
        self.steps = 0
        self._start = self._mark = None
        self._mark_step = 0

    def on_train_start(self, trainer, pl_module) -> None:
        self._start = self._mark = time.perf_counter()
        self._first_step = self._mark_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step - self._mark_step >= self.log_every_n_steps:
            now = time.perf_counter()
            rate = (step - self._mark_step) * self.samples_per_step / (now - self._mark)
            pl_module.log("perf/samples_per_s", rate, on_step=True)
            self._mark, self._mark_step = now, step

    def on_train_end(self, trainer, pl_module) -> None:
        self.wall_s = time.perf_counter() - self._start
        self.steps = trainer.global_step - self._first_step

    @property
    def samples_per_s(self) -> float:
        return self.steps * self.samples_per_step / self.wall_s if self.wall_s else 0.0
