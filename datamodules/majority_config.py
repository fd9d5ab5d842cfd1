"""k-sparse majority's declarations (datamodules/majority.py makes the samples)."""
from dataclasses import dataclass

from config import Config, DataConfig, need
from datamodules.problem import Problem, register_task


@dataclass
class MajorityConfig(DataConfig):
    task: str = "majority"
    n: int = 30
    k: int = 5  # odd: a vote has no ties


@register_task("majority")
class MajorityProblem(Problem):
    datamodule = "datamodules.majority:MajorityTask"
    size_key = "data.n"
    configs = {"classifier": MajorityConfig}
    hidden_progress = False  # its label is a vote, not a character: the hidden-progress measures are parity's

    @classmethod
    def validate(cls, cfg: Config) -> None:
        d = cfg.data
        need(1 <= d.k <= d.n, "data.k", f"must be in [1, data.n ({d.n})], got {d.k}")
        need(d.k % 2 == 1, "data.k", f"must be odd (a vote without ties), got {d.k}")

    @classmethod
    def input_size(cls, data: MajorityConfig) -> int:
        return data.n

    @classmethod
    def input_space(cls, data: MajorityConfig) -> int:
        return 2 ** data.n  # n random bits
