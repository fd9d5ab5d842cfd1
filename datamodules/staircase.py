"""The k-step staircase: a regression target whose every step adds one new coordinate (leap complexity 1).

    f(x) = x_s1 + x_s1 x_s2 + ... + x_s1 x_s2 ... x_sk        over x in {+1, -1}^n

for a secret (s1, .., sk), after Abbe, Boix-Adsera and Misiakiewicz (2022, 2023). Its top monomial is the
k-sparse parity of the same secret, but each monomial extends the one before it by a single coordinate, so
SGD climbs it one coordinate at a time, in about linear time, where the parity alone needs n^O(k) steps.

The monomials are orthonormal under the uniform distribution, so E f = 0 and Var f = k. The target is
learned with square loss (``model.loss=square``); a member is solved when its held-out mean squared error
is at most ``SOLVED_RELATIVE_MSE`` of Var f. Inputs come from the parity task's Philox bit stream.
"""
from dataclasses import dataclass
from typing import Optional

import torch

from config import Config, DataConfig, need
from datamodules.parity import secret_for
from datamodules.task import Task, register_task
from kernels import sparse_parity

SOLVED_RELATIVE_MSE = 0.02  # solved: held-out MSE <= 2% of Var f


@dataclass
class StaircaseConfig(DataConfig):
    task: str = "staircase"
    n: int = 50
    k: int = 5
    secret: Optional[list[int]] = None  # the staircase's order; default: drawn from the seed


def staircase(x: torch.Tensor, secret: list[int]) -> torch.Tensor:
    """f(x) (...) for +/-1 inputs x (..., n): the sum of the prefix products over the secret."""
    return x[..., secret].cumprod(-1).sum(-1)


@register_task("staircase")
class StaircaseTask(Task):
    size_key = "data.n"
    configs = {"classifier": StaircaseConfig}
    regression = True
    score_name = "relative_mse"

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        d = cfg.data
        self._secret = list(d.secret) if d.secret is not None else secret_for(cfg.seed, d.n, d.k)

    @classmethod
    def validate(cls, cfg: Config) -> None:
        d = cfg.data
        need(d.n >= 1, "data.n", f"must be >= 1, got {d.n}")
        need(1 <= d.k <= d.n, "data.k", f"must be in [1, data.n ({d.n})], got {d.k}")
        if d.secret is not None:
            need(len(d.secret) == d.k and len(set(d.secret)) == d.k and all(0 <= i < d.n for i in d.secret),
                 "data.secret", f"must be {d.k} distinct indices in [0, {d.n}), got {list(d.secret)}")

    @classmethod
    def input_size(cls, data: StaircaseConfig) -> int:
        return data.n

    @property
    def secret(self) -> list[int]:
        return self._secret

    def keys(self) -> dict:
        return {key: value for key, value in super().keys().items() if key != "secret"}  # written as drawn

    def score(self, f: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Held-out MSE / Var f per member (Var f = k exactly), and solved where it is <= 2%."""
        relative = (f - y).square().mean(1) / self.cfg.data.k
        return relative, relative <= SOLVED_RELATIVE_MSE

    def samples(self, start: int, count: int, streams: list[int], device: torch.device):
        """x (members, count, n) in +/-1 and f(x) (members, count)."""
        d = self.cfg.data
        x, _, _ = sparse_parity(self.cfg.seed, start, count, d.n, self.secret, stream=streams,
                                backend=self.cfg.kernels.backend, device=device, layout="pm1")
        return x, staircase(x, self.secret)

