"""k-sparse majority: the label is the majority vote of the k secret bits (k odd).

A linear threshold of k coordinates, so an MLP learns it in a few hundred SGD steps where the
k-sparse parity of the same (n, k) takes n^O(k): the contrast Barak et al. (2022) draw between
parities and functions with low-degree Fourier mass. It is also the worked example of
docs/extending.md: this file, majority_config.py and configs/experiment/majority_mlp.yaml are all it took.
"""
import torch

from config import Config
from datamodules.majority_config import MajorityProblem
from datamodules.parity import secret_for
from datamodules.task import Task
from kernels import sparse_parity
from kernels.sparse_parity import sparse_parity_at


class MajorityTask(MajorityProblem, Task):
    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self._secret = secret_for(cfg.seed, cfg.data.n, cfg.data.k)

    @property
    def secret(self) -> list[int]:
        return self._secret

    def samples(self, start: int, count: int, streams: list[int], device: torch.device):
        """x (members, count, n) in +/-1 and the vote y (members, count) in +/-1, from the shared bit stream."""
        d = self.cfg.data
        x, _, _ = sparse_parity(self.cfg.seed, start, count, d.n, self.secret, stream=streams,
                                backend=self.cfg.kernels.backend, device=device, layout="pm1")
        return x, x[..., self.secret].sum(-1).sign()

    def samples_at(self, index: torch.Tensor, streams: list[int]):
        """The samples at ``index`` (members, count), for a finite training set."""
        x, _, _ = sparse_parity_at(self.cfg.seed, index, self.cfg.data.n, self.secret, stream=streams, layout="pm1")
        return x, x[..., self.secret].sum(-1).sign()
