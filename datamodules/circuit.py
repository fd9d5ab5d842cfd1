"""Gate-level benchmark circuits (ISCAS-85, EPFL, or a user's netlist) as a next-token task.

The prompt is the circuit's n primary inputs, in name order (N1, N2, .., N10: numbers compare as numbers), then a
separator. ``data.chain`` picks the completion:

* ``none``: the chosen outputs (``data.outputs``, default all, in name order);
* ``gates``: every gate of the outputs' fan-in cone, ordered by level (longest path from the inputs), then
  name, one token per gate value, then the outputs. Each token is a linear threshold of earlier tokens
  (datamodules/circuit_config.py: ``Unit``): AND, OR, NAND, NOR, NOT and BUF of any fan-in directly; a XOR or
  XNOR of two values as AND, OR and [OR - AND >= 1] (XNOR: [AND - OR >= 0]), as parity's ``gates`` chain writes
  it, a wider one as a chain of two-input ones.

Example, c17 (six NANDs; inputs N1 N2 N3 N6 N7, outputs N22 N23), inputs 1 0 1 1 0 (``|``: the separator,
token 2)::

    none:   1 0 1 1 0 | 1 0
    gates:  1 0 1 1 0 | 0 0 1 1 1 0 1 0        (N10 N11 N16 N19 N22 N23, then N22 N23 again)

Inputs: sample g of stream s takes input i from bit i % 32 of word (i // 32) % 4 of
Philox(key=seed, counter=(c W + i // 128, g_lo, g_hi, s)), W = ceil(n / 128) calls per candidate c. Where the
input space is small (n <= SPLIT_BITS) a pattern p (input i as bit i) is held out iff the top two bits of
Philox(key=seed, counter=(p, 0, 0, SPLIT_STREAM)) word 0 are both set, a quarter of the patterns: a training
stream (even s) keeps the first of its candidates that is not held out, an evaluation stream the first that is,
as datamodules/rule110.py does. Larger input spaces are not split: the evaluation stream's samples are
never the training stream's (datamodules/stream.py), and a repeated pattern is rare (n > 20: a 2^-20 chance
per pair of samples or less).

The program is compiled once per device into one set of index tensors per level and evaluated level by level
on the whole batch.
"""
from typing import NamedTuple

import torch

from config import ConfigError
from datamodules.circuit_config import SEPARATOR, SPLIT_BITS, CircuitProblem, Program, program
from datamodules.stream import first_fitting, is_eval_stream
from datamodules.task import Task
from kernels.philox import philox4x32, sample_words, split_seed

SPLIT_STREAM = 0xFFFFFFFF  # counter word 3 of the split hash (sample streams are small)
CANDIDATES = 8  # input patterns drawn per round where the input space is split


class Level(NamedTuple):
    """The units of one level: value indices written, operand indices (padded), weights (0 on padding), thresholds."""
    targets: torch.Tensor  # (units,)
    operands: torch.Tensor  # (units, widest fan-in)
    weights: torch.Tensor  # (units, widest fan-in)
    thresholds: torch.Tensor  # (units,)


def levels(plan: Program, device: torch.device) -> list[Level]:
    """The program's units grouped by level (a unit's level exceeds its operands'), as tensors on ``device``."""
    n = len(plan.inputs)
    depth = [0] * n
    groups: dict[int, list[int]] = {}
    for j, unit in enumerate(plan.units):
        level = 1 + max((depth[i] for i in unit.operands), default=0)
        depth.append(level)
        groups.setdefault(level, []).append(j)
    out = []
    for level in sorted(groups):
        units = [plan.units[j] for j in groups[level]]
        width = max(1, max(len(u.operands) for u in units))
        pad = [width - len(u.operands) for u in units]
        operands = [list(u.operands) + [0] * p for u, p in zip(units, pad)]
        weights = [list(u.weights) + [0] * p for u, p in zip(units, pad)]
        out.append(Level(torch.tensor([n + j for j in groups[level]], device=device),
                         torch.tensor(operands, dtype=torch.int64, device=device),
                         torch.tensor(weights, dtype=torch.int32, device=device),
                         torch.tensor([u.threshold for u in units], dtype=torch.int32, device=device)))
    return out


