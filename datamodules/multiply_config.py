"""d-digit multiplication's declarations: its data section, checks and sequence lengths (datamodules/multiply.py
writes the sequences; its docstring describes the formats)."""
from dataclasses import dataclass
from typing import ClassVar

from config import Config, DataConfig, need
from datamodules.problem import Problem, SequenceLayout, register_task

TIMES, EQUALS, PLUS, SUM, ANSWER = 10, 11, 12, 13, 14  # tokens 0..9 are the digits
MAX_DIGITS = 9  # a and b fit one 32-bit word, a * b fits int64
VOCAB_SIZES = {"none": 15, "sequential": 15, "malach": 17, "malach_joined": 117}  # tokens a chain can use
CHAINS = tuple(VOCAB_SIZES)


@dataclass
class MultiplyConfig(DataConfig):
    format: ClassVar[str] = "sequence"
    task: str = "multiply"
    digits: int = 2  # d: operands are d-digit numbers
    chain: str = "none"  # none | sequential | malach | malach_joined


def chain_len(digits: int, chain: str) -> int:
    """Tokens between the prompt's ``=`` and the answer's first digit (tests/test_multiply.py checks it against
    the sequences written)."""
    d = digits
    if chain == "none":
        return 0
    if chain == "sequential":  # d partial products of 2d digits joined by +, d - 1 running sums, then >
        return 2 * d * d + (d - 1) + (d - 1) * (2 * d + 1) + 1
    pair = 1 if chain == "malach_joined" else 3  # a digit pair: one joined token, or i x j
    expansion = 2 + sum(i + 3 for i in range(d)) + (d - 1)  # ( a_i x 10^i joined by + )
    terms = sum(pair + i + j + 4 for i in range(d) for j in range(d)) + d * d - 1  # pair x 10^i x 10^j
    values = sum(i + j + 2 for i in range(d) for j in range(d)) + d * d - 1  # each term's value
    return 2 * expansion + 1 + 1 + terms + 1 + values + 1  # x between the expansions, and three =


@register_task("multiply")
class MultiplyProblem(Problem):
    datamodule = "datamodules.multiply:MultiplyTask"
    size_key = "data.digits"
    configs = {"sequence": MultiplyConfig}

    @classmethod
    def validate(cls, cfg: Config) -> None:
        d = cfg.data
        need(1 <= d.digits <= MAX_DIGITS, "data.digits", f"must be in [1, {MAX_DIGITS}], got {d.digits}")
        need(d.chain in CHAINS, "data.chain", f"{d.chain!r} is not one of {', '.join(CHAINS)}")

    @classmethod
    def input_space(cls, data: MultiplyConfig) -> int:
        return (9 * 10 ** (data.digits - 1)) ** 2  # pairs of d-digit operands (about 3/4 of them on the training side)

    @classmethod
    def layout(cls, data: MultiplyConfig) -> SequenceLayout:
        prompt, answer = 2 * data.digits + 2, 2 * data.digits
        return SequenceLayout(VOCAB_SIZES[data.chain], prompt, prompt + chain_len(data.digits, data.chain) + answer,
                              answer)
