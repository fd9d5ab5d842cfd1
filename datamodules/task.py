"""A task's DataModule: the instance side of a ``Problem`` (datamodules/problem.py), which makes its batches.

train.py, eval.py, the summary, TensorBoard's hparams and the resume check reach tasks only through this
interface and the Problem's.
"""
from dataclasses import fields
from typing import Any, Optional

import lightning as L
import torch

from config import Config
from datamodules.problem import Problem
from datamodules.stream import (ClassifierBatch, SequenceBatch, Ticket, eval_stream, joined, member_ids, ticket_loader,
                                ticket_ranges, train_stream)
from kernels.permutation import epoch_order


class Task(Problem, L.LightningDataModule):
    """Base of every task's DataModule; a task derives from its Problem and this."""

    compiled = False  # make samples with the C++ kernels where the task has them: a model family declaring
    # kernels.compile sets it (build)

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.format = cfg.data.format
        self.members = member_ids(cfg)
        self._fixed: dict[str, object] = {}  # eval_set and train_subset per device
        if self.format == "sequence":
            layout = self.layout(cfg.data)
            self.vocab_size, self.prompt_len = layout.vocab_size, layout.prompt_len
            self.seq_len, self.answer_len = layout.seq_len, layout.answer_len

    # --- what a run records ---------------------------------------------------------------------
    def keys(self) -> dict[str, Any]:
        """The task's own keys and values (the data section but for its batch size)."""
        return {f.name: getattr(self.cfg.data, f.name) for f in fields(self.cfg.data) if f.name != "batch_size"}

    def identity(self) -> dict[str, Any]:
        """What a checkpoint must match to be resumed: the problem, not the hyperparameters."""
        return {**self.keys(), "secret": self.secret}

    def summary_fields(self) -> dict[str, Any]:
        """summary.json fields that name the problem (``secret`` is None where a task has none)."""
        return {**self.keys(), "secret": self.secret}

    def hparam_fields(self) -> dict[str, Any]:
        """TensorBoard hparams of the problem (scalars and strings only)."""
        return {key: value for key, value in self.keys().items() if isinstance(value, (int, float, str, bool))}

    @property
    def secret(self) -> Optional[list[int]]:
        return None

    # --- batches ----------------------------------------------------------------------------------
    def train_dataloader(self):
        return ticket_loader(self.trainer, self.cfg, self.step_bytes(self.cfg))

    def on_after_batch_transfer(self, ticket: Ticket, dataloader_idx: int):
        return self.generate(ticket, self.trainer.strategy.root_device)

    def ticket_ranges(self, ticket: Ticket) -> list[tuple[int, int]]:
        return ticket_ranges(ticket, self.cfg.data.batch_size)

    def samples(self, start: int, count: int, streams: list[int], device: torch.device):
        """Classifier format: samples [start, start + count) of each stream, x (members, count, input_size)
        and y (members, count); what the default ``generate`` and ``eval_set`` are made of."""
        raise NotImplementedError

    def sample(self, start: int, count: int, stream: int, device: torch.device) -> torch.Tensor:
        """Sequence format: samples [start, start + count) of one stream, int64 tokens (count, seq_len)."""
        raise NotImplementedError

    def samples_at(self, index: torch.Tensor, streams: list[int]):
        """Classifier format: the samples at ``index`` (members, count; int64 on the device), row m of stream m, as
        ``samples`` returns them: what a finite training set (data.train_size) is drawn with. Here one sample at a
        time from ``samples``; a task overrides it where it can draw them at once."""
        rows = [[self.samples(g, 1, [stream], index.device) for g in row.tolist()]
                for row, stream in zip(index, streams)]
        return tuple(torch.cat([torch.cat([part[i] for part in row], 1) for row in rows]) for i in range(2))

    def sample_at(self, index: torch.Tensor, stream: int) -> torch.Tensor:
        """Sequence format: the samples at ``index`` (count,; int64 on the device) of one stream, as ``sample``
        returns them. Here one sample at a time; a task overrides it where it can draw them at once."""
        return torch.cat([self.sample(g, 1, stream, index.device) for g in index.tolist()])

    # --- the training set ---------------------------------------------------------------------------
    @property
    def train_size(self) -> Optional[int]:
        """data.train_size: None for the endless stream, else the samples of each member's finite training set."""
        return self.cfg.data.train_size

    def train_order(self, start: int, count: int, device: torch.device) -> torch.Tensor:
        """Finite training set: the sample indices (members, count) each member trains on at positions [start,
        start + count) of its epochs (kernels/permutation.py)."""
        streams = [train_stream(m) for m in self.members]
        return epoch_order(self.cfg.seed, streams, start, count, self.train_size, device)

    def training_samples(self, start: int, count: int, device: torch.device):
        """Classifier format: every member's training samples at positions [start, start + count): the stream's
        samples themselves, or those of the finite training set in each epoch's order."""
        streams = [train_stream(m) for m in self.members]
        if self.train_size is None:
            return self.samples(start, count, streams, device)
        return self.samples_at(self.train_order(start, count, device), streams)

    def training_sequences(self, start: int, count: int, device: torch.device) -> torch.Tensor:
        """Sequence format: every member's training samples at positions [start, start + count), tokens (members,
        count, seq_len), as training_samples."""
        streams = [train_stream(m) for m in self.members]
        if self.train_size is None:
            return torch.stack([self.sample(start, count, stream, device) for stream in streams])
        order = self.train_order(start, count, device)
        return torch.stack([self.sample_at(index, stream) for index, stream in zip(order, streams)])

    def generate(self, ticket: Ticket, device: torch.device) -> ClassifierBatch | SequenceBatch:
        """The training samples of a ticket on ``device``: rank r's slice of each global batch in the
        ticket's steps, from each member's training stream (or its finite training set)."""
        ranges, local = self.ticket_ranges(ticket), self.cfg.data.batch_size // ticket.world_size
        shape = (len(self.members), ticket.steps, local)
        if self.format == "sequence":
            tokens = joined([self.training_sequences(start, count, device) for start, count in ranges], 1)
            return SequenceBatch(tokens.view(*shape, self.seq_len), ticket.step)
        xs, ys = zip(*(self.training_samples(start, count, device) for start, count in ranges))
        return ClassifierBatch(joined(list(xs), 1).view(*shape, -1), joined(list(ys), 1).view(shape), ticket.step)

    def eval_set(self, device: torch.device):
        """The fixed held-out samples on ``device`` (never training samples), made once per device: tokens
        (members, eval.size, seq_len) or (x, y) as ``samples`` returns them."""
        return self.fixed_set("eval", [eval_stream(m) for m in self.members], self.cfg.eval.size, device)

    def train_subset(self, device: torch.device):
        """Finite training set: the training samples each evaluation measures the fit on, the set's first
        min(data.train_size, eval.size) samples (the whole set where it is no larger), as ``eval_set``."""
        size = min(self.train_size, self.cfg.eval.size)
        return self.fixed_set("train", [train_stream(m) for m in self.members], size, device)

    def fixed_set(self, name: str, streams: list[int], size: int, device: torch.device):
        """Samples [0, size) of each stream on ``device``, made once per device and kept under ``name``."""
        cached = self._fixed.get(name)
        if cached is None or (cached if self.format == "sequence" else cached[0]).device != device:
            self._fixed[name] = (torch.stack([self.sample(0, size, stream, device) for stream in streams])
                                 if self.format == "sequence" else self.samples(0, size, streams, device))
        return self._fixed[name]

    def score(self, f: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Classifier format: each member's held-out score from outputs f (E, N) and targets y (E, N), and
        whether it counts as solved. Labels: the accuracy of sign(f), solved at 100%."""
        accuracy = (f * y > 0).float().mean(1)
        return accuracy, accuracy == 1.0
