"""The k-step staircase: a regression target whose every step adds one new coordinate (leap complexity 1).

    f(x) = x_s1 + x_s1 x_s2 + ... + x_s1 x_s2 ... x_sk        over x in {+1, -1}^n

for a secret (s1, .., sk), after Abbe, Boix-Adsera and Misiakiewicz (2022, 2023). Its top monomial is the
k-sparse parity of the same secret, but each monomial extends the one before it by a single coordinate, so
SGD climbs it one coordinate at a time, in about linear time, where the parity alone needs n^O(k) steps.

The monomials are orthonormal under the uniform distribution, so E f = 0 and Var f = k. The target is
learned with square loss (``model.loss=square``); a member is solved when its held-out mean squared error
is at most ``SOLVED_RELATIVE_MSE`` of Var f. Inputs come from the parity task's Philox bit stream.
"""
import torch

from config import Config
from datamodules.parity import secret_for
from datamodules.staircase_config import StaircaseProblem
from datamodules.task import Task
from kernels import sparse_parity
from kernels.sparse_parity import sparse_parity_at

SOLVED_RELATIVE_MSE = 0.02  # solved: held-out MSE <= 2% of Var f


def staircase(x: torch.Tensor, secret: list[int]) -> torch.Tensor:
    """f(x) (...) for +/-1 inputs x (..., n): the sum of the prefix products over the secret."""
    return x[..., secret].cumprod(-1).sum(-1)


class StaircaseTask(StaircaseProblem, Task):
    def __init__(self, cfg: Config):
        super().__init__(cfg)
        d = cfg.data
        self._secret = list(d.secret) if d.secret is not None else secret_for(cfg.seed, d.n, d.k)

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

    def samples_at(self, index: torch.Tensor, streams: list[int]):
        """The samples at ``index`` (members, count), for a finite training set."""
        x, _, _ = sparse_parity_at(self.cfg.seed, index, self.cfg.data.n, self.secret, stream=streams, layout="pm1")
        return x, staircase(x, self.secret)

