"""Linear and MLP next-token predictors (Malach 2024): no attention, one weight block per position pair.

The core is ``CausalLinear``: the output at position t is a learned linear map of the one-hot tokens
at every position s <= t, ``out[t] = bias[t] + sum_{s <= t} W[s, t][x_s]``, with its own (vocab, out)
block W[s, t] for each pair s <= t (a block-lower-triangular (T*vocab, T*out) matrix; only the
T(T+1)/2 blocks on and below the diagonal are parameters, so the parameter count is honest).
A forward pass sums one row of the assembled matrix per token (``embedding_bag``), never a one-hot matmul.

* ``linear``: the logits are CausalLinear's output: a linear function of the prefix (multiclass
  logistic regression on the one-hot prefix, a convex problem);
* ``mlp``: CausalLinear to ``model.width`` hidden units, then ``model.depth - 1`` further ReLU layers
  of that width shared by all positions, then a linear read-out to the logits.

Generation may keep a cache: every position's pre-activation summed over the tokens written so far,
so each new token costs one row instead of a pass over the whole prefix.
"""
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


class PrefixCache(NamedTuple):
    sums: torch.Tensor  # (B, T * out): the sum of the written tokens' rows of the matrix
    tokens: torch.Tensor  # (B, T) int64: the token written at each position, -1 where none is
    weight: torch.Tensor  # the assembled (T * vocab, T * out) matrix, fixed while generating


class CausalLinear(nn.Module):
    def __init__(self, seq_len: int, vocab_size: int, out_features: int, zero_init: bool = False):
        super().__init__()
        self.seq_len, self.vocab_size, self.out_features = seq_len, vocab_size, out_features
        target, source = torch.tril_indices(seq_len, seq_len)  # every pair s <= t
        self.register_buffer("source", source, persistent=False)
        self.register_buffer("target", target, persistent=False)
        blocks = torch.zeros(source.numel(), vocab_size, out_features)
        if not zero_init:  # fan-in of position t: its t + 1 one-hot tokens
            blocks.normal_().div_((target.float() + 1).sqrt()[:, None, None])
        self.blocks = nn.Parameter(blocks)  # block j maps token x at position source[j] to target[j]
        self.bias = nn.Parameter(torch.zeros(seq_len * out_features))  # flat: optimizers treat 1-d as biases

    def matrix(self) -> torch.Tensor:
        """The block-lower-triangular weight, (T * vocab, T * out): row s * vocab + x, column t * out + h."""
        T, V, O = self.seq_len, self.vocab_size, self.out_features
        dense = self.blocks.new_zeros(T, V, T, O)
        dense[self.source, :, self.target, :] = self.blocks
        return dense.view(T * V, T * O)

    def rows(self, tokens: torch.Tensor, pos: int) -> torch.Tensor:
        """Row index of each token (B, t) at positions [pos, pos + t)."""
        positions = torch.arange(pos, pos + tokens.shape[1], device=tokens.device)
        return positions * self.vocab_size + tokens

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Outputs (B, t, out) for tokens (B, t) at positions [0, t)."""
        t = tokens.shape[1]
        if t > self.seq_len:
            raise ValueError(f"{t} tokens exceed the model's seq_len {self.seq_len}")
        sums = F.embedding_bag(self.rows(tokens, 0), self.matrix(), mode="sum")
        return self.window(sums, 0, t)

    def init_cache(self, batch: int, device: torch.device) -> PrefixCache:
        weight = self.matrix().detach()
        return PrefixCache(weight.new_zeros(batch, weight.shape[1]),
                           torch.full((batch, self.seq_len), -1, dtype=torch.int64, device=device), weight)

    def forward_cached(self, new_tokens: torch.Tensor, cache: PrefixCache, pos: int) -> torch.Tensor:
        """Outputs (B, t, out) of tokens written at positions [pos, pos + t), replacing what the cache held there.

        The sums swap the old tokens' rows for the new ones. Stale tokens at later positions only reach
        outputs at their own or later positions (the matrix is block-lower-triangular), so writing
        positions in order, as generation does, reads exactly the model on the written prefix.
        """
        t = new_tokens.shape[1]
        if pos + t > self.seq_len:
            raise ValueError(f"positions up to {pos + t} exceed the model's seq_len {self.seq_len}")
        old = cache.tokens[:, pos:pos + t]
        cache.sums.add_(F.embedding_bag(self.rows(new_tokens, pos), cache.weight, mode="sum"))
        cache.sums.sub_(F.embedding_bag(self.rows(old.clamp(min=0), pos), cache.weight, mode="sum",
                                        per_sample_weights=(old >= 0).to(cache.weight.dtype)))
        old.copy_(new_tokens)
        return self.window(cache.sums, pos, t)

    def window(self, sums: torch.Tensor, pos: int, t: int) -> torch.Tensor:
        """Outputs (B, t, out) at positions [pos, pos + t) from the row sums (B, T * out), bias added."""
        shape = (self.seq_len, self.out_features)
        return sums.view(-1, *shape)[:, pos:pos + t] + self.bias.view(shape)[pos:pos + t]


class AutoregressiveNet(nn.Module):
    """A CausalLinear layer followed by a per-position ReLU MLP (none: the linear model)."""

    def __init__(self, vocab_size: int, seq_len: int, hidden: list[int]):
        super().__init__()
        widths = hidden + [vocab_size]
        self.mix = CausalLinear(seq_len, vocab_size, widths[0], zero_init=not hidden)
        layers: list[nn.Module] = []
        for width_in, width_out in zip(widths[:-1], widths[1:]):
            layers += [nn.ReLU(), nn.Linear(width_in, width_out)]
        self.head = nn.Sequential(*layers)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, vocab) for tokens (B, T); position t sees tokens <= t."""
        return self.head(self.mix(tokens))

    def init_cache(self, batch: int, device: torch.device) -> PrefixCache:
        return self.mix.init_cache(batch, device)

    def forward_cached(self, new_tokens: torch.Tensor, cache: PrefixCache, pos: int) -> torch.Tensor:
        return self.head(self.mix.forward_cached(new_tokens, cache, pos))


def linear_next_token(vocab_size: int, seq_len: int) -> AutoregressiveNet:
    """Malach's linear model: logits = a block-lower-triangular linear map of the one-hot prefix."""
    return AutoregressiveNet(vocab_size, seq_len, [])


def mlp_next_token(vocab_size: int, seq_len: int, width: int, depth: int) -> AutoregressiveNet:
    """CausalLinear to ``width`` units, then ``depth`` - 1 more ReLU layers of that width, then the logits."""
    return AutoregressiveNet(vocab_size, seq_len, [width] * depth)
