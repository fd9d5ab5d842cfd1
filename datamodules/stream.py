"""The stream machinery every task shares (docs/design.md, the stream rule).

The DataLoader yields a tiny ``Ticket`` per Lightning batch; a task turns it into samples on the
training device in ``on_after_batch_transfer``. Sample g of stream s is a pure function of
(seed, s, g); the global batch of step t is samples [t B, (t + 1) B) and rank r of W takes its
r-th slice. Member m of an ensemble trains on stream ``2 m`` and is evaluated on ``2 m + 1``,
so no training sample is ever an evaluation sample. With a finite training set (``data.train_size``)
the same positions index the epochs of samples [0, N) of the training stream instead, each in its
own keyed order (``Task.train_order``, kernels/permutation.py).
"""
import math
from collections.abc import Callable, Iterator
from typing import NamedTuple, Optional

import torch
from torch.utils.data import DataLoader, IterableDataset

from config import Config, requested_world_size, task_class
from kernels.philox import philox4x32, split_seed


def train_stream(member: int) -> int:
    return 2 * member


def eval_stream(member: int) -> int:
    return 2 * member + 1


def is_eval_stream(stream: int) -> bool:
    """Whether ``stream`` is a member's evaluation stream (odd), not its training stream (even)."""
    return stream % 2 == 1


