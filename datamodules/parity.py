"""The k-sparse parity task: n random bits, the label is the parity of the k bits of a secret.

Two batch formats. Classifiers get ``ClassifierBatch`` (inputs, +/-1 labels), one stream pair per
ensemble member; sequence models get ``x_1 .. x_n, SEP, chain`` tokens (datamodules/cot.py), where
``data.chain`` picks the intermediate steps before the answer. Samples are made on the training device
by ``kernels.sparse_parity``: a pure function of (seed, stream, sample index), sliced across ranks
(datamodules/stream.py).
"""
import torch

from config import Config
from datamodules.cot import completion
from datamodules.parity_config import ParityProblem
from datamodules.stream import ClassifierBatch, SequenceBatch, Ticket, is_eval_stream, joined, pm1, train_stream
from datamodules.task import Task
from kernels import sparse_parity
from kernels.sparse_parity import on_device, sparse_parity_at


def secret_for(seed: int, n: int, k: int) -> list[int]:
    """The secret of a seed: k distinct coordinates of n, in the order a chain of thought uses."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=generator)[:k].tolist()


class ParityTask(ParityProblem, Task):
    def __init__(self, cfg: Config):
        super().__init__(cfg)
        d = cfg.data
        self._secret = list(d.secret) if d.secret is not None else secret_for(cfg.seed, d.n, d.k)

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
            if self.train_size is not None:  # the finite training set, in each epoch's order
                index = self.train_order(start, count, device)
                x, y, _ = sparse_parity_at(self.cfg.seed, index, d.n, secret, stream=stream_ids, noise=d.noise,
                                           layout=layout)
                return x, pm1(y)
            x, y, _ = sparse_parity(self.cfg.seed, start, count, d.n, secret, stream=stream_ids,
                                    noise=d.noise, backend=self.cfg.kernels.backend, device=device,
                                    layout=layout, compile=self.compiled)
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
        return self.chained(tokens, y)

    def chained(self, tokens: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The kernel's "tokens" layout (bits, SEPARATOR, sequential chain) with data.chain's completion and the
        (possibly noisy) answer ``y``."""
        d, secret = self.cfg.data, self.secret
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

    def sample_at(self, index: torch.Tensor, stream: int) -> torch.Tensor:
        d = self.cfg.data
        secret, stream_id = self.device_args(stream, index.device)
        tokens, y, _ = sparse_parity_at(self.cfg.seed, index, d.n, secret, stream=stream_id, noise=self.noise(stream),
                                        layout="tokens")
        return self.chained(tokens, y)

    def samples_at(self, index: torch.Tensor, streams: list[int]):
        d = self.cfg.data
        secret, stream_ids = self.device_args(streams, index.device)
        x, y, _ = sparse_parity_at(self.cfg.seed, index, d.n, secret, stream=stream_ids, noise=self.noise(streams[0]),
                                   layout="pm1")
        return x, y

    def samples(self, start: int, count: int, streams: list[int], device: torch.device):
        """x (members, count, n) and y (members, count) in +/-1 (training batches take ``generate``'s kernel path)."""
        d = self.cfg.data
        secret, stream_ids = self.device_args(streams, device)
        x, y, _ = sparse_parity(self.cfg.seed, start, count, d.n, secret, stream=stream_ids,
                                noise=self.noise(streams[0]), backend=self.cfg.kernels.backend, device=device,
                                layout="pm1", compile=self.compiled)
        return x, y
