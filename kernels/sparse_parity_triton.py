"""Fused Triton kernel for ``kernels.sparse_parity``: bits, noisy label and chain of thought in one pass.

Same stream as the PyTorch reference in ``kernels/sparse_parity.py`` (read its docstring), bit for bit.
One program owns ``BLOCK_R`` rows (samples) of one stream and

1. walks the row in chunks of ``BLOCK_C`` bits held as a 3D tile (rows, philox calls, 128 bits):
   one ``tl.philox`` call per (row, 128-bit chunk) gives four uint32 words, and shifts expand them
   to bits, written straight in the requested layout (uint8 bits, float32 +-1, int64 tokens);
2. gathers the secret bits ``KB`` at a time: bit ``p`` is bit ``p % 32`` of word ``p // 32``, recomputed
   with one philox per (row, secret index) -- or, when the whole row is one philox call (n <= 128),
   taken from the words of step 1 -- and writes the running parity (``tl.cumsum`` + a carry) as cot;
3. draws the noise word (counter ``c0 = 0xffffffff``) and writes the label.

No intermediate tensor touches memory. Counters are always uint32 tensors: ``tl.philox`` with
Python-int or int64 counters silently switches to Philox4x64, a different stream.

Block sizes are fixed, not autotuned: the kernel is a pure streaming write, so anything with
~4K elements per program and 4 warps saturates bandwidth; the row is cut into chunks of at most
512 bits so register use stays flat for any n, and ``BLOCK_R = 4096 // BLOCK_C`` rows keep the tile
size constant (e.g. n=50: 64 rows x 64 bits; n=4096: 8 rows x 512 bits, 8 chunks).
Only ``tl.philox``, ``tl.cumsum``, ``tl.where`` and plain loops are used (all present in triton 3.0+).
"""
from contextlib import nullcontext

import torch
import triton
import triton.language as tl

from kernels.sparse_parity import SEPARATOR

LAYOUT_IDS = {"bits": 0, "pm1": 1, "tokens": 2}
TILE = 4096  # elements per program tile (rows x bits)
MAX_CHUNK = 512  # bits per row per loop iteration
MAX_KB = 32  # secret indices per loop iteration
MAX_GRID_Y = 65535  # CUDA limit on grid axis 1 (streams)
_SEPARATOR = tl.constexpr(SEPARATOR)


@triton.jit
def _select_word(w0, w1, w2, w3, sel):
    """Word ``sel`` (0..3, broadcastable) of a philox result."""
    return tl.where(sel == 0, w0, tl.where(sel == 1, w1, tl.where(sel == 2, w2, w3)))


