"""The k-step staircase's declarations (datamodules/staircase.py makes the samples)."""
from dataclasses import dataclass
from typing import Optional

from config import Config, DataConfig, need
from datamodules.parity_config import validate_secret
from datamodules.problem import Problem, register_task


@dataclass
class StaircaseConfig(DataConfig):
    task: str = "staircase"
    n: int = 50
    k: int = 5
    secret: Optional[list[int]] = None  # the staircase's order; default: drawn from the seed


@register_task("staircase")
class StaircaseProblem(Problem):
    datamodule = "datamodules.staircase:StaircaseTask"
    size_key = "data.n"
    configs = {"classifier": StaircaseConfig}
    regression = True
    score_name = "relative_mse"
    hidden_progress = True

    @classmethod
    def validate(cls, cfg: Config) -> None:
        d = cfg.data
        need(d.n >= 1, "data.n", f"must be >= 1, got {d.n}")
        need(1 <= d.k <= d.n, "data.k", f"must be in [1, data.n ({d.n})], got {d.k}")
        validate_secret(d)

    @classmethod
    def input_size(cls, data: StaircaseConfig) -> int:
        return data.n

    @classmethod
    def input_space(cls, data: StaircaseConfig) -> int:
        return 2 ** data.n  # n random bits

    @classmethod
    def secret_size(cls, data: StaircaseConfig) -> int:
        return data.k
