"""d-digit by d-digit multiplication as a next-token task, with or without a chain of thought.

Operands are true d-digit numbers, a, b in [10^(d-1), 10^d). The prompt writes them most significant
digit first, ``a * b =``; the answer is a * b, zero-padded to 2d digits, most significant first.
``data.chain`` picks the completion (after Malach 2024, who follows Deng et al.'s digit-wise format):

* ``none``: the answer alone;
* ``sequential``: the long-multiplication steps, every number least significant digit first and
  zero-padded to 2d digits (so a carry flows in the order the digits are written):
  the partial products p_j = a * b_j * 10^j, joined by ``+``; then the running sums
  s_j = p_0 + .. + p_j for j = 1 .. d-1, each after a ``;`` (s_(d-1) = a * b); then ``>`` and the answer.

Example, d = 2, a = 12, b = 34 (p_0 = 48, p_1 = 360, s_1 = 408)::

    none:        1 2 * 3 4 = 0 4 0 8
    sequential:  1 2 * 3 4 = 8 4 0 0 + 0 6 3 0 ; 8 0 4 0 > 0 4 0 8

Held-out pairs: (a, b) is held out iff the top two bits of Philox(key=seed, counter=(a, b, 0,
SPLIT_STREAM)) word 0 are both set, a quarter of the operand space (the paper's 75/25 split), the same
on every rank. Sample g of stream s (even: training, odd: held out) is the first of its candidate pairs that
lies on the stream's side of the split; candidate c takes a and b from words 2 (c % 2) and
2 (c % 2) + 1 of Philox(key=seed, counter=(c // 2, g_lo, g_hi, s)) as ``10^(d-1) + word % (9 * 10^(d-1))``,
CANDIDATES at a time until one fits. So a sample is a pure function of (seed, stream, g), training
never sees a held-out pair, and ranks slice the global batch as in datamodules/stream.py.
"""
from dataclasses import dataclass
from typing import ClassVar

import torch

from config import Config, DataConfig, need
from datamodules.stream import SequenceBatch, Ticket, eval_stream, is_eval_stream, joined, member_ids, train_stream
from datamodules.task import SequenceLayout, Task, register_task
from kernels.philox import MASK32, philox4x32, split_seed

TIMES, EQUALS, PLUS, SUM, ANSWER = 10, 11, 12, 13, 14  # tokens 0..9 are the digits
VOCAB_SIZE = 15
SYMBOLS = "0123456789*=+;>"
SPLIT_STREAM = 0xFFFFFFFF  # counter word 3 of the split hash (sample streams are 0 and 1)
CANDIDATES = 8  # pairs drawn per round; a sample whose 8 all miss its side draws 8 more
MAX_DIGITS = 9  # a and b fit one 32-bit word, a * b fits int64
CHAINS = ("none", "sequential")


@dataclass
class MultiplyConfig(DataConfig):
    format: ClassVar[str] = "sequence"
    task: str = "multiply"
    digits: int = 2  # d: operands are d-digit numbers
    chain: str = "none"  # none | sequential


def held_out(seed: int, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Whether each pair (a, b) is in the held-out quarter of the operand space (bool, a's shape)."""
    key0, key1 = split_seed(seed)
    word = philox4x32(a, b, torch.zeros_like(a), torch.full_like(a, SPLIT_STREAM), key0, key1)[0]
    return (word >> 30) == 3


def operands(seed: int, start: int, count: int, stream: int, digits: int, held: bool,
             device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Operand pairs of samples [start, start + count) of ``stream``, all on the ``held`` side of the split."""
    key0, key1 = split_seed(seed)
    lowest, span = 10 ** (digits - 1), 9 * 10 ** (digits - 1)
    lo = (start & MASK32) + torch.arange(count, dtype=torch.int64, device=device)
    g_lo, g_hi = lo & MASK32, ((start >> 32) + (lo >> 32)) & MASK32
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


def sequences(a: torch.Tensor, b: torch.Tensor, digits: int, chain: str) -> torch.Tensor:
    """The token sequences (count, seq_len) of the products a * b in the format of the module docstring."""
    def mark(token: int) -> torch.Tensor:
        return torch.full((a.numel(), 1), token, dtype=torch.int64, device=a.device)

    width = 2 * digits
    parts = [digits_of(a, digits, True), mark(TIMES), digits_of(b, digits, True), mark(EQUALS)]
    if chain == "sequential":
        b_digits = digits_of(b, digits, False)
        for j in range(digits):
            parts += [mark(PLUS)] if j else []
            parts.append(digits_of(a * b_digits[:, j] * 10 ** j, width, False))
        for j in range(1, digits):
            parts += [mark(SUM), digits_of(a * (b % 10 ** (j + 1)), width, False)]
        parts.append(mark(ANSWER))
    parts.append(digits_of(a * b, width, True))
    return torch.cat(parts, dim=1)


def render(tokens: torch.Tensor) -> str:
    """A sequence (seq_len,) as text, e.g. ``12*34=8400+0630;8040>0408``."""
    return "".join(SYMBOLS[t] for t in tokens.tolist())


@register_task("multiply")
class MultiplyTask(Task):
    size_key = "data.digits"
    configs = {"sequence": MultiplyConfig}

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        layout = self.layout(cfg.data)
        self.vocab_size, self.prompt_len = layout.vocab_size, layout.prompt_len
        self.seq_len, self.answer_len = layout.seq_len, layout.answer_len
        self.members = member_ids(cfg)
        self._eval_set: torch.Tensor | None = None

    @classmethod
    def validate(cls, cfg: Config) -> None:
        d = cfg.data
        need(1 <= d.digits <= MAX_DIGITS, "data.digits", f"must be in [1, {MAX_DIGITS}], got {d.digits}")
        need(d.chain in CHAINS, "data.chain", f"{d.chain!r} is not one of {', '.join(CHAINS)}")

    @classmethod
    def layout(cls, data: MultiplyConfig) -> SequenceLayout:
        one = torch.ones(1, dtype=torch.int64)
        return SequenceLayout(VOCAB_SIZE, 2 * data.digits + 2, sequences(one, one, data.digits, data.chain).shape[1],
                              2 * data.digits)

    def sample(self, start: int, count: int, stream: int, device: torch.device) -> torch.Tensor:
        """Samples [start, start + count) of ``stream`` (train or eval side of the split), (count, seq_len)."""
        d = self.cfg.data
        a, b = operands(self.cfg.seed, start, count, stream, d.digits, is_eval_stream(stream), device)
        return sequences(a, b, d.digits, d.chain)

    def generate(self, ticket: Ticket, device: torch.device) -> SequenceBatch:
        """The sequences of a ticket: rank r's slice of each global batch in the ticket's steps."""
        tokens = torch.stack([joined([self.sample(start, count, train_stream(m), device)
                                      for start, count in self.ticket_ranges(ticket)]) for m in self.members])
        local = self.cfg.data.batch_size // ticket.world_size
        return SequenceBatch(tokens.view(len(self.members), ticket.steps, local, self.seq_len), ticket.step)

    def eval_set(self, device: torch.device) -> torch.Tensor:
        """The fixed held-out sequences, int64 (members, eval.size, seq_len): only held-out operand pairs."""
        if self._eval_set is None or self._eval_set.device != device:
            self._eval_set = torch.stack([self.sample(0, self.cfg.eval.size, eval_stream(m), device)
                                          for m in self.members])
        return self._eval_set
