"""Fused Triton kernel for ``kernels.sparse_parity``: bits, noisy label and chain of thought in one pass.

Same stream as the PyTorch reference in ``kernels/sparse_parity.py`` (read its docstring), bit for bit.
One program owns ``BLOCK_R`` rows (samples) of one stream and

1. walks the row in chunks of ``BLOCK_C`` bits: one ``tl.philox`` call per (row, 128-bit chunk)
   gives four uint32 words, ``tl.join``/``tl.reshape`` lay them out as a (rows, words) tile, and a
   ``tl.gather`` + shift expands them to bits, written straight in the requested layout (uint8
   bits, float32 +-1 or int64 tokens);
2. takes the secret bits ``KB`` at a time (bit ``p`` is bit ``p % 32`` of word ``p // 32``): gathered
   from the words of step 1 when one chunk holds the whole row (n <= 512), else recomputed with one
   philox per (row, secret index); the running parity (``tl.cumsum`` + a carry) is the cot;
3. draws the noise word (counter ``c0 = 0xffffffff``) and writes the label.

No intermediate tensor touches memory. Every offset and program-id product is int64, so a
(streams x count x row) output past 2**31 elements is addressed correctly. Counters are always uint32 tensors: ``tl.philox`` with
Python-int or int64 counters silently switches to Philox4x64, a different stream.

Why a gather rather than ``words[:, :, None] >> shifts``: with a broadcast, Triton's layout pass
rematerialises the whole philox chain in the layout of the store, i.e. once per thread that
writes a piece of the row (up to once per output element: ~16x more ``mul.hi`` in the PTX for
n=50); the gather keeps philox in a compact layout and moves the words through shared memory.

Block sizes are fixed, not autotuned: the kernel is a streaming write, and a tile of ~4K outputs
per program is enough to keep stores in flight; rows are cut into chunks of at most 512 bits so
registers stay flat for any n, and ``BLOCK_R = 4096 // BLOCK_C`` (at most 256) rows keep the tile
size constant (n=50: 64 rows x 64 bits; n=4096: 8 rows x 512 bits, 8 chunks). 4 warps; 8 once rows
take several chunks (with 4, the chunk loop reaches 255 registers and spills on sm_90).
Needs triton >= 3.2 (``tl.gather``); ``tests/test_triton_compile.py`` compiles it for sm_80 and sm_90
(no spills, 16-byte stores, no 32-bit pointer offset) with the installed Triton.
"""
from contextlib import nullcontext

import torch
import triton
import triton.language as tl

from kernels.tokens import SEPARATOR

LAYOUT_IDS = {"bits": 0, "pm1": 1, "tokens": 2}
TILE = 4096  # elements per program tile (rows x bits)
MAX_CHUNK = 512  # bits per row per loop iteration
MAX_ROWS = 256  # rows per program (tiny n)
MAX_KB = 32  # secret indices per loop iteration
SECRET_TILE = 512  # philox calls per secret step (rows x KB): ~4 per thread, no register spills
MAX_GRID_Y = 65535  # CUDA limit on grid axis 1 (streams)
_SEPARATOR = tl.constexpr(SEPARATOR)


@triton.jit
def _select_word(w0, w1, w2, w3, sel):
    """Word ``sel`` (0..3, broadcastable) of a philox result."""
    return tl.where(sel == 0, w0, tl.where(sel == 1, w1, tl.where(sel == 2, w2, w3)))


@triton.jit
def _words(seed, call, g_lo, g_hi, s, BLOCK_R: tl.constexpr, NW: tl.constexpr):
    """Philox words (R, NW) of calls ``call`` (R, NW // 4): word 4 * c + i is output i of call c."""
    w0, w1, w2, w3 = tl.philox(seed, call, g_lo, g_hi, s)
    return tl.reshape(tl.join(tl.join(w0, w2), tl.join(w1, w3)), (BLOCK_R, NW))


