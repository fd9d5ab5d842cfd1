"""How a training step writes its metrics: once, at the SGD step they belong to (not LightningModule.log)."""
import lightning as L
import torch


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
