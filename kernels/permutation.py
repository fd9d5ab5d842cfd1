"""A keyed permutation of [0, size) as a pure function of (seed, stream, epoch, index): the order in which an epoch
visits a finite training set, computed per index on the device, with no table and no host-side shuffle.

A balanced Feistel network on 2h-bit words (h the least with 4^h >= size) is a bijection of [0, 4^h) for any
round keys; cycle-walking (apply it again while the result is >= size) restricts it to a bijection of [0, size).
The ROUNDS round keys of epoch e on stream s are the words of
``philox(key=seed, counter=(PERMUTATION_WORD, e & 0xffffffff, e >> 32, s))`` (kernels/sparse_parity.py draws a
sample's words with counter word 0 from small word indices and its label noise with 0xffffffff, so these counters
are none of a sample's). The round function is murmur3's 32-bit finalizer of (right half ^ round key), cut to h
bits. Since 4^h < 4 size, an index walks fewer than 4 times on average.
"""
import torch

from kernels.philox import MASK32, philox4x32, split_seed

PERMUTATION_WORD = 0xFFFFFFFE  # counter word 0 of the round keys
ROUNDS = 4  # one Philox call's four words
MAX_SIZE = 2**62  # halves of at most 31 bits keep every intermediate within int64


def half_bits(size: int) -> int:
    """h: the bits of each Feistel half, the least h >= 1 with 4^h >= size."""
    return max(1, ((size - 1).bit_length() + 1) // 2)


def _mix(v: torch.Tensor) -> torch.Tensor:
    """murmur3's fmix32 of uint32 values held in int64 (products wrap modulo 2^64: the low 32 bits are exact)."""
    v = v ^ (v >> 16)
    v = (v * 0x85EBCA6B) & MASK32
    v = v ^ (v >> 13)
    v = (v * 0xC2B2AE35) & MASK32
    return v ^ (v >> 16)


def _feistel(x: torch.Tensor, keys: list[torch.Tensor], h: int) -> torch.Tensor:
    mask = (1 << h) - 1
    left, right = x >> h, x & mask
    for key in keys:
        left, right = right, left ^ (_mix(right ^ key) & mask)
    return (left << h) | right


def permuted(seed: int, stream: int, epoch: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
    """pi(index) for the permutation pi of [0, size) of each element's epoch: int64 tensors of one shape (epochs
    in [0, 2^64), indices in [0, size)), on any device; the result has their shape."""
    if not 1 <= size <= MAX_SIZE:
        raise ValueError(f"a permutation's size must be in [1, 2**62], got {size}")
    key0, key1 = split_seed(seed)
    epoch, flat = epoch.reshape(-1), index.reshape(-1)
    keys = list(philox4x32(torch.full_like(epoch, PERMUTATION_WORD), epoch & MASK32, epoch >> 32,
                           torch.full_like(epoch, stream), key0, key1))
    h = half_bits(size)
    out = _feistel(flat, keys, h)
    walking = (out >= size).nonzero().squeeze(1)
    while walking.numel():  # cycle-walk: a result outside [0, size) is permuted again until it lands inside
        out[walking] = _feistel(out[walking], [key[walking] for key in keys], h)
        walking = walking[out[walking] >= size]
    return out.view(index.shape)


def epoch_order(seed: int, stream: int, start: int, count: int, size: int, device: torch.device) -> torch.Tensor:
    """The training-set indices at positions [start, start + count) of the sequence of epochs, int64 (count,):
    position p is index pi_e(p mod size) of epoch e = p div size (positions may run past 2^63; epochs and
    indices stay within int64)."""
    epoch, offset = divmod(start, size)
    along = offset + torch.arange(count, dtype=torch.int64, device=device)
    return permuted(seed, stream, epoch + along // size, along % size, size)
