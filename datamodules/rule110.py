"""Rule 110 (Wolfram 1983; universal, Cook 2004) as a next-token task: a ring of w random cells, T steps,
the middle cell at the end; with or without the computation's trace as a chain of thought.

Cell i of the next row is bit 4 l + 2 c + r of RULE = 110 = 0b01101110, where (l, c, r) are cells
i - 1, i, i + 1 of the current row; the ring wraps (cell -1 is cell w - 1). The middle cell is
m = w // 2. After T = ``data.generations`` steps it depends only on its light cone, the 2T + 1 cells
m - T .. m + T of the first row (``data.cells`` >= 2T + 1, so the cone never meets itself around the
ring). The prompt is the w cells, then ``=``; ``data.chain`` picks the completion:

* ``none``: the answer alone (sequence length w + 2);
* ``trace``: the light cone row by row, t = 1 .. T: row t keeps cells m - (T - t) .. m + (T - t),
  2 (T - t) + 1 of them, computed from the cone of row t - 1 alone; T^2 tokens in all, and row T,
  one cell, is the answer (w + 1 + T^2 tokens);
* ``rows``: the whole ring row by row, t = 1 .. T, w cells each, then ``>`` and the answer (the middle
  cell of row T again, as its own token: the answer is always the last token; w + 1 + T w + 2 tokens).

No separators between rows: every row's length is fixed by (w, T), so a position names its row and cell.
Example, w = 5, T = 2, cells 0 1 1 0 1 (m = 2; row 1 is 1 1 1 1 1, row 2 is 0 0 0 0 0)::

    none:   0 1 1 0 1 = 0
    trace:  0 1 1 0 1 = 1 1 1 0
    rows:   0 1 1 0 1 = 1 1 1 1 1 0 0 0 0 0 > 0

Held-out cones: a cone pattern p (its 2T + 1 bits, cell m - T as bit 0) is held out iff the top two
bits of Philox(key=seed, counter=(p_lo, p_hi, 0, SPLIT_STREAM)) word 0 are both set: a quarter of the
patterns, the same on every rank. Sample g of stream s (0 trains, 1 evaluates) is the first of its
candidate rings whose cone lies on the stream's side of the split; candidate c takes its cells, bit j
of word j // 32 (cell i is bit i), from the words of Philox(key=seed, counter=(c W + j // 4, g_lo, g_hi, s)),
W = ceil(w / 128) calls per candidate, CANDIDATES candidates at a time until one fits. So a sample is a
pure function of (seed, stream, g), training never sees a held-out cone, and the answer of every
evaluation sample is a function of a pattern no training sample had.
"""
import torch

from datamodules.rule110_config import ANSWER, EQUALS, Rule110Problem
from datamodules.stream import first_fitting, is_eval_stream
from datamodules.task import Task
from kernels.philox import MASK32, philox4x32, sample_words, split_seed

RULE = 110
SYMBOLS = "01=>"
SPLIT_STREAM = 0xFFFFFFFF  # counter word 3 of the split hash (sample streams are 0 and 1)
CANDIDATES = 8  # rings drawn per round; a sample whose 8 all miss its side draws 8 more


def step_ring(rows: torch.Tensor) -> torch.Tensor:
    """One step of Rule 110 on rings (count, w) of bits, int64."""
    neighbourhood = 4 * rows.roll(1, 1) + 2 * rows + rows.roll(-1, 1)
    return (RULE >> neighbourhood) & 1


def step_cone(rows: torch.Tensor) -> torch.Tensor:
    """One step of Rule 110 on strips (count, n) without wrapping: the (count, n - 2) cells they determine."""
    neighbourhood = 4 * rows[:, :-2] + 2 * rows[:, 1:-1] + rows[:, 2:]
    return (RULE >> neighbourhood) & 1


def cone(cells: torch.Tensor, generations: int) -> torch.Tensor:
    """The light cone of the middle cell after ``generations``: cells m - T .. m + T of rings (count, w)."""
    middle = cells.shape[1] // 2
    return cells[:, middle - generations:middle + generations + 1]


def pattern(cone_cells: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cone bits (count, 2T + 1) as two 32-bit words (lo, hi), bit i of the pattern = cell m - T + i."""
    weights = 1 << torch.arange(cone_cells.shape[1], dtype=torch.int64, device=cone_cells.device)
    value = (cone_cells * weights).sum(1)
    return value & MASK32, value >> 32


def held_out(seed: int, cone_cells: torch.Tensor) -> torch.Tensor:
    """Whether each cone pattern (count, 2T + 1) is in the held-out quarter (bool, (count,))."""
    key0, key1 = split_seed(seed)
    lo, hi = pattern(cone_cells)
    word = philox4x32(lo, hi, torch.zeros_like(lo), torch.full_like(lo, SPLIT_STREAM), key0, key1)[0]
    return (word >> 30) == 3


def rings(seed: int, start: int, count: int, stream: int, cells: int, generations: int, held: bool,
          device: torch.device) -> torch.Tensor:
    """First rows (count, w) of samples [start, start + count) of ``stream``, their cones on the ``held`` side."""
    return rings_of(seed, *sample_words(start, count, device), stream, cells, generations, held)


def rings_of(seed: int, g_lo: torch.Tensor, g_hi: torch.Tensor, stream: int, cells: int, generations: int,
             held: bool) -> torch.Tensor:
    """First rows (count, w) of samples g = g_hi 2^32 + g_lo (count,) of ``stream``, cones on the ``held`` side."""
    return first_fitting(seed, g_lo, g_hi, stream, cells, CANDIDATES,
                         lambda rows: held_out(seed, cone(rows, generations)) == held)


def sequences(cells: torch.Tensor, generations: int, chain: str) -> torch.Tensor:
    """The token sequences (count, seq_len) of rings (count, w) in the format of the module docstring."""
    def mark(token: int) -> torch.Tensor:
        return torch.full((cells.shape[0], 1), token, dtype=torch.int64, device=cells.device)

    parts = [cells, mark(EQUALS)]
    if chain == "rows":
        row = cells
        for _ in range(generations):
            row = step_ring(row)
            parts.append(row)
        parts += [mark(ANSWER), row[:, cells.shape[1] // 2, None]]
        return torch.cat(parts, dim=1)
    row = cone(cells, generations)
    for _ in range(generations):
        row = step_cone(row)
        parts += [row] if chain == "trace" else []
    parts += [] if chain == "trace" else [row]
    return torch.cat(parts, dim=1)


def render(tokens: torch.Tensor) -> str:
    """A sequence (seq_len,) as text, e.g. ``01101=1110``."""
    return "".join(SYMBOLS[t] for t in tokens.tolist())


class Rule110Task(Rule110Problem, Task):
    def sample(self, start: int, count: int, stream: int, device: torch.device) -> torch.Tensor:
        """Samples [start, start + count) of ``stream`` (train or eval side of the split), (count, seq_len)."""
        d = self.cfg.data
        first = rings(self.cfg.seed, start, count, stream, d.cells, d.generations, is_eval_stream(stream), device)
        return sequences(first, d.generations, d.chain)

    def sample_at(self, index: torch.Tensor, stream: int) -> torch.Tensor:
        d = self.cfg.data
        first = rings_of(self.cfg.seed, index & MASK32, index >> 32, stream, d.cells, d.generations,
                         is_eval_stream(stream))
        return sequences(first, d.generations, d.chain)