def first_fitting(seed: int, g_lo: torch.Tensor, g_hi: torch.Tensor, stream: int, width: int, candidates: int,
                  fits: Optional[Callable[[torch.Tensor], torch.Tensor]]) -> torch.Tensor:
    """Bits (count, width), int64, of samples g = g_hi 2^32 + g_lo (count,) of ``stream``. Candidate c takes bit i
    from bit i % 32 of word (i // 32) % 4 of Philox(key=seed, counter=(c W + i // 128, g_lo, g_hi, stream)),
    W = ceil(width / 128); a sample takes its first candidate that ``fits`` (bits (m, width) -> bool (m,)) accepts,
    drawing ``candidates`` at a time until one does (candidate 0 where ``fits`` is None): a task's held-out split
    of its input space (datamodules/rule110.py, circuit.py)."""
    key0, key1 = split_seed(seed)
    calls = -(-width // 128)
    count, device = g_lo.numel(), g_lo.device
    shifts = torch.arange(32, dtype=torch.int64, device=device)
    out = torch.empty(count, width, dtype=torch.int64, device=device)
    pending = torch.arange(count, device=device)
    round_ = 0
    while pending.numel():
        counters = torch.arange(round_ * candidates * calls, (round_ + 1) * candidates * calls, device=device)
        words = torch.stack(philox4x32(counters[None], g_lo[pending, None], g_hi[pending, None],
                                       torch.full_like(counters[None], stream), key0, key1), dim=-1)
        bits = ((words[..., None] >> shifts) & 1).view(pending.numel(), candidates, calls * 128)[..., :width]
        if fits is None:
            out[pending] = bits[:, 0]
            break
        accepted = fits(bits.reshape(-1, width)).view(-1, candidates)
        found = accepted.any(1)
        chosen = bits[torch.arange(pending.numel(), device=device), accepted.to(torch.int8).argmax(1)]
        out[pending[found]] = chosen[found]
        pending = pending[~found]
        round_ += 1
    return out


def member_ids(cfg: Config) -> list[int]:
    """The ensemble members a run trains: [model.member_offset, model.member_offset + model.ensemble)."""
    first = cfg.model.member_offset
    return list(range(first, first + cfg.model.ensemble))


class Ticket(NamedTuple):
    """SGD steps [step, step + steps) of rank ``rank`` out of ``world_size``."""
    step: int
    steps: int
    rank: int
    world_size: int


class ClassifierBatch(NamedTuple):
    """A classifier task's batch, one row of streams per ensemble member."""
    x: torch.Tensor  # (members, steps, local batch, n): float +/-1 on GPUs, uint8 bits on CPUs (see pm1)
    y: torch.Tensor  # (members, steps, local batch) float: +/-1 labels, or real targets of a regression task
    step: int


class SequenceBatch(NamedTuple):
    """A sequence task's batch, one row of streams per ensemble member; the loss covers the completion."""
    tokens: torch.Tensor  # int64 (members, steps, local batch, seq_len)
    step: int


class TicketStream(IterableDataset):
    """Tickets from the trainer's current step (so a resumed run continues the same stream)."""

    def __init__(self, start_step: Callable[[], int], steps_per_batch: int, max_steps: int,
                 rank: int, world_size: int):
        self.start_step, self.steps_per_batch, self.max_steps = start_step, steps_per_batch, max_steps
        self.rank, self.world_size = rank, world_size

    def __iter__(self) -> Iterator[Ticket]:
        step = self.start_step()
        while step < self.max_steps:  # a start off the grid (resumed from an end-of-run checkpoint) rejoins it
            steps = min(self.steps_per_batch - step % self.steps_per_batch, self.max_steps - step)
            yield Ticket(step, steps, self.rank, self.world_size)
            step += steps


def pm1(x: torch.Tensor) -> torch.Tensor:
    """Inputs as a classifier takes them, float +/-1 (= 1 - 2 bits), from bits or from +/-1 floats.

    On a GPU the Triton kernel writes +/-1 floats directly; on a CPU a ticket's inputs stay bits
    (a quarter of the memory traffic), and the model converts one step's slice at a time.
    """
    return x if x.is_floating_point() else 1.0 - 2.0 * x.float()


STEPS_PER_BATCH = 100  # the most SGD steps a Lightning batch carries by default ...
SMALL_STEPS_PER_BATCH = 500  # ... or where a step's data is small (a batch's fixed costs, Lightning's loop and
SMALL_BATCH_BYTES = 2**22  # a generation call, outweigh a small step's): up to this many, within this many bytes


def steps_per_batch(cfg: Config, world_size: int, step_bytes: int) -> int:
    """SGD steps one Lightning batch carries: 1 under DDP (one reducer pass per forward); else
    trainer.steps_per_batch, or the largest divisor of the evaluation and checkpoint interval up to
    STEPS_PER_BATCH, or up to SMALL_STEPS_PER_BATCH while the batch's data (``step_bytes`` a step, all members)
    stays within SMALL_BATCH_BYTES."""
    if world_size > 1:
        return 1
    if cfg.trainer.steps_per_batch:
        return cfg.trainer.steps_per_batch
    every = math.gcd(cfg.eval.every_n_steps, cfg.checkpoint.every_n_steps)
    cap = max(STEPS_PER_BATCH, min(SMALL_STEPS_PER_BATCH, SMALL_BATCH_BYTES // max(1, step_bytes)))
    return max(d for d in range(1, min(every, cap) + 1) if every % d == 0)


def batch_sizes(cfg: Config) -> tuple[tuple[str, int, Optional[str]], tuple[str, int, Optional[str]]]:
    """(steps per Lightning batch, local batch size) as memory-footprint sizes (lightning_modules/family.py Term)."""
    d, t = cfg.data, cfg.trainer
    world = requested_world_size(cfg) or 1
    steps = min(steps_per_batch(cfg, world, task_class(d.task).step_bytes(cfg)), t.max_steps)
    return ("steps per batch", steps, "trainer.steps_per_batch"), ("data.batch_size", max(1, d.batch_size // world),
                                                                   "data.batch_size")


def ticket_ranges(ticket: Ticket, batch: int) -> list[tuple[int, int]]:
    """(start, count) sample ranges of rank r's slice of each global batch of ``batch`` samples in the ticket's
    steps, in order: one contiguous range when a single rank takes whole batches."""
    if ticket.world_size == 1:
        return [(ticket.step * batch, ticket.steps * batch)]
    local = batch // ticket.world_size
    return [(t * batch + ticket.rank * local, local) for t in range(ticket.step, ticket.step + ticket.steps)]


def ticket_loader(trainer, cfg: Config, step_bytes: int) -> DataLoader:
    """The trainer's ticket loader: it starts at the trainer's step and splits batches across its ranks."""
    rank, world = trainer.global_rank, trainer.world_size
    steps = steps_per_batch(cfg, world, step_bytes)
    stream = TicketStream(lambda: trainer.global_step, steps, cfg.trainer.max_steps, rank, world)
    return DataLoader(stream, batch_size=None, num_workers=0)


def joined(parts: list[torch.Tensor], dim: int = 0) -> torch.Tensor:
    """torch.cat of ``parts`` along ``dim``, without a copy when there is one part."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)
