"""The k-sparse parity task: n random bits, the label is the parity of the k bits of a secret.

Two batch formats. Classifiers get ``ClassifierBatch`` (inputs, +/-1 labels), one stream pair per
ensemble member; sequence models get ``x_1 .. x_n, SEP, chain`` tokens (datamodules/cot.py), where
``data.chain`` picks the intermediate steps before the answer. Samples are made on the training device
by ``kernels.sparse_parity``: a pure function of (seed, stream, sample index), sliced across ranks
(datamodules/stream.py).
"""
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch

from config import Config, ConfigError, DataConfig, need
from datamodules.cot import CHAINS, VOCAB_SIZE, chain_len, completion
from datamodules.stream import ClassifierBatch, SequenceBatch, Ticket, is_eval_stream, joined, pm1, train_stream
from datamodules.task import SequenceLayout, Task, register_task
from kernels import sparse_parity
from kernels.sparse_parity import on_device


@dataclass
class ParityConfig(DataConfig):
    format: ClassVar[str] = "classifier"
    n: int = 50
    k: int = 3
    noise: float = 0.0  # probability that a training label is flipped
    secret: Optional[list[int]] = None  # default: drawn from the seed


@dataclass
class ParityChainConfig(ParityConfig):
    format: ClassVar[str] = "sequence"
    chain: str = "none"  # none | sequential | tree | gates: the intermediate steps before the answer
    chain_stride: int = 1  # sequential chain: secret bits folded into each token


def secret_for(seed: int, n: int, k: int) -> list[int]:
    """The secret of a seed: k distinct coordinates of n, in the order a chain of thought uses."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=generator)[:k].tolist()


@register_task("parity")
class ParityTask(Task):
    size_key = "data.n"
    configs = {"classifier": ParityConfig, "sequence": ParityChainConfig}

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        d = cfg.data
        self._secret = list(d.secret) if d.secret is not None else secret_for(cfg.seed, d.n, d.k)

    @classmethod
    def validate(cls, cfg: Config) -> None:
        d = cfg.data
        need(d.n >= 1, "data.n", f"must be >= 1, got {d.n}")
        need(d.k >= 1, "data.k", f"must be >= 1, got {d.k}")
        need(d.k <= d.n, "data.k", f"must be <= data.n ({d.n}), got {d.k}")
        need(0.0 <= d.noise < 0.5, "data.noise", f"must be in [0, 0.5), got {d.noise}")  # nan fails too
        if d.secret is not None:
            need(len(d.secret) == d.k and len(set(d.secret)) == d.k and all(0 <= i < d.n for i in d.secret),
                 "data.secret", f"must be {d.k} distinct indices in [0, {d.n}), got {list(d.secret)}")
        if d.format == "sequence":
            need(d.chain in CHAINS, "data.chain", f"{d.chain!r} is not one of {', '.join(CHAINS)}")
            need(d.chain_stride >= 1, "data.chain_stride", f"must be >= 1, got {d.chain_stride}")
            need(d.chain_stride == 1 or d.chain == "sequential", "data.chain_stride",
                 f"applies to data.chain=sequential only, got {d.chain_stride} with data.chain={d.chain}")

    @classmethod
    def input_size(cls, data: ParityConfig) -> int:
        return data.n

    @classmethod
    def layout(cls, data: ParityChainConfig) -> SequenceLayout:
        return SequenceLayout(VOCAB_SIZE, data.n + 1, data.n + 1 + chain_len(data.chain, data.k, data.chain_stride), 1)

    @property
    def secret(self) -> list[int]:
        return self._secret

    def keys(self) -> dict:
        return {key: value for key, value in super().keys().items() if key != "secret"}  # written as drawn

    def device_args(self, stream: int | list[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The secret and ``stream`` as tensors on ``device``, validated and copied once, not on every step."""
        key = (device, stream if isinstance(stream, int) else tuple(stream))
        cache = self.__dict__.setdefault("_device_args", {})
        if key not in cache:
            cache[key] = on_device(self.secret, stream, self.cfg.data.n, device)
        return cache[key]

    def generate(self, ticket: Ticket, device: torch.device) -> ClassifierBatch | SequenceBatch:
        """Rank r's slice of each global batch in the ticket's steps; classifier inputs as the kernel writes them
        (bits on a CPU, +/-1 on a GPU), in one call for all members."""
        if self.format == "sequence":
            return super().generate(ticket, device)
        local = self.cfg.data.batch_size // ticket.world_size
        ranges = self.ticket_ranges(ticket)
        d = self.cfg.data
        streams = [train_stream(m) for m in self.members]
        secret, stream_ids = self.device_args(streams, device)
        layout = "pm1" if device.type == "cuda" else "bits"

        def draw(start: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
            x, y, _ = sparse_parity(self.cfg.seed, start, count, d.n, secret, stream=stream_ids,
                                    noise=d.noise, backend=self.cfg.kernels.backend, device=device,
                                    layout=layout, compile=self.cfg.kernels.compile)
            return x, pm1(y)

        xs, ys = zip(*(draw(start, count) for start, count in ranges))
        x, y = joined(list(xs), 1), joined(list(ys), 1)
        return ClassifierBatch(x.view(len(streams), ticket.steps, local, d.n),
                           y.view(len(streams), ticket.steps, local), ticket.step)

    def sequences(self, start: int, count: int, stream: int, noise: float, device: torch.device) -> torch.Tensor:
        """Samples [start, start + count) of ``stream`` as token sequences, int64 (count, seq_len)."""
        d = self.cfg.data
        secret, stream_id = self.device_args(stream, device)
        tokens, y, _ = sparse_parity(self.cfg.seed, start, count, d.n, secret, stream=stream_id, noise=noise,
                                     backend=self.cfg.kernels.backend, device=device, layout="tokens")
        if d.chain != "sequential" or d.chain_stride != 1:  # else the kernel's tokens are the chain
            chain = completion(d.chain, tokens[:, secret], d.chain_stride)
            tokens = torch.cat([tokens[:, :self.prompt_len], chain], dim=1)
        tokens[:, -1] = y  # the (possibly noisy) answer
        return tokens

    def noise(self, stream: int) -> float:
        """Label noise of a stream: held-out samples are noiseless (solved means exactly the parity)."""
        return 0.0 if is_eval_stream(stream) else self.cfg.data.noise

    def sample(self, start: int, count: int, stream: int, device: torch.device) -> torch.Tensor:
        return self.sequences(start, count, stream, self.noise(stream), device)

    def samples(self, start: int, count: int, streams: list[int], device: torch.device):
        """x (members, count, n) and y (members, count) in +/-1 (training batches take ``generate``'s kernel path)."""
        d = self.cfg.data
        secret, stream_ids = self.device_args(streams, device)
        x, y, _ = sparse_parity(self.cfg.seed, start, count, d.n, secret, stream=stream_ids,
                                noise=self.noise(streams[0]), backend=self.cfg.kernels.backend, device=device,
                                layout="pm1", compile=self.cfg.kernels.compile)
        return x, y
