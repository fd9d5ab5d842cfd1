"""The fit on a finite training set (``data.train_size``), beside the held-out score, for every model family.

Each evaluation also scores every member on ``Task.train_subset`` (the training set's first min(N, eval.size)
samples: all of it where N <= eval.size) and records the first step a member counts as solved there as its
``fit_step``, as the held-out score gives ``solved_step``. The buffers exist only in the finite regime, so a
module of the endless stream keeps the state dict its checkpoints were written with.
"""
import torch
from torch import nn


def add_fit_buffers(module: nn.Module, members: int, finite: bool) -> None:
    """``fit_step`` (first evaluation solved on the training set, -1 until then) and ``train_score`` per member,
    where the run has a finite training set."""
    if finite:
        module.register_buffer("fit_step", torch.full((members,), -1, dtype=torch.long))
        module.register_buffer("train_score", torch.zeros(members))


def record_fit(module: nn.Module, score: torch.Tensor, fit_now: torch.Tensor, step: int, name: str) -> dict:
    """Keep each member's training-set score and first fit step; the TensorBoard scalars to log at ``step``."""
    module.train_score.copy_(score)
    module.fit_step[fit_now & (module.fit_step < 0)] = step
    return {f"train_set/{name}": score.mean(), f"train_set/{name}_min": score.min(),
            "train_set/members_fit": int((module.fit_step >= 0).sum())}


def fit_results(module: nn.Module, name: str) -> dict:
    """summary.json's ``fit_step`` and ``final_train_<name>``: per member for an ensemble, plain for one member
    (nothing without a finite training set)."""
    if not hasattr(module, "fit_step"):
        return {}
    fit = [s if s >= 0 else None for s in module.fit_step.tolist()]
    return {"fit_step": fit[0] if len(fit) == 1 else fit, **train_score_fields(module.train_score, name)}


def train_score_fields(score: torch.Tensor, name: str) -> dict:
    """``final_train_<name>`` of a training-set score (E,): per member for an ensemble, plain for one member."""
    values = score.tolist()
    return {f"final_train_{name}": values[0] if len(values) == 1 else values}
