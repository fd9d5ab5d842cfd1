"""An infinite k-sparse parity stream, sharded exactly across ranks (DESIGN.md, rule 1).

The DataLoader yields a tiny ``Ticket`` per Lightning batch; the samples themselves are generated
on the training device in ``on_after_batch_transfer``. Member m of an ensemble trains on stream
``2 m`` and is evaluated on stream ``2 m + 1``, so no training sample is ever an evaluation sample.
"""
import math
from collections.abc import Callable, Iterator
from typing import NamedTuple

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset

from config import Config
from kernels import sparse_parity
from kernels.sparse_parity import on_device


def secret_for(seed: int, n: int, k: int) -> list[int]:
    """The secret of a seed: k distinct coordinates of n, in the order a chain of thought uses."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=generator)[:k].tolist()


def train_stream(member: int) -> int:
    return 2 * member


def eval_stream(member: int) -> int:
    return 2 * member + 1


class Ticket(NamedTuple):
    """SGD steps [step, step + steps) of rank ``rank`` out of ``world_size``."""
    step: int
    steps: int
    rank: int
    world_size: int


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


class ParityBatch(NamedTuple):
    x: torch.Tensor  # (members, steps, local batch, n): float +/-1 on GPUs, uint8 bits on CPUs (see pm1)
    y: torch.Tensor  # (members, steps, local batch) float +/-1
    step: int


def pm1(x: torch.Tensor) -> torch.Tensor:
    """Inputs as the MLP takes them, float +/-1 (= 1 - 2 bits), from either layout of ParityBatch.x.

    On a GPU the Triton kernel writes +/-1 floats directly; on a CPU a ticket's inputs stay bits
    (a quarter of the memory traffic), and the model converts one step's slice at a time.
    """
    return x if x.is_floating_point() else 1.0 - 2.0 * x.float()


def steps_per_batch(cfg: Config, world_size: int) -> int:
    """SGD steps one Lightning batch carries: 1 under DDP (one reducer pass per forward)."""
    if world_size > 1:
        return 1
    if cfg.trainer.steps_per_batch:
        return cfg.trainer.steps_per_batch
    every = math.gcd(cfg.eval.every_n_steps, cfg.checkpoint.every_n_steps)
    return max(d for d in range(1, min(every, 100) + 1) if every % d == 0)


class TicketDataModule(L.LightningDataModule):
    """A DataModule whose loader yields tickets and whose ``generate`` makes their samples on the device."""

    cfg: Config

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        rank, world = trainer.global_rank, trainer.world_size
        stream = TicketStream(lambda: trainer.global_step, steps_per_batch(self.cfg, world),
                              self.cfg.trainer.max_steps, rank, world)
        return DataLoader(stream, batch_size=None, num_workers=0)

    def on_after_batch_transfer(self, ticket: Ticket, dataloader_idx: int):
        return self.generate(ticket, self.trainer.strategy.root_device)

    def generate(self, ticket: Ticket, device: torch.device):
        raise NotImplementedError

    def ticket_ranges(self, ticket: Ticket) -> list[tuple[int, int]]:
        """(start, count) sample ranges of rank r's slice of each global batch in the ticket's steps, in order:
        one contiguous range when a single rank takes whole batches."""
        batch = self.cfg.data.batch_size
        if ticket.world_size == 1:
            return [(ticket.step * batch, ticket.steps * batch)]
        local = batch // ticket.world_size
        return [(t * batch + ticket.rank * local, local) for t in range(ticket.step, ticket.step + ticket.steps)]

    def device_args(self, stream: int | list[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The secret and ``stream`` as tensors on ``device``, validated and copied once, not on every step."""
        key = (device, stream if isinstance(stream, int) else tuple(stream))
        cache = self.__dict__.setdefault("_device_args", {})
        if key not in cache:
            cache[key] = on_device(self.secret, stream, self.cfg.data.n, device)
        return cache[key]


def joined(parts: list[torch.Tensor], dim: int = 0) -> torch.Tensor:
    """torch.cat of ``parts`` along ``dim``, without a copy when there is one part."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


class ParityDataModule(TicketDataModule):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        d = cfg.data
        self.secret = list(d.secret) if d.secret is not None else secret_for(cfg.seed, d.n, d.k)
        first = cfg.model.member_offset
        self.members = list(range(first, first + cfg.model.ensemble))
        self._eval_set: tuple[torch.Tensor, torch.Tensor] | None = None

    def generate(self, ticket: Ticket, device: torch.device) -> ParityBatch:
        """The samples of a ticket: rank r's slice of each global batch in the ticket's steps."""
        d = self.cfg.data
        local = d.batch_size // ticket.world_size
        streams = [train_stream(m) for m in self.members]
        secret, stream_ids = self.device_args(streams, device)
        layout = "pm1" if device.type == "cuda" else "bits"

        def draw(start: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
            x, y, _ = sparse_parity(self.cfg.seed, start, count, d.n, secret, stream=stream_ids,
                                    noise=d.noise, backend=self.cfg.kernels.backend, device=device,
                                    layout=layout, compile=self.cfg.kernels.compile)
            return x, pm1(y)

        xs, ys = zip(*(draw(start, count) for start, count in self.ticket_ranges(ticket)))
        x, y = joined(list(xs), 1), joined(list(ys), 1)
        members = len(streams)
        return ParityBatch(x.view(members, ticket.steps, local, d.n),
                           y.view(members, ticket.steps, local), ticket.step)

    def eval_set(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The fixed held-out samples: x (members, size, n) and y (members, size), +/-1."""
        if self._eval_set is None or self._eval_set[0].device != device:
            x, y, _ = sparse_parity(self.cfg.seed, 0, self.cfg.eval.size, self.cfg.data.n, self.secret,
                                    stream=[eval_stream(m) for m in self.members],
                                    backend=self.cfg.kernels.backend, device=device, layout="pm1",
                                    compile=self.cfg.kernels.compile)
            self._eval_set = (x, y)  # noiseless: solved means exactly the parity
        return self._eval_set
