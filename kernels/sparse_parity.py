"""k-sparse parity samples as a pure function of (seed, stream, sample index): the PyTorch reference.

The stream layout, shared bit for bit with the Triton kernel:

* sample g (64-bit) of stream s under ``seed`` draws 32-bit word w (w = 0, 1, ...) as
  ``philox(key=seed, counter=(w // 4, g & 0xffffffff, g >> 32, s))[w % 4]``;
* bit i of the sample is bit ``i % 32`` of word ``i // 32`` (least significant first);
* the label noise draws ``u = philox(key=seed, counter=(0xffffffff, g_lo, g_hi, s))[0]`` and
  flips the label iff ``u < floor(noise * 2**32)``;
* ``cot[:, j]`` is the XOR of x over ``secret[:j + 1]``; ``cot[:, -1]`` is the noiseless label.
"""
import functools
from collections.abc import Sequence

import torch

from kernels.dispatch import resolve_backend, warn_once
from kernels.philox import MASK32, philox4x32, split_seed

NOISE_WORD = 0xFFFFFFFF
SEPARATOR = 2  # token id between the bits and the chain in the "tokens" layout
LAYOUTS = ("bits", "pm1", "tokens")

IntOrInts = int | Sequence[int] | torch.Tensor


def sparse_parity(seed: int, start: int, count: int, n: int, secret: IntOrInts, *,
                  stream: IntOrInts = 0, noise: float = 0.0, backend: str = "auto",
                  device: torch.device | str | None = None, layout: str = "bits", compile: bool = False):
    """Samples [start, start + count) of stream(s) ``stream``: returns (x, y, cot).

    ``layout="bits"``: x uint8 (count, n), y uint8 (count,), cot uint8 (count, k).
    ``layout="pm1"``: x float32 in {+1, -1} (= 1 - 2 bits), y float32 = 1 - 2 y; cot as bits.
    ``layout="tokens"``: x int64 (count, n + 1 + k) = bits, SEPARATOR, cot; y and cot as bits.
    A sequence of stream ids adds a leading dimension, one slice per stream.
    ``compile=True`` runs the reference (when the backend resolves to it) as one torch.compile'd loop
    nest, bit-exact and about 20-40x faster on a CPU; it falls back to eager, with one warning, where
    compilation fails (no C++ compiler).
    """
    secret_t, streams, single = _check(seed, start, count, n, secret, stream, noise, layout)
    device = torch.device(device) if device is not None else torch.device("cpu")
    threshold = int(noise * 2**32)
    if resolve_backend(backend, device, "sparse_parity") == "triton":
        from kernels.sparse_parity_triton import sparse_parity_triton
        out = sparse_parity_triton(seed, start, count, n, secret_t.to(device), streams.to(device),
                                   threshold, layout)
    else:
        out = _reference(seed, start, count, n, secret_t.to(device), streams.to(device),
                         threshold, layout, compile)
    return tuple(t[0] for t in out) if single else out


