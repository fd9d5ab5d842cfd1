"""d-digit by d-digit multiplication as a next-token task, with or without a chain of thought.

Operands are true d-digit numbers, a, b in [10^(d-1), 10^d). The prompt writes them most significant
digit first, ``a * b =``; the answer is a * b, zero-padded to 2d digits, most significant first.
``data.chain`` picks the completion:

* ``none``: the answer alone;
* ``sequential``: the long-multiplication steps, every number least significant digit first and
  zero-padded to 2d digits (so a carry flows in the order the digits are written):
  the partial products p_j = a * b_j * 10^j, joined by ``+``; then the running sums
  s_j = p_0 + .. + p_j for j = 1 .. d-1, each after a ``;`` (s_(d-1) = a * b); then ``>`` and the answer;
* ``malach``: the digit-wise format of Malach (2024): the digit expansions of a and b,
  ``(a_0 * 1 + a_1 * 10 + ..) * (b_0 * 1 + ..) =``; then every digit-pair term a_i * b_j * 10^i * 10^j,
  i outer, j inner, joined by ``+``, then ``=``; then the same terms' values, each most significant
  digit first and zero-padded to i + j + 2 digits, joined by ``+``, then ``=``; then the answer.
  Digits are indexed least significant first (a_0 is a's units digit), powers of ten are written as
  numbers (``1 0 0``), and ``*`` stands for Malach's ``x``;
* ``malach_joined``: the same, with each digit pair a_i * b_j of the terms written as one token
  (100 more tokens, rendered ``ixj``).

Example, d = 2, a = 12, b = 34 (p_0 = 48, p_1 = 360, s_1 = 408)::

    none:           1 2 * 3 4 = 0 4 0 8
    sequential:     1 2 * 3 4 = 8 4 0 0 + 0 6 3 0 ; 8 0 4 0 > 0 4 0 8
    malach:         1 2 * 3 4 = ( 2 * 1 + 1 * 1 0 ) * ( 4 * 1 + 3 * 1 0 ) =
                    2 * 4 * 1 * 1 + 2 * 3 * 1 * 1 0 + 1 * 4 * 1 0 * 1 + 1 * 3 * 1 0 * 1 0 =
                    0 8 + 0 6 0 + 0 4 0 + 0 3 0 0 = 0 4 0 8
    malach_joined:  as malach, with the terms  2x4 * 1 * 1 + 2x3 * 1 * 1 0 + 1x4 * 1 0 * 1 + 1x3 * 1 0 * 1 0

Held-out pairs: (a, b) is held out iff the top two bits of Philox(key=seed, counter=(a, b, 0,
SPLIT_STREAM)) word 0 are both set, a quarter of the operand space (the paper's 75/25 split), the same
on every rank. Sample g of stream s (even: training, odd: held out) is the first of its candidate pairs that
lies on the stream's side of the split; candidate c takes a and b from words 2 (c % 2) and
2 (c % 2) + 1 of Philox(key=seed, counter=(c // 2, g_lo, g_hi, s)) as ``10^(d-1) + word % (9 * 10^(d-1))``,
CANDIDATES at a time until one fits. So a sample is a pure function of (seed, stream, g), training
never sees a held-out pair, and ranks slice the global batch as in datamodules/stream.py.
"""

import torch

from datamodules.multiply_config import ANSWER, EQUALS, PLUS, SUM, TIMES, MultiplyProblem
from datamodules.stream import is_eval_stream, joined
from datamodules.task import Task
from kernels.philox import MASK32, philox4x32, sample_words, split_seed

OPEN, CLOSE = 15, 16  # the brackets of the malach chains
PAIR = 17  # malach_joined: token PAIR + 10 i + j is the digit pair i x j
SYMBOLS = list("0123456789*=+;>()") + [f"{i}x{j}" for i in range(10) for j in range(10)]
SPLIT_STREAM = 0xFFFFFFFF  # counter word 3 of the split hash (sample streams are 0 and 1)
CANDIDATES = 8  # pairs drawn per round; a sample whose 8 all miss its side draws 8 more

