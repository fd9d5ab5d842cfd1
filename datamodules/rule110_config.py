"""Rule 110's declarations: its data section, checks and sequence layout (datamodules/rule110.py writes the
sequences; its docstring describes the formats)."""
from dataclasses import dataclass
from typing import ClassVar

from config import Config, DataConfig, need
from datamodules.problem import Problem, SequenceLayout, register_task

EQUALS, ANSWER = 2, 3  # tokens 0 and 1 are the cells
VOCAB_SIZE = 4
MAX_GENERATIONS = 31  # a cone pattern (2T + 1 bits) fits two 32-bit counter words
MAX_CELLS = 4096
CHAINS = ("none", "trace", "rows")


@dataclass
class Rule110Config(DataConfig):
    format: ClassVar[str] = "sequence"
    task: str = "rule110"
    cells: int = 17  # w: cells of the ring
    generations: int = 8  # T: steps of Rule 110 (summary.json's ``steps`` counts SGD steps)
    chain: str = "none"  # none | trace | rows


@register_task("rule110")
class Rule110Problem(Problem):
    datamodule = "datamodules.rule110:Rule110Task"
    size_key = "data.cells"
    configs = {"sequence": Rule110Config}

    @classmethod
    def validate(cls, cfg: Config) -> None:
        d = cfg.data
        need(1 <= d.generations <= MAX_GENERATIONS, "data.generations",
             f"must be in [1, {MAX_GENERATIONS}], got {d.generations}")
        need(2 * d.generations + 1 <= d.cells <= MAX_CELLS, "data.cells",
             f"must be in [2 data.generations + 1 = {2 * d.generations + 1}, {MAX_CELLS}] "
             f"(the light cone must not wrap), got {d.cells}")
        need(d.chain in CHAINS, "data.chain", f"{d.chain!r} is not one of {', '.join(CHAINS)}")

    @classmethod
    def input_space(cls, data: Rule110Config) -> int:
        return 2 ** data.cells  # first rows of the ring

    @classmethod
    def layout(cls, data: Rule110Config) -> SequenceLayout:
        completion = {"none": 1, "trace": data.generations ** 2, "rows": data.generations * data.cells + 2}[data.chain]
        return SequenceLayout(VOCAB_SIZE, data.cells + 1, data.cells + 1 + completion, 1)
