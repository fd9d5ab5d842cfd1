"""k-sparse parity samples as a pure function of (seed, stream, sample index): the PyTorch reference.

The stream layout, shared bit for bit with the Triton kernel:

* sample g (64-bit) of stream s under ``seed`` draws 32-bit word w (w = 0, 1, ...) as
  ``philox(key=seed, counter=(w // 4, g & 0xffffffff, g >> 32, s))[w % 4]``;
* bit i of the sample is bit ``i % 32`` of word ``i // 32`` (least significant first);
* the label noise draws ``u = philox(key=seed, counter=(0xffffffff, g_lo, g_hi, s))[0]`` and
  flips the label iff ``u < floor(noise * 2**32)``;
* ``cot[:, j]`` is the XOR of x over ``secret[:j + 1]``; ``cot[:, -1]`` is the noiseless label.
"""
from collections.abc import Sequence

import torch

from kernels.dispatch import resolve_backend
from kernels.philox import MASK32, philox4x32, sample_words, split_seed
from kernels.tokens import SEPARATOR

NOISE_WORD = 0xFFFFFFFF
LAYOUTS = ("bits", "pm1", "tokens")

IntOrInts = int | Sequence[int] | torch.Tensor


def sparse_parity(seed: int, start: int, count: int, n: int, secret: IntOrInts, *,
                  stream: IntOrInts = 0, noise: float = 0.0, backend: str = "auto",
                  device: torch.device | str | None = None, layout: str = "bits", compile: bool = False):
    """Samples [start, start + count) of stream(s) ``stream``: returns (x, y, cot).

    ``layout="bits"``: x uint8 (count, n), y uint8 (count,), cot uint8 (count, k).
    ``layout="pm1"``: x float32 in {+1, -1} (= 1 - 2 bits), y float32 = 1 - 2 y; cot as bits.
    ``layout="tokens"``: x int64 (count, n + 1 + k) = bits, SEPARATOR, cot; y and cot as bits.
    A sequence (or 1-d tensor) of stream ids adds a leading dimension, one slice per stream.
    ``secret`` and ``stream`` may be ints, lists or tensors; int64 tensors already on ``device`` (from
    ``on_device``, which validates them once) are used as they are, so a CUDA call copies nothing
    between host and device and never synchronizes. Other inputs are validated on every call.
    ``compile=True`` runs the reference on a CPU as a C++ extension (kernels/sparse_parity_cpu.py, built
    on first use): the same bits, ~10x faster; without a C++ toolchain it warns once and stays eager.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    secret_t, streams, single = _check(seed, start, count, n, secret, stream, noise, layout, device)
    threshold = int(noise * 2**32)
    if resolve_backend(backend, device, "sparse_parity") == "triton":
        from kernels.sparse_parity_triton import sparse_parity_triton
        out = sparse_parity_triton(seed, start, count, n, secret_t, streams, threshold, layout)
    else:
        out = _reference(seed, start, count, n, secret_t, streams, threshold, layout, compile)
    return tuple(t[0] for t in out) if single else out


def sparse_parity_at(seed: int, index: torch.Tensor, n: int, secret: IntOrInts, *, stream: IntOrInts = 0,
                     noise: float = 0.0, layout: str = "bits"):
    """The samples at ``index`` (int64 sample indices in [0, 2^63), on the device the samples are made on; not read
    back, so a CUDA call never synchronizes) of stream(s) ``stream``, as ``sparse_parity`` returns them: with one
    stream, index is (count,); with S streams, (count,) for all of them or (S, count), row s for stream s.
    ``sparse_parity_at(seed, index, ...)[i]`` equals ``sparse_parity(seed, index[i], 1, ...)[0]``: the same bits.
    It is the PyTorch reference on every device (no Triton or C++ version)."""
    if index.dtype != torch.int64 or index.dim() not in (1, 2):
        raise ValueError(f"index must be a 1-d or 2-d int64 tensor, got {index.dtype} of shape {tuple(index.shape)}")
    secret_t, streams, single = _check(seed, 0, 0, n, secret, stream, noise, layout, index.device)
    if index.dim() == 2 and index.shape[0] != streams.numel():
        raise ValueError(f"index has {index.shape[0]} rows for {streams.numel()} streams")
    out = _drawn(seed, index & MASK32, index >> 32, n, secret_t, streams, int(noise * 2**32), layout)
    return tuple(t[0] for t in out) if single else out


def on_device(secret: IntOrInts, stream: IntOrInts, n: int,
              device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """(secret, stream) validated for n bits and moved to ``device`` once, for ``sparse_parity`` calls there.

    An int stream becomes a 0-d tensor (a call then returns no stream axis), a sequence a 1-d one.
    """
    secret_t, streams = _validated(secret, stream, n)
    single = isinstance(stream, int) or (isinstance(stream, torch.Tensor) and stream.dim() == 0)
    device = torch.device(device)
    return secret_t.to(device), (streams.reshape(()) if single else streams).to(device)


def _check(seed, start, count, n, secret, stream, noise, layout, device):
    """(secret, streams, single) on ``device`` after checking every argument; see ``sparse_parity``."""
    if not 0 <= start < 2**64 or count < 0 or start + count > 2**64:
        raise ValueError(f"sample range [{start}, {start + count}) must lie in [0, 2**64)")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 0.0 <= noise < 0.5:
        raise ValueError(f"noise must be in [0, 0.5), got {noise}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    split_seed(seed)
    single = isinstance(stream, int) or (isinstance(stream, torch.Tensor) and stream.dim() == 0)
    if _prepared(secret, device) and _prepared(stream, device):
        # values were checked by on_device; reading them here would synchronize with a GPU (and on a CPU
        # checking them again costs a fifth of a millisecond, a fifth of generating a default ticket)
        if secret.dim() != 1 or not 1 <= secret.numel() <= n or stream.dim() > 1:
            raise ValueError(f"secret must be a 1-d tensor of 1..{n} indices and stream a 0-d or 1-d tensor, "
                             f"got shapes {tuple(secret.shape)} and {tuple(stream.shape)}")
        return secret, stream.reshape(-1), single
    secret_t, streams = _validated(secret, stream, n)
    return secret_t.to(device), streams.to(device), single


def _prepared(t, device: torch.device) -> bool:
    """An int64 tensor already on ``device`` ("cuda" without an index matches any CUDA device)."""
    return (isinstance(t, torch.Tensor) and t.dtype == torch.int64 and t.device.type == device.type
            and device.index in (None, t.device.index))


def _validated(secret, stream, n) -> tuple[torch.Tensor, torch.Tensor]:
    """secret (k,) and stream ids (S,) as int64 CPU tensors, or a ValueError naming the problem."""
    secret_t = torch.as_tensor(secret, dtype=torch.int64).reshape(-1).cpu()
    k = secret_t.numel()
    if not 1 <= k <= n or secret_t.min() < 0 or secret_t.max() >= n or secret_t.unique().numel() != k:
        raise ValueError(f"secret must be 1..n distinct indices in [0, {n}), got {secret_t.tolist()}")
    streams = torch.as_tensor(stream, dtype=torch.int64).reshape(-1).cpu()
    if streams.numel() and (streams.min() < 0 or streams.max() > MASK32):
        raise ValueError("stream ids must be in [0, 2**32)")
    return secret_t, streams


_TABLES: dict = {}


def _byte_table(layout: str, device: torch.device) -> torch.Tensor:
    """byte -> its 8 bits, as uint8 bits or as float32 +/-1, made on ``device`` (no host copy), cached."""
    key = (layout == "pm1", device)
    if key not in _TABLES:
        table = ((torch.arange(256, device=device)[:, None] >> torch.arange(8, device=device)) & 1).to(torch.uint8)
        _TABLES[key] = 1.0 - 2.0 * table.float() if layout == "pm1" else table
    return _TABLES[key]


def _reference(seed, start, count, n, secret, streams, threshold, layout, compile=False):
    if compile and secret.device.type == "cpu":
        from kernels.sparse_parity_cpu import extension, sparse_parity_cpu
        ext = extension()
        if ext is not None:
            return _from_bits(*sparse_parity_cpu(ext, seed, start, count, n, secret, streams, threshold), layout)
    return _drawn(seed, *sample_words(start, count, secret.device), n, secret, streams, threshold, layout)


def _drawn(seed, g_lo, g_hi, n, secret, streams, threshold, layout):
    """Samples g = g_hi 2^32 + g_lo of each stream: (count,) words shared by the streams, or (S, count) one row each."""
    key0, key1 = split_seed(seed)
    device = secret.device
    g_lo, g_hi = g_lo.expand(streams.numel(), -1)[..., None], g_hi.expand(streams.numel(), -1)[..., None]
    s = streams[:, None, None]
    n_words = (n + 31) // 32
    calls = torch.arange((n_words + 3) // 4, dtype=torch.int64, device=device)[None, None, :]
    words = torch.stack(philox4x32(calls, g_lo, g_hi, s, key0, key1), dim=-1)  # (S, count, calls, 4)
    words = words.flatten(2)[..., :n_words]
    # bit i of a sample is bit i % 8 of byte i // 8 (bytes little-endian within each word)
    byte_shifts = torch.arange(0, 32, 8, dtype=torch.int64, device=device)
    byte_values = ((words[..., None] >> byte_shifts) & 0xFF).flatten(2)[..., : (n + 7) // 8]
    x = _byte_table(layout, device)[byte_values].flatten(2)[..., :n]
    secret_bits = (words[..., secret // 32] >> (secret % 32)) & 1
    cot = torch.cumsum(secret_bits, dim=-1).remainder_(2).to(torch.uint8)
    y = cot[..., -1]
    if threshold:
        noise_word = philox4x32(torch.full_like(g_lo, NOISE_WORD), g_lo, g_hi, s, key0, key1)[0][..., 0]
        y = y ^ (noise_word < threshold).to(torch.uint8)
    if layout == "pm1":  # x came out of the table as +/-1 already
        return x, 1.0 - 2.0 * y.float(), cot
    return _from_bits(x, y, cot, layout)


def _from_bits(x, y, cot, layout):
    """(x, y, cot) of the "bits" layout in ``layout``."""
    if layout == "pm1":
        return 1.0 - 2.0 * x.float(), 1.0 - 2.0 * y.float(), cot
    if layout == "tokens":
        sep = torch.full(x.shape[:-1] + (1,), SEPARATOR, dtype=torch.int64, device=x.device)
        return torch.cat([x.long(), sep, cot.long()], dim=-1), y, cot
    return x, y, cot