def evaluate(compiled: list[Level], inputs: torch.Tensor, units: int) -> torch.Tensor:
    """Every unit's value (count, units), int64 bits, for input bits (count, n), level by level (values are
    kept unit-major, so that a level gathers whole rows)."""
    values = torch.cat([inputs.T.to(torch.int32), inputs.new_zeros(units, inputs.shape[0], dtype=torch.int32)])
    for level in compiled:
        total = (values[level.operands] * level.weights[..., None]).sum(1)
        values[level.targets] = (total >= level.thresholds[:, None]).to(torch.int32)
    return values[inputs.shape[1]:].T.to(torch.int64)


def held_out(seed: int, patterns: torch.Tensor) -> torch.Tensor:
    """Whether each input pattern (int64, input i as bit i; n <= SPLIT_BITS) is in the held-out quarter."""
    key0, key1 = split_seed(seed)
    zero = torch.zeros_like(patterns)
    word = philox4x32(patterns, zero, zero, torch.full_like(patterns, SPLIT_STREAM), key0, key1)[0]
    return (word >> 30) == 3


def pattern_of(bits: torch.Tensor) -> torch.Tensor:
    """Input bits (..., n <= SPLIT_BITS) as one integer per pattern, input i as bit i."""
    return (bits << torch.arange(bits.shape[-1], dtype=torch.int64, device=bits.device)).sum(-1)


def input_bits(seed: int, start: int, count: int, stream: int, n: int, device: torch.device) -> torch.Tensor:
    """Primary input bits (count, n), int64, of samples [start, start + count) of ``stream`` (module docstring)."""
    g_lo, g_hi = sample_words(start, count, device)
    if n > SPLIT_BITS:
        return first_fitting(seed, g_lo, g_hi, stream, n, 1, None)
    return first_fitting(seed, g_lo, g_hi, stream, n, CANDIDATES,
                         lambda bits: held_out(seed, pattern_of(bits)) == is_eval_stream(stream))


class CircuitTask(CircuitProblem, Task):
    def __init__(self, cfg):
        super().__init__(cfg)
        self.plan = program(cfg.data)
        self._levels: dict[torch.device, list[Level]] = {}
        n = len(self.plan.inputs)
        if n <= SPLIT_BITS:
            share = int(held_out(cfg.seed, torch.arange(2 ** n)).sum())
            if share in (0, 2 ** n):
                raise ConfigError(f"seed: with seed {cfg.seed} {'no' if share == 0 else 'every'} input pattern of "
                                  f"{cfg.data.netlist} is held out; choose another seed")

    def identity(self) -> dict:
        """The problem includes the circuit: a netlist file edited since a checkpoint makes another problem."""
        return {**super().identity(), "circuit": self.plan.digest()}

    def levels_on(self, device: torch.device) -> list[Level]:
        """The compiled program on ``device`` (made once per device)."""
        if device not in self._levels:
            self._levels[device] = levels(self.plan, device)
        return self._levels[device]

    def values(self, bits: torch.Tensor) -> torch.Tensor:
        """Every unit's value (count, units) for input bits (count, n): the completion of data.chain=gates."""
        return evaluate(self.levels_on(bits.device), bits, len(self.plan.units))

    def sample(self, start: int, count: int, stream: int, device: torch.device) -> torch.Tensor:
        """Samples [start, start + count) of ``stream``, int64 tokens (count, seq_len)."""
        bits = input_bits(self.cfg.seed, start, count, stream, len(self.plan.inputs), device)
        values = self.values(bits)
        completion = values if self.cfg.data.chain == "gates" else values[:, -len(self.plan.outputs):]
        return torch.cat([bits, torch.full((count, 1), SEPARATOR, dtype=torch.int64, device=device), completion], 1)

    def summary_fields(self) -> dict:
        p = self.plan
        return {**super().summary_fields(), "inputs": len(p.inputs), "outputs_used": len(p.outputs),
                "cone_gates": p.gates, "depth": p.depth, "chain_tokens": len(p.units) if self.cfg.data.chain == "gates"
                else 0}
