"""The optimizer section made real: optimizer, learning-rate schedule and per-member gradient clipping."""
import math
from typing import Optional

import torch

from config import OptimConfig


def lr_factor(step: int, warmup: int, total: int, schedule: str) -> float:
    """Linear warmup over ``warmup`` steps, then constant or cosine decay to 10% at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def optimizer(params, o: OptimConfig) -> torch.optim.Optimizer:
    """``optim.name`` over ``params`` (tensors or param groups, which may set their own weight decay)."""
    if o.name in ("adam", "adamw"):
        adam = torch.optim.Adam if o.name == "adam" else torch.optim.AdamW
        return adam(params, lr=o.lr, weight_decay=o.weight_decay, foreach=True)
    return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay, foreach=True)


def scheduled(o: OptimConfig) -> bool:
    """Whether the learning rate changes over steps (warmup or a decaying schedule)."""
    return o.warmup_steps > 0 or o.schedule != "constant"


def lightning_optimizers(opt: torch.optim.Optimizer, o: OptimConfig, max_steps: int, always: bool = False):
    """configure_optimizers' return: the optimizer, with a per-step LambdaLR where the rate is scheduled
    (``always``: a constant one too)."""
    if not (always or scheduled(o)):
        return opt
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, o.warmup_steps, max_steps, o.schedule))
    return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


@torch.no_grad()
def clip_per_member(grads: list[torch.Tensor], max_norm: float) -> Optional[torch.Tensor]:
    """Scale each member's gradient (dim 0 of every tensor) to norm <= ``max_norm``, in place, as
    torch.nn.utils.clip_grad_norm_ does for one model; returns the norms (E,)."""
    norms = torch.stack([g.reshape(g.shape[0], -1).square().sum(1) for g in grads]).sum(0).sqrt()
    scale = (max_norm / (norms + 1e-6)).clamp_(max=1.0)
    for g in grads:
        g.mul_(scale.view(-1, *[1] * (g.dim() - 1)))
    return norms
