"""Sparse parity as a next-token task, with or without the intermediate steps (chain of thought).

A sequence is ``x_1 .. x_n, SEP, chain``: the n input bits, a separator token, then the completion,
whose last token is the answer (the parity of x over the secret). ``data.chain`` picks the steps:

* ``none``: the answer alone;
* ``sequential``: the prefix parities in the secret's order, x_s1, x_s1^x_s2, ..., the last being
  the answer (k tokens; this is the kernel's own "tokens" layout);
* ``tree``: a balanced tree of XORs, written breadth first (Wies et al. 2023, Kim & Suzuki 2024):
  the XORs of neighbouring pairs of secret bits, then of pairs of those, up to the root. A level with
  an odd count carries its last node up unchanged (it is not written again), so a tree has k - 1
  nodes for any k (k = 1: the answer alone).

Samples come from ``kernels.sparse_parity`` on the training device: stream 0 trains, stream 1 is
the held-out set, each a pure function of (seed, stream, sample index) sliced across ranks as in
datamodules/parity.py. Label noise flips the answer token only (the chain stays the noiseless one).
"""
from typing import NamedTuple

import torch

from config import Config, ConfigError
from datamodules.parity import Ticket, TicketDataModule, eval_stream, joined, secret_for, train_stream
from kernels import sparse_parity

VOCAB_SIZE = 3  # tokens 0 and 1 (bits), 2 (separator)


class SequenceBatch(NamedTuple):
    tokens: torch.Tensor  # int64 (steps, local batch, seq_len)
    step: int


def tree_plan(k: int) -> list[tuple[int, int]]:
    """The tree's nodes in breadth-first order, as pairs of operand ids.

    Ids 0..k-1 are the secret bits in secret order; node j of the plan gets id k + j.
    """
    level, plan = list(range(k)), []
    while len(level) > 1:
        above = []
        for a, b in zip(level[0::2], level[1::2]):
            plan.append((a, b))
            above.append(k + len(plan) - 1)
        if len(level) % 2:
            above.append(level[-1])  # the odd node rises unchanged
        level = above
    return plan


def tree_chain(secret_bits: torch.Tensor) -> torch.Tensor:
    """The tree's node values (..., max(k - 1, 1)) for secret bits (..., k) in secret order."""
    k = secret_bits.shape[-1]
    if k == 1:
        return secret_bits.clone()
    values = list(secret_bits.unbind(-1))
    for a, b in tree_plan(k):
        values.append(values[a] ^ values[b])
    return torch.stack(values[k:], dim=-1)


def chain_len(chain: str, k: int) -> int:
    """Completion tokens (answer included) of a chain format."""
    return {"none": 1, "sequential": k, "tree": max(k - 1, 1)}[chain]


class CoTDataModule(TicketDataModule):
    answer_len = 1

    def __init__(self, cfg: Config):
        super().__init__()
        if cfg.model.ensemble != 1:
            raise ConfigError(f"model.ensemble: next-token models train one member, got {cfg.model.ensemble}")
        self.cfg = cfg
        d = cfg.data
        self.secret = list(d.secret) if d.secret is not None else secret_for(cfg.seed, d.n, d.k)
        self.vocab_size = VOCAB_SIZE
        self.prompt_len = d.n + 1
        self.seq_len = self.prompt_len + chain_len(d.chain, d.k)
        self._eval_set: torch.Tensor | None = None

    def sequences(self, start: int, count: int, stream: int, noise: float, device: torch.device) -> torch.Tensor:
        """Samples [start, start + count) of ``stream`` as token sequences, int64 (count, seq_len)."""
        d = self.cfg.data
        secret, stream_id = self.device_args(stream, device)
        tokens, y, _ = sparse_parity(self.cfg.seed, start, count, d.n, secret, stream=stream_id, noise=noise,
                                     backend=self.cfg.kernels.backend, device=device, layout="tokens")
        if d.chain == "tree":
            chain = tree_chain(tokens[:, secret])
            tokens = torch.cat([tokens[:, :self.prompt_len], chain], dim=1)
        elif d.chain == "none":
            tokens = tokens[:, :self.prompt_len + 1].clone()
        tokens[:, -1] = y  # the (possibly noisy) answer
        return tokens

    def generate(self, ticket: Ticket, device: torch.device) -> SequenceBatch:
        """The sequences of a ticket: rank r's slice of each global batch in the ticket's steps."""
        d = self.cfg.data
        tokens = joined([self.sequences(start, count, train_stream(0), d.noise, device)
                         for start, count in self.ticket_ranges(ticket)])
        return SequenceBatch(tokens.view(ticket.steps, d.batch_size // ticket.world_size, self.seq_len), ticket.step)

    def eval_set(self, device: torch.device) -> torch.Tensor:
        """The fixed held-out sequences (noiseless), int64 (eval.size, seq_len)."""
        if self._eval_set is None or self._eval_set.device != device:
            self._eval_set = self.sequences(0, self.cfg.eval.size, eval_stream(0), 0.0, device)
        return self._eval_set
