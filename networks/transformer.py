"""A small decoder-only transformer (pre-LayerNorm) for chain-of-thought sequences, with a KV cache.

Attention runs through ``kernels.attention`` (the Triton FlashAttention kernel on CUDA, SDPA otherwise,
by ``kernels.backend``). Positions are learned embeddings, rotary (RoPE, on q and k) or none (a causal
transformer can still tell positions apart).
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from kernels import attention

KVCache = list[tuple[torch.Tensor, torch.Tensor]]  # per block: keys, values (B, heads, seq_len, head_dim)


def rotary_tables(seq_len: int, head_dim: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (seq_len, head_dim / 2) of RoPE's angles."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.arange(seq_len, dtype=torch.float32)[:, None] * inv_freq
    return angles.cos(), angles.sin()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on x (B, heads, T, head_dim): rotate the pairs (x[i], x[i + head_dim / 2]) by the angles."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class SelfAttention(nn.Module):
    def __init__(self, d_model: int, heads: int, rope: bool, seq_len: int, backend: str):
        super().__init__()
        self.heads, self.head_dim, self.backend = heads, d_model // heads, backend
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.rope = rope
        if rope:
            cos, sin = rotary_tables(seq_len, self.head_dim)
            self.register_buffer("cos", cos, persistent=False)
            self.register_buffer("sin", sin, persistent=False)

    def forward(self, x: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor] | None = None,
                pos: int = 0) -> torch.Tensor:
        """x (B, T, d_model) at positions [pos, pos + T); with a cache, its keys/values are read and filled."""
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.heads, self.head_dim).transpose(1, 2) for t in self.qkv(x).split(C, dim=2))
        if self.rope:
            cos, sin = self.cos[pos:pos + T], self.sin[pos:pos + T]
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        if cache is not None:
            cache[0][:, :, pos:pos + T], cache[1][:, :, pos:pos + T] = k, v
        if pos == 0:  # the whole prefix is here: plain causal self-attention
            y = attention(q, k, v, causal=True, backend=self.backend)
        else:
            if T != 1:
                raise ValueError(f"cached attention after position 0 takes one token at a time, got {T}")
            # One new query against the cached keys 0..pos: the shapes differ (the kernel needs equal ones),
            # and the newest position may see every cached key, so no mask (SDPA's is_causal would align
            # the mask top-left and hide all keys but the first).
            y = F.scaled_dot_product_attention(q, cache[0][:, :, :pos + 1], cache[1][:, :, :pos + 1], is_causal=False)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    def __init__(self, d_model: int, heads: int, rope: bool, seq_len: int, backend: str):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attn = SelfAttention(d_model, heads, rope, seq_len, backend)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))

    def forward(self, x: torch.Tensor, cache=None, pos: int = 0) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), cache, pos)
        return x + self.mlp(self.ln2(x))


class CoTTransformer(nn.Module):
    def __init__(self, vocab_size: int, seq_len: int, depth: int = 2, d_model: int = 128, heads: int = 4,
                 positional: str = "learned", backend: str = "auto"):
        """``positional``: learned | rope | none; heads must divide d_model (and leave an even head dim for rope)."""
        super().__init__()
        if d_model % heads or (positional == "rope" and (d_model // heads) % 2):
            raise ValueError(f"{heads} heads do not split d_model {d_model} into {positional} heads")
        self.seq_len, self.heads, self.head_dim = seq_len, heads, d_model // heads
        self.embed = nn.Embedding(vocab_size, d_model)
        self.position = nn.Embedding(seq_len, d_model) if positional == "learned" else None
        self.blocks = nn.ModuleList(Block(d_model, heads, positional == "rope", seq_len, backend)
                                    for _ in range(depth))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self.apply(self._init)
        for block in self.blocks:  # GPT-2: scale the residual projections by depth
            for proj in (block.attn.proj, block.mlp[2]):
                nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * depth))

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, vocab) for tokens (B, T); position t sees tokens <= t."""
        return self._run(tokens, None, 0)

    def init_cache(self, batch: int, device: torch.device) -> KVCache:
        dtype = self.embed.weight.dtype
        shape = (batch, self.heads, self.seq_len, self.head_dim)
        return [(torch.empty(shape, device=device, dtype=dtype), torch.empty(shape, device=device, dtype=dtype))
                for _ in self.blocks]

    def forward_cached(self, new_tokens: torch.Tensor, cache: KVCache, pos: int) -> torch.Tensor:
        """Logits (B, t, vocab) of tokens at positions [pos, pos + t): a prompt at 0, then one token at a time."""
        return self._run(new_tokens, cache, pos)

    def _run(self, tokens: torch.Tensor, cache: KVCache | None, pos: int) -> torch.Tensor:
        T = tokens.shape[1]
        if pos + T > self.seq_len:
            raise ValueError(f"positions up to {pos + T} exceed the model's seq_len {self.seq_len}")
        x = self.embed(tokens)
        if self.position is not None:
            x = x + self.position.weight[pos:pos + T]
        for i, block in enumerate(self.blocks):
            x = block(x, None if cache is None else cache[i], pos)
        return self.head(self.ln_f(x))
