"""Linear and MLP next-token predictors (Malach 2024): no attention, one weight block per position pair.

The core is ``CausalLinear``: the output at position t is a learned linear map of the one-hot tokens
at every position s <= t, ``out[t] = bias[t] + sum_{s <= t} W[s, t][x_s]``, with its own (vocab, out)
block W[s, t] for each pair s <= t. Only the T(T+1)/2 blocks on and below the diagonal exist (the parameter
count is honest), stored target-major: the blocks of target t are rows t(t+1)/2 .. t(t+1)/2 + t.

A forward pass takes a span of targets at a time: it lays the span's blocks out as a dense (sources * vocab,
span * out) piece, zero above the diagonal, and multiplies the one-hot prefix by it. The whole
(T*vocab, T*out) matrix is never assembled: time grows as B T^2 vocab out / 2 multiply-adds (one matrix
product per span), memory as the blocks themselves (T^2 vocab out / 2 floats) plus one piece. The backward
pass is that product's gradient, (one-hot prefix)^T @ (output gradient), read back into the blocks span by
span, so only the tokens are kept between the passes (tests/test_next_token_models.py checks both passes
against autograd through the assembled matrix).

* ``linear``: the logits are CausalLinear's output: a linear function of the prefix (multiclass
  logistic regression on the one-hot prefix, a convex problem);
* ``mlp``: CausalLinear to ``model.width`` hidden units, then ``model.depth - 1`` further ReLU layers
  of that width shared by all positions, then a linear read-out to the logits.

Generation keeps the tokens written so far; each new position costs its own t + 1 rows.
"""
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

SPAN_ELEMENTS = 2**22  # floats of one span's dense piece of blocks: bounds a pass's temporaries


class PrefixCache(NamedTuple):
    tokens: torch.Tensor  # (B, T) int64: the token written at each position (unwritten positions are never read)


class CausalSums(torch.autograd.Function):
    """The CausalLinear sums of targets [first, last), without bias, a span of targets at a time."""

    @staticmethod
    def forward(ctx, blocks: torch.Tensor, tokens: torch.Tensor, layer: "CausalLinear", first: int,
                last: int) -> torch.Tensor:
        ctx.save_for_backward(tokens)
        ctx.layer, ctx.first, ctx.last = layer, first, last
        onehot = layer.onehot(tokens)
        return torch.cat([layer.span_sums(blocks, onehot, t0, t1) for t0, t1 in layer.spans(first, last)], 1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        tokens, = ctx.saved_tensors
        layer, first = ctx.layer, ctx.first
        grad_blocks, onehot = torch.zeros_like(layer.blocks), layer.onehot(tokens)
        for t0, t1 in layer.spans(first, ctx.last):
            layer.span_grad(grad_blocks, onehot, grad[:, t0 - first:t1 - first], t0, t1)
        return grad_blocks, None, None, None, None


class CausalLinear(nn.Module):
    def __init__(self, seq_len: int, vocab_size: int, out_features: int, zero_init: bool = False):
        super().__init__()
        self.seq_len, self.vocab_size, self.out_features = seq_len, vocab_size, out_features
        target, _ = torch.tril_indices(seq_len, seq_len)  # every pair s <= t, target-major
        blocks = torch.zeros(target.numel(), vocab_size, out_features)
        if not zero_init:  # fan-in of position t: its t + 1 one-hot tokens
            blocks.normal_().div_((target.float() + 1).sqrt()[:, None, None])
        self.blocks = nn.Parameter(blocks)  # block t(t+1)/2 + s maps the token at position s to target t
        self.bias = nn.Parameter(torch.zeros(seq_len * out_features))  # flat: optimizers treat 1-d as biases

    def spans(self, first: int, last: int) -> list[tuple[int, int]]:
        """Targets [first, last) cut into spans [t0, t1) whose dense piece, t1 sources by t1 - t0 targets, holds
        at most SPAN_ELEMENTS floats (one target at least)."""
        per_pair = self.vocab_size * self.out_features
        out, t0 = [], first
        while t0 < last:
            t1 = t0 + 1
            while t1 < last and (t1 + 1) * (t1 + 1 - t0) * per_pair <= SPAN_ELEMENTS:
                t1 += 1
            out.append((t0, t1))
            t0 = t1
        return out

    def onehot(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens (B, t) as one-hot rows (B, t * vocab) in the blocks' dtype."""
        return F.one_hot(tokens, self.vocab_size).to(self.blocks.dtype).flatten(1)

    def span_sums(self, blocks: torch.Tensor, onehot: torch.Tensor, t0: int, t1: int) -> torch.Tensor:
        """Sums (B, t1 - t0, out) of targets [t0, t1): the one-hot prefix times the span's dense piece."""
        dense = blocks.new_zeros(t1, self.vocab_size, t1 - t0, self.out_features)
        for t in range(t0, t1):
            first = t * (t + 1) // 2
            dense[:t + 1, :, t - t0].copy_(blocks[first:first + t + 1])
        sums = onehot[:, :t1 * self.vocab_size] @ dense.view(t1 * self.vocab_size, -1)
        return sums.view(-1, t1 - t0, self.out_features)

    def span_grad(self, grad_blocks: torch.Tensor, onehot: torch.Tensor, grad: torch.Tensor, t0: int,
                  t1: int) -> None:
        """Write the gradient of targets [t0, t1)'s blocks, from their outputs' gradient (B, t1 - t0, out)."""
        dense = (onehot[:, :t1 * self.vocab_size].T @ grad.reshape(grad.shape[0], -1))
        dense = dense.view(t1, self.vocab_size, t1 - t0, self.out_features)
        for t in range(t0, t1):
            first = t * (t + 1) // 2
            grad_blocks[first:first + t + 1] = dense[:t + 1, :, t - t0]

    def outputs(self, tokens: torch.Tensor, first: int, last: int) -> torch.Tensor:
        """Outputs (B, last - first, out) of targets [first, last), bias added, from tokens (B, >= last)."""
        if last > self.seq_len:
            raise ValueError(f"positions up to {last} exceed the model's seq_len {self.seq_len}")
        sums = CausalSums.apply(self.blocks, tokens, self, first, last)
        return sums + self.bias.view(self.seq_len, self.out_features)[first:last]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Outputs (B, t, out) for tokens (B, t) at positions [0, t)."""
        return self.outputs(tokens, 0, tokens.shape[1])

    def init_cache(self, batch: int, device: torch.device) -> PrefixCache:
        return PrefixCache(torch.zeros(batch, self.seq_len, dtype=torch.int64, device=device))

    def forward_cached(self, new_tokens: torch.Tensor, cache: PrefixCache, pos: int) -> torch.Tensor:
        """Outputs (B, t, out) of tokens written at positions [pos, pos + t), after those written before pos.

        Positions after pos + t may hold stale tokens; no output at or before pos + t reads them.
        """
        t = new_tokens.shape[1]
        if pos + t > self.seq_len:
            raise ValueError(f"positions up to {pos + t} exceed the model's seq_len {self.seq_len}")
        cache.tokens[:, pos:pos + t] = new_tokens
        return self.outputs(cache.tokens[:, :pos + t], pos, pos + t)


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
