"""Philox4x32-10 (Salmon et al. 2011) in plain PyTorch, the same function as Triton's ``tl.philox``.

Words are uint32 values held in int64 tensors.
"""
import torch

MASK32 = 0xFFFFFFFF
PHILOX_M0, PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85
ROUNDS = 10


def _mulhilo(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of a * m for a uint32 tensor a and a uint32 constant m.

    The 64-bit product can exceed int64's range; PyTorch's integer multiply wraps modulo 2**64 on
    every backend, which leaves both words exact (the known-answer tests pin this down).
    """
    p = a * m
    return (p >> 32) & MASK32, p & MASK32


def philox4x32(c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor,
               key0: int, key1: int) -> tuple[torch.Tensor, ...]:
    """Ten Philox rounds over counters (c0..c3, broadcastable int64 tensors of uint32 values)."""
    k0, k1 = key0 & MASK32, key1 & MASK32
    for _ in range(ROUNDS):
        hi0, lo0 = _mulhilo(c0, PHILOX_M0)
        hi1, lo1 = _mulhilo(c2, PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + PHILOX_W0) & MASK32, (k1 + PHILOX_W1) & MASK32
    return c0, c1, c2, c3


def split_seed(seed: int) -> tuple[int, int]:
    """The Philox key (key0, key1) of a 64-bit seed, as ``tl.philox`` splits it."""
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    return seed & MASK32, seed >> 32


def sample_words(start: int, count: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples g in [start, start + count) as their counter words (g mod 2^32, g div 2^32 mod 2^32), int64
    (count,) each: the carry out of the low word reaches the high one."""
    lo = (start & MASK32) + torch.arange(count, dtype=torch.int64, device=device)
    return lo & MASK32, ((start >> 32) + (lo >> 32)) & MASK32