@triton.jit
def _write_x(x_row_ptr, rmask, w0, w1, w2, w3, col0, n,
             NC: tl.constexpr, INNER: tl.constexpr, LAYOUT: tl.constexpr):
    """Expand words (R, NC, 1) of calls col0//128 + [0, NC) into bits and store columns [col0, col0+NC*128)."""
    nc = tl.arange(0, NC)[None, :, None]
    b = tl.arange(0, INNER)[None, None, :]
    word = _select_word(w0, w1, w2, w3, b // 32)  # (R, NC, INNER)
    bits = (word >> (b % 32).to(tl.uint32)) & 1
    col = col0 + nc * 128 + b
    mask = rmask[:, None, None] & (col < n)
    ptrs = x_row_ptr[:, None, None] + col
    if LAYOUT == 0:
        tl.store(ptrs, bits.to(tl.uint8), mask=mask)
    elif LAYOUT == 1:
        tl.store(ptrs, 1.0 - 2.0 * bits.to(tl.float32), mask=mask)
    else:
        tl.store(ptrs, bits.to(tl.int64), mask=mask)


@triton.jit
def _sparse_parity_kernel(
    x_ptr, y_ptr, cot_ptr, secret_ptr, streams_ptr,
    seed, start_lo, start_hi, count, n, k, x_stride, threshold,
    BLOCK_R: tl.constexpr, NC: tl.constexpr, INNER: tl.constexpr, KB: tl.constexpr,
    SINGLE_CALL: tl.constexpr, HAS_NOISE: tl.constexpr, LAYOUT: tl.constexpr,
):
    BLOCK_C: tl.constexpr = NC * INNER
    pid_r = tl.program_id(0)
    pid_s = tl.program_id(1)

    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < count
    rows64 = rows.to(tl.int64)
    # 64-bit sample index g = start + row, split into uint32 words with carry.
    g = rows64 + start_lo
    g_lo = g.to(tl.uint32)
    g_hi = (start_hi + (g >> 32)).to(tl.uint32)
    s = tl.load(streams_ptr + pid_s).to(tl.uint32)
    zero = tl.zeros((BLOCK_R,), dtype=tl.uint32)
    s_r = s + zero

    srow = pid_s.to(tl.int64) * count + rows64  # row index into the (S, count) planes
    x_row_ptr = x_ptr + srow * x_stride
    cot_row_ptr = cot_ptr + srow * k

    # 1. x: one philox call per (row, 128 bits).
    if SINGLE_CALL:  # n <= 128: the whole row is call 0; keep its words for the secret gather.
        a0, a1, a2, a3 = tl.philox(seed, zero, g_lo, g_hi, s_r)
        _write_x(x_row_ptr, rmask, a0[:, None, None], a1[:, None, None], a2[:, None, None],
                 a3[:, None, None], 0, n, NC, INNER, LAYOUT)
    else:
        zero3 = tl.zeros((BLOCK_R, NC, 1), dtype=tl.uint32)
        lo3 = g_lo[:, None, None] + zero3
        hi3 = g_hi[:, None, None] + zero3
        s3 = s_r[:, None, None] + zero3
        for col0 in range(0, n, BLOCK_C):
            call = (col0 // 128 + tl.arange(0, NC)).to(tl.uint32)[None, :, None] + zero3
            w0, w1, w2, w3 = tl.philox(seed, call, lo3, hi3, s3)
            _write_x(x_row_ptr, rmask, w0, w1, w2, w3, col0, n, NC, INNER, LAYOUT)

    # 2. chain of thought: prefix parities over the secret, KB indices at a time.
    zero2 = tl.zeros((BLOCK_R, KB), dtype=tl.uint32)
    lo2 = g_lo[:, None] + zero2
    hi2 = g_hi[:, None] + zero2
    s2 = s_r[:, None] + zero2
    carry = tl.zeros((BLOCK_R,), dtype=tl.int32)
    for j0 in range(0, k, KB):
        j = j0 + tl.arange(0, KB)
        jmask = j < k
        pos = tl.load(secret_ptr + j, mask=jmask, other=0).to(tl.int32)[None, :]
        if SINGLE_CALL:
            word = _select_word(a0[:, None], a1[:, None], a2[:, None], a3[:, None], pos // 32)
        else:
            call = (pos // 128).to(tl.uint32) + zero2
            w0, w1, w2, w3 = tl.philox(seed, call, lo2, hi2, s2)
            word = _select_word(w0, w1, w2, w3, (pos // 32) % 4)
        bits = ((word >> (pos % 32).to(tl.uint32)) & 1).to(tl.int32)
        bits = tl.where(jmask[None, :], bits, 0)
        chain = (tl.cumsum(bits, axis=1) + carry[:, None]) & 1
        carry = (carry + tl.sum(bits, axis=1)) & 1
        cmask = rmask[:, None] & jmask[None, :]
        tl.store(cot_row_ptr[:, None] + j[None, :], chain.to(tl.uint8), mask=cmask)
        if LAYOUT == 2:
            tl.store(x_row_ptr[:, None] + (n + 1 + j)[None, :], chain.to(tl.int64), mask=cmask)

    # 3. label: noiseless parity (= last cot entry), flipped iff the noise word < threshold.
    y = carry
    if HAS_NOISE:
        u, _, _, _ = tl.philox(seed, tl.full((BLOCK_R,), 0xFFFFFFFF, tl.uint32), g_lo, g_hi, s_r)
        y = y ^ (u.to(tl.int64) < threshold).to(tl.int32)
    if LAYOUT == 1:
        tl.store(y_ptr + srow, 1.0 - 2.0 * y.to(tl.float32), mask=rmask)
    else:
        tl.store(y_ptr + srow, y.to(tl.uint8), mask=rmask)
    if LAYOUT == 2:
        tl.store(x_row_ptr + n, tl.full((BLOCK_R,), _SEPARATOR, tl.int64), mask=rmask)


def _config(n: int, k: int) -> dict:
    """Fixed block sizes chosen from n and k (see the module docstring)."""
    block_c = min(triton.next_power_of_2(n), MAX_CHUNK)
    inner = min(block_c, 128)
    block_r = max(TILE // block_c, 1)
    return dict(BLOCK_R=block_r, NC=block_c // inner, INNER=inner,
                KB=min(triton.next_power_of_2(k), MAX_KB), SINGLE_CALL=n <= 128, num_warps=4)


def sparse_parity_triton(seed: int, start: int, count: int, n: int, secret: torch.Tensor,
                         streams: torch.Tensor, threshold: int, layout: str):
    """Triton twin of ``kernels.sparse_parity._reference``: (x, y, cot) with a leading stream axis.

    ``secret``: int64 (k,) and ``streams``: int64 (S,) on the target device; ``threshold``:
    ``int(noise * 2**32)``. Arguments are assumed checked by ``kernels.sparse_parity``.
    """
    device = secret.device
    secret = secret.to(torch.int64).contiguous()
    streams = streams.to(device=device, dtype=torch.int64).contiguous()
    k, num_streams = secret.numel(), streams.numel()
    lay = LAYOUT_IDS[layout]
    x_cols = n + 1 + k if lay == 2 else n
    x_dtype = (torch.uint8, torch.float32, torch.int64)[lay]
    y_dtype = torch.float32 if lay == 1 else torch.uint8
    x = torch.empty((num_streams, count, x_cols), dtype=x_dtype, device=device)
    y = torch.empty((num_streams, count), dtype=y_dtype, device=device)
    cot = torch.empty((num_streams, count, k), dtype=torch.uint8, device=device)
    if count == 0 or num_streams == 0:
        return x, y, cot
    cfg = _config(n, k)
    with torch.cuda.device(device) if device.type == "cuda" else nullcontext():
        for s0 in range(0, num_streams, MAX_GRID_Y):
            s1 = min(s0 + MAX_GRID_Y, num_streams)
            grid = (triton.cdiv(count, cfg["BLOCK_R"]), s1 - s0)
            _sparse_parity_kernel[grid](
                x[s0:s1], y[s0:s1], cot[s0:s1], secret, streams[s0:s1],
                seed, start & 0xFFFFFFFF, start >> 32, count, n, k, x_cols, threshold,
                HAS_NOISE=threshold > 0, LAYOUT=lay, **cfg)
    return x, y, cot

