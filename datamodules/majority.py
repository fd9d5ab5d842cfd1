"""k-sparse majority: the label is the majority vote of the k secret bits (k odd).

A linear threshold of k coordinates, so an MLP learns it in a few hundred SGD steps where the
k-sparse parity of the same (n, k) takes n^O(k): the contrast Barak et al. (2022) draw between
parities and functions with low-degree Fourier mass. It is also the worked example of
docs/extending.md: this file and configs/experiment/majority_mlp.yaml are all it took.
"""
from dataclasses import dataclass

import torch

from config import Config, DataConfig, need
from datamodules.parity import secret_for
from datamodules.task import Task, register_task
from kernels import sparse_parity


@dataclass
class MajorityConfig(DataConfig):
    task: str = "majority"
    n: int = 30
    k: int = 5  # odd: a vote has no ties


@register_task("majority")
class MajorityTask(Task):
    size_key = "data.n"
    configs = {"classifier": MajorityConfig}

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self._secret = secret_for(cfg.seed, cfg.data.n, cfg.data.k)

    @classmethod
    def validate(cls, cfg: Config) -> None:
        d = cfg.data
        need(1 <= d.k <= d.n, "data.k", f"must be in [1, data.n ({d.n})], got {d.k}")
        need(d.k % 2 == 1, "data.k", f"must be odd (a vote without ties), got {d.k}")

    @classmethod
    def input_size(cls, data: MajorityConfig) -> int:
        return data.n

    @property
    def secret(self) -> list[int]:
        return self._secret

    def samples(self, start: int, count: int, streams: list[int], device: torch.device):
        """x (members, count, n) in +/-1 and the vote y (members, count) in +/-1, from the shared bit stream."""
        d = self.cfg.data
        x, _, _ = sparse_parity(self.cfg.seed, start, count, d.n, self.secret, stream=streams,
                                backend=self.cfg.kernels.backend, device=device, layout="pm1")
        return x, x[..., self.secret].sum(-1).sign()