def _check(seed, start, count, n, secret, stream, noise, layout):
    if not 0 <= start < 2**64 or count < 0 or start + count > 2**64:
        raise ValueError(f"sample range [{start}, {start + count}) must lie in [0, 2**64)")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 0.0 <= noise < 0.5:
        raise ValueError(f"noise must be in [0, 0.5), got {noise}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    split_seed(seed)
    secret_t = torch.as_tensor(secret, dtype=torch.int64).reshape(-1).cpu()
    k = secret_t.numel()
    if not 1 <= k <= n or secret_t.min() < 0 or secret_t.max() >= n or secret_t.unique().numel() != k:
        raise ValueError(f"secret must be 1..n distinct indices in [0, {n}), got {secret_t.tolist()}")
    single = isinstance(stream, int)
    streams = torch.as_tensor([stream] if single else stream, dtype=torch.int64).reshape(-1).cpu()
    if streams.numel() and (streams.min() < 0 or streams.max() > MASK32):
        raise ValueError("stream ids must be in [0, 2**32)")
    return secret_t, streams, single


_BYTE_BITS = ((torch.arange(256)[:, None] >> torch.arange(8)) & 1).to(torch.uint8)  # byte -> its 8 bits
_TABLES: dict = {}


def _byte_table(layout: str, device: torch.device) -> torch.Tensor:
    """byte -> its 8 bits, as uint8 bits or as float32 +/-1, cached per device."""
    key = (layout == "pm1", device)
    if key not in _TABLES:
        table = _BYTE_BITS.to(device)
        _TABLES[key] = 1.0 - 2.0 * table.float() if layout == "pm1" else table
    return _TABLES[key]


def _reference(seed, start, count, n, secret, streams, threshold, layout, compile=False):
    key0, key1 = split_seed(seed)
    device = secret.device
    lo = (start & MASK32) + torch.arange(count, dtype=torch.int64, device=device)
    g_lo = (lo & MASK32)[None, :, None]
    g_hi = (((start >> 32) + (lo >> 32)) & MASK32)[None, :, None]
    calls = torch.arange(((n + 31) // 32 + 3) // 4, dtype=torch.int64, device=device)[None, None, :]
    args = (calls, g_lo, g_hi, streams[:, None, None], key0, key1, n, threshold)
    if compile and not _compile_failed:
        try:
            words, noise_word = _compiled(_words)(*args, compiled=True)
            # a short secret as constants: its XOR chain unrolls into the graph (a cumsum would not fuse)
            static = tuple(secret.tolist()) if secret.numel() <= 64 else secret
            return _compiled(_samples)(words, noise_word, static, n, threshold, layout, compiled=True)
        except Exception as error:  # torch.compile raises its backend's errors as they come
            _compile_failed.append(error)
            warn_once("sparse_parity-compile", f"sparse_parity: torch.compile failed ({type(error).__name__}: "
                                               f"{str(error).splitlines()[0][:200]}); using the eager reference")
    return _samples(*_words(*args), secret, n, threshold, layout)


_compile_failed: list[Exception] = []  # once compilation fails, this process stays eager


@functools.cache
def _compiled(fn):
    """``fn`` through torch.compile, once per process (two graphs: fused, the Philox words would be
    recomputed for every bit they feed)."""
    return torch.compile(fn, dynamic=False)


def _words(calls, g_lo, g_hi, s, key0: int, key1: int, n: int, threshold: int, compiled: bool = False):
    """The Philox words (S, count, ceil(n / 32)) of counters (g_lo, g_hi) (1, count, 1) on streams s (S, 1, 1),
    and the noise words (S, count) if ``threshold``; ``calls`` (1, 1, C) numbers a sample's Philox calls.

    Every counter is a tensor argument, so one compiled graph serves any start. ``compiled``: multiply
    without int64 overflow, which is undefined behaviour in the generated C++ (eager PyTorch wraps exactly).
    """
    words = torch.stack(philox4x32(calls, g_lo, g_hi, s, key0, key1, compiled), dim=-1)  # (S, count, C, 4)
    words = words.flatten(2)[..., :(n + 31) // 32]
    if not threshold:
        return words, None
    noise_word = philox4x32(torch.full_like(g_lo, NOISE_WORD), g_lo, g_hi, s, key0, key1, compiled)[0][..., 0]
    return words, noise_word


def _samples(words, noise_word, secret, n: int, threshold: int, layout: str, compiled: bool = False):
    """(x, y, cot) in ``layout`` from a sample's Philox words; ``compiled`` shifts bits out directly.
    ``secret``: an index tensor, or a tuple of ints (XORed one by one)."""
    if compiled:  # one loop nest
        shifts = torch.arange(32, device=words.device)
        bits = ((words[..., None] >> shifts) & 1).flatten(2)[..., :n].to(torch.uint8)
        x = 1.0 - 2.0 * bits.float() if layout == "pm1" else bits
    else:  # bit i of a sample is bit i % 8 of byte i // 8 (bytes little-endian within each word)
        byte_shifts = torch.arange(0, 32, 8, dtype=torch.int64, device=words.device)
        byte_values = ((words[..., None] >> byte_shifts) & 0xFF).flatten(2)[..., : (n + 7) // 8]
        x = _byte_table(layout, words.device)[byte_values].flatten(2)[..., :n]
    if isinstance(secret, tuple):
        cot = []
        for i in secret:
            bit = (words[..., i // 32] >> (i % 32)) & 1
            cot.append(cot[-1] ^ bit if cot else bit)
        cot = torch.stack(cot, dim=-1).to(torch.uint8)
    else:
        secret_bits = (words[..., secret // 32] >> (secret % 32)) & 1
        cot = torch.cumsum(secret_bits, dim=-1).remainder_(2).to(torch.uint8)
    y = cot[..., -1]
    if threshold:
        y = y ^ (noise_word < threshold).to(torch.uint8)
    if layout == "pm1":
        return x, 1.0 - 2.0 * y.float(), cot
    if layout == "tokens":
        sep = torch.full(x.shape[:-1] + (1,), SEPARATOR, dtype=torch.int64, device=x.device)
        return torch.cat([x.long(), sep, cot.long()], dim=-1), y, cot
    return x, y, cot