def held_out(seed: int, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Whether each pair (a, b) is in the held-out quarter of the operand space (bool, a's shape)."""
    key0, key1 = split_seed(seed)
    word = philox4x32(a, b, torch.zeros_like(a), torch.full_like(a, SPLIT_STREAM), key0, key1)[0]
    return (word >> 30) == 3

def operands(seed: int, start: int, count: int, stream: int, digits: int, held: bool,
             device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Operand pairs of samples [start, start + count) of ``stream``, all on the ``held`` side of the split."""
    return operands_of(seed, *sample_words(start, count, device), stream, digits, held)


def operands_of(seed: int, g_lo: torch.Tensor, g_hi: torch.Tensor, stream: int, digits: int,
                held: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Operand pairs of samples g = g_hi 2^32 + g_lo (count,) of ``stream``, on the ``held`` side of the split."""
    key0, key1 = split_seed(seed)
    lowest, span = 10 ** (digits - 1), 9 * 10 ** (digits - 1)
    count, device = g_lo.numel(), g_lo.device
    a = torch.empty(count, dtype=torch.int64, device=device)
    b = torch.empty_like(a)
    pending = torch.arange(count, device=device)
    calls_per_round = CANDIDATES // 2
    round_ = 0
    while pending.numel():
        calls = torch.arange(round_ * calls_per_round, (round_ + 1) * calls_per_round, device=device)
        words = torch.stack(philox4x32(calls[None], g_lo[pending, None], g_hi[pending, None],
                                       torch.full_like(calls[None], stream), key0, key1), dim=-1)
        pairs = lowest + words.view(pending.numel(), CANDIDATES, 2) % span  # (pending, candidates, 2)
        fits = held_out(seed, pairs[..., 0], pairs[..., 1]) == held
        found = fits.any(1)
        first = fits.to(torch.int8).argmax(1)  # the first fitting candidate
        chosen = pairs[torch.arange(pending.numel(), device=device), first]
        a[pending[found]], b[pending[found]] = chosen[found, 0], chosen[found, 1]
        pending = pending[~found]
        round_ += 1
    return a, b

def digits_of(x: torch.Tensor, width: int, msb_first: bool) -> torch.Tensor:
    """The decimal digits of x (count,) zero-padded to ``width``, int64 (count, width)."""
    powers = torch.tensor([10 ** i for i in range(width)], dtype=torch.int64, device=x.device)
    out = (x[:, None] // powers) % 10
    return out.flip(1) if msb_first else out

def mark(token: int, count: int, device: torch.device) -> torch.Tensor:
    """The token repeated down a column, int64 (count, 1)."""
    return torch.full((count, 1), token, dtype=torch.int64, device=device)

def power_of_ten(exponent: int, count: int, device: torch.device) -> torch.Tensor:
    """10^exponent written as a number, ``1 0 .. 0``, int64 (count, exponent + 1)."""
    digits = torch.zeros(count, exponent + 1, dtype=torch.int64, device=device)
    digits[:, 0] = 1
    return digits

def joined_by(parts: list[torch.Tensor], token: int) -> list[torch.Tensor]:
    """The parts with a ``token`` column between consecutive ones."""
    out = []
    for i, part in enumerate(parts):
        out += [mark(token, part.shape[0], part.device), part] if i else [part]
    return out

def malach_chain(a: torch.Tensor, b: torch.Tensor, digits: int, joined_pairs: bool) -> list[torch.Tensor]:
    """The columns of a malach chain (module docstring), from the first ``(`` to the ``=`` before the answer."""
    count, device = a.numel(), a.device
    a_digits, b_digits = digits_of(a, digits, False), digits_of(b, digits, False)

    def expansion(x_digits: torch.Tensor) -> list[torch.Tensor]:
        terms = [torch.cat([x_digits[:, i:i + 1], mark(TIMES, count, device), power_of_ten(i, count, device)], 1)
                 for i in range(digits)]
        return [mark(OPEN, count, device), *joined_by(terms, PLUS), mark(CLOSE, count, device)]

    def pair(i: int, j: int) -> torch.Tensor:
        a_i, b_j = a_digits[:, i:i + 1], b_digits[:, j:j + 1]
        return PAIR + 10 * a_i + b_j if joined_pairs else torch.cat([a_i, mark(TIMES, count, device), b_j], 1)

    pairs = [(i, j) for i in range(digits) for j in range(digits)]
    terms = [torch.cat([pair(i, j), mark(TIMES, count, device), power_of_ten(i, count, device),
                        mark(TIMES, count, device), power_of_ten(j, count, device)], 1) for i, j in pairs]
    values = [digits_of(a_digits[:, i] * b_digits[:, j] * 10 ** (i + j), i + j + 2, True) for i, j in pairs]
    equals = mark(EQUALS, count, device)
    return [*expansion(a_digits), mark(TIMES, count, device), *expansion(b_digits), equals,
            *joined_by(terms, PLUS), equals, *joined_by(values, PLUS), equals]

def sequential_chain(a: torch.Tensor, b: torch.Tensor, digits: int) -> list[torch.Tensor]:
    """The columns of a sequential chain (module docstring), from the first partial product to ``>``."""
    count, device = a.numel(), a.device
    b_digits = digits_of(b, digits, False)
    partials = [digits_of(a * b_digits[:, j] * 10 ** j, 2 * digits, False) for j in range(digits)]
    parts = joined_by(partials, PLUS)
    for j in range(1, digits):
        parts += [mark(SUM, count, device), digits_of(a * (b % 10 ** (j + 1)), 2 * digits, False)]
    return parts + [mark(ANSWER, count, device)]

def sequences(a: torch.Tensor, b: torch.Tensor, digits: int, chain: str) -> torch.Tensor:
    """The token sequences (count, seq_len) of the products a * b in the format of the module docstring."""
    count, device = a.numel(), a.device
    parts = [digits_of(a, digits, True), mark(TIMES, count, device), digits_of(b, digits, True),
             mark(EQUALS, count, device)]
    if chain == "sequential":
        parts += sequential_chain(a, b, digits)
    elif chain in ("malach", "malach_joined"):
        parts += malach_chain(a, b, digits, chain == "malach_joined")
    parts.append(digits_of(a * b, 2 * digits, True))
    return torch.cat(parts, dim=1)

def render(tokens: torch.Tensor) -> str:
    """A sequence (seq_len,) as text, e.g. ``12*34=8400+0630;8040>0408`` (a joined digit pair as ``ixj``)."""
    return "".join(SYMBOLS[t] for t in tokens.tolist())

class MultiplyTask(MultiplyProblem, Task):
    def sample(self, start: int, count: int, stream: int, device: torch.device) -> torch.Tensor:
        """Samples [start, start + count) of ``stream`` (train or eval side of the split), (count, seq_len)."""
        d = self.cfg.data
        a, b = operands(self.cfg.seed, start, count, stream, d.digits, is_eval_stream(stream), device)
        return sequences(a, b, d.digits, d.chain)

    def sample_at(self, index: torch.Tensor, stream: int) -> torch.Tensor:
        d = self.cfg.data
        a, b = operands_of(self.cfg.seed, index & MASK32, index >> 32, stream, d.digits, is_eval_stream(stream))
        return sequences(a, b, d.digits, d.chain)

