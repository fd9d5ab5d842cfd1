"""A keyed permutation of [0, size) as a pure function of (seed, stream, epoch, index): the order in which an epoch
visits a finite training set, computed per index on the device, with no table and no host-side shuffle.

A Feistel network on b-bit words (b = max(2, bits of size - 1), halves of floor(b/2) and ceil(b/2) bits,
alternating) is a bijection of [0, 2^b) for any round keys; cycle-walking (apply it again while the result is
>= size) restricts it to a bijection of [0, size). Since 2^b < 2 size, an index walks fewer than 2 times on
average. The ROUNDS round keys of epoch e on stream s are the words of
``philox(key=seed, counter=(PERMUTATION_WORD, e & 0xffffffff, e >> 32, s))`` (kernels/sparse_parity.py draws a
sample's words with counter word 0 from small word indices and its label noise with 0xffffffff, so these counters
are none of a sample's). The round function is murmur3's 32-bit finalizer of (right part ^ round key), cut to the
width of the left part.
"""
import torch

from kernels.philox import MASK32, philox4x32, split_seed

PERMUTATION_WORD = 0xFFFFFFFE  # counter word 0 of the round keys
ROUNDS = 4  # one Philox call's four words
MAX_SIZE = 2**62  # halves of at most 31 bits keep every intermediate within int64


def word_bits(size: int) -> int:
    """b: the bits of the Feistel network's words, the least b >= 2 with 2^b >= size."""
    return max(2, (size - 1).bit_length())


def _mix(v: torch.Tensor) -> torch.Tensor:
    """murmur3's fmix32 of uint32 values held in int64 (products wrap modulo 2^64: the low 32 bits are exact)."""
    v = v ^ (v >> 16)
    v = (v * 0x85EBCA6B) & MASK32
    v = v ^ (v >> 13)
    v = (v * 0xC2B2AE35) & MASK32
    return v ^ (v >> 16)


def _feistel(x: torch.Tensor, keys: list[torch.Tensor], bits: int) -> torch.Tensor:
    """The network on ``bits``-bit words: each round turns (left, right) into (right, left ^ F(right)), the two
    parts' widths swapping; ROUNDS is even, so the word ends split as it began."""
    left_bits = bits // 2
    for key in keys:
        right_bits = bits - left_bits
        left, right = x >> right_bits, x & ((1 << right_bits) - 1)
        x = (right << left_bits) | (left ^ (_mix(right ^ key) & ((1 << left_bits) - 1)))
        left_bits = right_bits
    return x


def round_keys(seed: int, streams: torch.Tensor, epochs: torch.Tensor) -> list[torch.Tensor]:
    """The ROUNDS round keys of each (stream, epoch): int64 tensors of stream ids and epochs in [0, 2^64),
    broadcast together; ROUNDS tensors of the broadcast shape."""
    key0, key1 = split_seed(seed)
    streams, epochs = torch.broadcast_tensors(streams, epochs)
    return list(philox4x32(torch.full_like(epochs, PERMUTATION_WORD), epochs & MASK32, epochs >> 32, streams,
                           key0, key1))


def permuted(keys: list[torch.Tensor], index: torch.Tensor, size: int) -> torch.Tensor:
    """pi(index) for the permutation pi of [0, size) that each element's round keys (``round_keys``, of the shape of
    ``index``) define: int64 indices in [0, size) in, the same out."""
    if not 1 <= size <= MAX_SIZE:
        raise ValueError(f"a permutation's size must be in [1, 2**62], got {size}")
    bits = word_bits(size)
    out = _feistel(index.reshape(-1), [key.reshape(-1) for key in keys], bits)
    walking = (out >= size).nonzero().squeeze(1)
    while walking.numel():  # cycle-walk: a result outside [0, size) is permuted again until it lands inside
        out[walking] = _feistel(out[walking], [key.reshape(-1)[walking] for key in keys], bits)
        walking = walking[out[walking] >= size]
    return out.view(index.shape)


def epoch_order(seed: int, streams: list[int], start: int, count: int, size: int,
                device: torch.device) -> torch.Tensor:
    """The training-set indices at positions [start, start + count) of each stream's sequence of epochs, int64
    (streams, count): position p is index pi_e(p mod size) of epoch e = p div size, pi_e the permutation of epoch
    e on that stream (positions may run past 2^63; epochs and indices stay within int64). The round keys are
    drawn once per stream and epoch the positions touch; the streams are permuted in one pass."""
    first, offset = divmod(start, size)
    along = offset + torch.arange(count, dtype=torch.int64, device=device)
    epoch = along // size  # relative to the first
    epochs = first + torch.arange((offset + count - 1) // size + 1 if count else 0, dtype=torch.int64, device=device)
    stream_ids = torch.tensor(streams, dtype=torch.int64, device=device)[:, None]
    keys = round_keys(seed, stream_ids, epochs[None, :])  # (streams, epochs) each
    return permuted([key[:, epoch] for key in keys], (along % size).expand(len(streams), -1), size)
