"""The k-sparse parity task's declarations: its data sections, checks and sequence layout (datamodules/parity.py
makes the samples; datamodules/cot.py writes its chains)."""
from dataclasses import dataclass
from typing import ClassVar, Optional

from config import Config, DataConfig, need
from datamodules.problem import Problem, SequenceLayout, register_task

VOCAB_SIZE = 3  # tokens 0 and 1 (bits), 2 (separator)
CHAINS = ("none", "sequential", "tree", "gates")


@dataclass
class ParityConfig(DataConfig):
    format: ClassVar[str] = "classifier"
    n: int = 50
    k: int = 3
    noise: float = 0.0  # probability that a training label is flipped
    secret: Optional[list[int]] = None  # default: drawn from the seed


@dataclass
class ParityChainConfig(ParityConfig):
    format: ClassVar[str] = "sequence"
    chain: str = "none"  # none | sequential | tree | gates: the intermediate steps before the answer
    chain_stride: int = 1  # sequential chain: secret bits folded into each token


def chain_len(chain: str, k: int, stride: int = 1) -> int:
    """Completion tokens (answer included) of a chain format."""
    return {"none": 1, "sequential": -(-k // stride), "tree": max(k - 1, 1), "gates": 3 * k - 2}[chain]


def validate_secret(data: DataConfig) -> None:
    """data.secret, where given: data.k distinct indices in [0, data.n)."""
    if data.secret is not None:
        need(len(data.secret) == data.k and len(set(data.secret)) == data.k and all(0 <= i < data.n
                                                                                    for i in data.secret),
             "data.secret", f"must be {data.k} distinct indices in [0, {data.n}), got {list(data.secret)}")


@register_task("parity")
class ParityProblem(Problem):
    datamodule = "datamodules.parity:ParityTask"
    size_key = "data.n"
    configs = {"classifier": ParityConfig, "sequence": ParityChainConfig}
    hidden_progress = True

    @classmethod
    def validate(cls, cfg: Config) -> None:
        d = cfg.data
        need(d.n >= 1, "data.n", f"must be >= 1, got {d.n}")
        need(d.k >= 1, "data.k", f"must be >= 1, got {d.k}")
        need(d.k <= d.n, "data.k", f"must be <= data.n ({d.n}), got {d.k}")
        need(0.0 <= d.noise < 0.5, "data.noise", f"must be in [0, 0.5), got {d.noise}")  # nan fails too
        validate_secret(d)
        if d.format == "sequence":
            need(d.chain in CHAINS, "data.chain", f"{d.chain!r} is not one of {', '.join(CHAINS)}")
            need(d.chain_stride >= 1, "data.chain_stride", f"must be >= 1, got {d.chain_stride}")
            need(d.chain_stride == 1 or d.chain == "sequential", "data.chain_stride",
                 f"applies to data.chain=sequential only, got {d.chain_stride} with data.chain={d.chain}")

    @classmethod
    def input_size(cls, data: ParityConfig) -> int:
        return data.n

    @classmethod
    def input_space(cls, data: ParityConfig) -> int:
        return 2 ** data.n  # n random bits

    @classmethod
    def secret_size(cls, data: ParityConfig) -> int:
        return data.k

    @classmethod
    def layout(cls, data: ParityChainConfig) -> SequenceLayout:
        return SequenceLayout(VOCAB_SIZE, data.n + 1, data.n + 1 + chain_len(data.chain, data.k, data.chain_stride), 1)