@triton.jit
def _bits_at(words, pos):
    """Bits at columns ``pos`` (R, C) of rows whose words (R, NW) cover them: bit p = bit p%32 of word p//32."""
    word = tl.gather(words, pos // 32, axis=1)
    return (word >> (pos % 32).to(tl.uint32)) & 1


@triton.jit
def _store_x(ptrs, mask, bits, LAYOUT: tl.constexpr):
    if LAYOUT == 0:
        tl.store(ptrs, bits.to(tl.uint8), mask=mask)
    elif LAYOUT == 1:
        tl.store(ptrs, 1.0 - 2.0 * bits.to(tl.float32), mask=mask)
    else:
        tl.store(ptrs, bits.to(tl.int64), mask=mask)


@triton.jit
def _store_run(x_ptr, run_start, run_end, rmask, words,
               BLOCK_C: tl.constexpr, VEC: tl.constexpr, EDGES: tl.constexpr, LAYOUT: tl.constexpr):
    """x[run_start:run_end) of each row (int64 element offsets (R,), run_start = column 0 of ``words``).

    The body is stored in whole VEC-element (16-byte) chunks at VEC-aligned offsets, so the stores
    vectorize whatever the row length; the < VEC elements before the first and after the last whole
    chunk (only when rows are not VEC-aligned: ``EDGES``) go in a second, masked store.
    """
    a0 = (run_start // VEC) * VEC  # the chunk holding run_start; in-tile positions u count from it
    lo = (run_start - a0).to(tl.int32)[:, None]  # the run is u in [lo, hi)
    hi = lo + (run_end - run_start).to(tl.int32)[:, None]
    first = ((lo + VEC - 1) // VEC) * VEC  # first whole chunk
    last = (hi // VEC) * VEC  # end of the last whole chunk
    u = tl.arange(0, BLOCK_C)[None, :]
    chunk = (u // VEC) * VEC
    body = rmask[:, None] & (chunk >= first) & (chunk < last)
    col = tl.minimum(tl.maximum(u - lo, 0), BLOCK_C - 1)
    _store_x(x_ptr + (a0[:, None] + u), body, _bits_at(words, col), LAYOUT)
    if EDGES:
        e = tl.arange(0, 2 * VEC)[None, :]
        u = tl.where(e < VEC, e, last + (e - VEC))  # head chunk, tail chunk
        edge = rmask[:, None] & (u >= lo) & (u < hi) & ((u < first) | (u >= last))
        col = tl.minimum(tl.maximum(u - lo, 0), BLOCK_C - 1)
        _store_x(x_ptr + (a0[:, None] + u), edge, _bits_at(words, col), LAYOUT)


@triton.jit
def _sparse_parity_kernel(
    x_ptr, y_ptr, cot_ptr, secret_ptr, streams_ptr,
    seed, start_lo, start_hi, count, n, k, x_stride, threshold,
    BLOCK_R: tl.constexpr, NC: tl.constexpr, INNER: tl.constexpr, KB: tl.constexpr,
    ONE_CHUNK: tl.constexpr, HAS_NOISE: tl.constexpr, LAYOUT: tl.constexpr,
    VEC: tl.constexpr, EDGES: tl.constexpr,
):
    # Every offset is int64: (stream, row) planes can exceed 2**31 elements.
    BLOCK_C: tl.constexpr = NC * INNER
    NW: tl.constexpr = NC * 4
    pid_r = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1).to(tl.int64)

    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < count
    # 64-bit sample index g = start + row, split into uint32 words with carry.
    g = rows + start_lo
    g_lo = g.to(tl.uint32)
    g_hi = (start_hi + (g >> 32)).to(tl.uint32)
    s = tl.load(streams_ptr + pid_s).to(tl.uint32)
    zero = tl.zeros((BLOCK_R,), dtype=tl.uint32)
    s_r = s + zero

    srow = pid_s * count + rows  # row index into the (S, count) planes
    row_start = srow * x_stride
    cot_row = srow * k

    # 1. x: one philox call per (row, 128 bits), expanded to bits by a gather + shift.
    zero_w = tl.zeros((BLOCK_R, NC), dtype=tl.uint32)
    lo_w = g_lo[:, None] + zero_w
    hi_w = g_hi[:, None] + zero_w
    s_w = s_r[:, None] + zero_w
    if ONE_CHUNK:  # n <= BLOCK_C: one tile holds the whole row; its words also serve the secret.
        row_call = tl.arange(0, NC).to(tl.uint32)[None, :] + zero_w
        words0 = _words(seed, row_call, lo_w, hi_w, s_w, BLOCK_R, NW)
        _store_run(x_ptr, row_start, row_start + n, rmask, words0, BLOCK_C, VEC, EDGES, LAYOUT)
    else:
        for col0 in range(0, n, BLOCK_C):
            xcall = (col0 // 128 + tl.arange(0, NC)).to(tl.uint32)[None, :] + zero_w
            xwords = _words(seed, xcall, lo_w, hi_w, s_w, BLOCK_R, NW)
            _store_run(x_ptr, row_start + col0, row_start + tl.minimum(col0 + BLOCK_C, n), rmask, xwords,
                       BLOCK_C, VEC, EDGES, LAYOUT)

    # 2. chain of thought: prefix parities over the secret, KB indices at a time.
    zero_k = tl.zeros((BLOCK_R, KB), dtype=tl.uint32)
    zero_ki = tl.zeros((BLOCK_R, KB), dtype=tl.int32)
    lo_k = g_lo[:, None] + zero_k
    hi_k = g_hi[:, None] + zero_k
    s_k = s_r[:, None] + zero_k
    carry = tl.zeros((BLOCK_R,), dtype=tl.int32)
    for j0 in range(0, k, KB):
        j = (j0 + tl.arange(0, KB)).to(tl.int64)
        jmask = j < k
        pos = tl.load(secret_ptr + j, mask=jmask, other=0).to(tl.int32)[None, :]
        if ONE_CHUNK:
            sbits = _bits_at(words0, pos + zero_ki)
        else:
            scall = (pos // 128).to(tl.uint32) + zero_k
            v0, v1, v2, v3 = tl.philox(seed, scall, lo_k, hi_k, s_k)
            word = _select_word(v0, v1, v2, v3, (pos // 32) % 4)
            sbits = (word >> (pos % 32).to(tl.uint32)) & 1
        sbits = tl.where(jmask[None, :], sbits.to(tl.int32), 0)
        chain = (tl.cumsum(sbits, axis=1) + carry[:, None]) & 1
        carry = (carry + tl.sum(sbits, axis=1)) & 1
        cmask = rmask[:, None] & jmask[None, :]
        tl.store(cot_ptr + (cot_row[:, None] + j[None, :]), chain.to(tl.uint8), mask=cmask)
        if LAYOUT == 2:
            tl.store(x_ptr + (row_start[:, None] + (n + 1 + j)[None, :]), chain.to(tl.int64), mask=cmask)

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
        tl.store(x_ptr + (row_start + n), tl.full((BLOCK_R,), _SEPARATOR, tl.int64), mask=rmask)


def _config(n: int, k: int, layout: int) -> dict:
    """Fixed block sizes chosen from n, k and the layout (see the module docstring)."""
    block_c = min(triton.next_power_of_2(n), MAX_CHUNK)
    inner = min(block_c, 128)
    block_r = min(TILE // block_c, MAX_ROWS)
    kb = max(min(triton.next_power_of_2(k), MAX_KB, SECRET_TILE // block_r), 2)  # >= 2: no size-1 scan
    vec = 16 // (1, 4, 8)[layout]  # x elements per 16 bytes
    x_cols = n + 1 + k if layout == 2 else n
    return dict(BLOCK_R=block_r, NC=block_c // inner, INNER=inner, KB=kb, ONE_CHUNK=n <= block_c,
                VEC=vec, EDGES=n % vec != 0 or x_cols % vec != 0, num_warps=4 if n <= block_c else 8)


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
    cfg = _config(n, k, lay)
    with torch.cuda.device(device) if device.type == "cuda" else nullcontext():
        for s0 in range(0, num_streams, MAX_GRID_Y):
            s1 = min(s0 + MAX_GRID_Y, num_streams)
            grid = (triton.cdiv(count, cfg["BLOCK_R"]), s1 - s0)
            _sparse_parity_kernel[grid](
                x[s0:s1], y[s0:s1], cot[s0:s1], secret, streams[s0:s1],
                seed, start & 0xFFFFFFFF, start >> 32, count, n, k, x_cols, threshold,
                HAS_NOISE=threshold > 0, LAYOUT=lay, **cfg)
    return x, y, cot

