"""FlashAttention-2-style Triton kernels: forward with online softmax, backward in one pass.

Layout: q, k, v, o, do are (batch, heads, seq, head_dim) with unit stride on head_dim (copied
to that if not; other strides are free); lse and delta are contiguous float32 (batch, heads,
seq). Scores are kept in base 2: ``qk_scale = scale * log2(e)`` turns ``exp(scale * s)`` into
``exp2(qk_scale * s)``, and the log-sum-exp is stored in base 2 as well:
``lse2 = log2 sum_j exp(scale * q.k_j)`` (natural lse = lse2 * ln 2), so the backward rebuilds
P = exp2(qk_scale * s - lse2) with one rounding.

Any seq >= 1: loads are masked on the sequence axis; out-of-range keys get zero probability,
out-of-range queries load zeros (so they add nothing to dK/dV) and are never stored.
Causal attention (square, top-left aligned like SDPA's ``is_causal``) uses two loop stages:
blocks strictly below the diagonal without a mask, then the diagonal blocks with one; the causal
forward runs its query blocks heaviest (most keys) first, as FlashAttention does.

The backward is FlashAttention-2's: after delta = rowsum(dO * O), one program per key block
recomputes S and dP once per query block and makes dV, dK and dQ from them (5 matmuls per step,
against 7 for separate dK/dV and dQ passes), adding its share of dQ into an fp32 buffer with
atomics. The price: dQ's float summation order varies run to run on a GPU (not bitwise
reproducible; the interpreter runs programs in order).
On a GPU the forward is autotuned per sequence length over a per-family list of tile
configurations; the interpreter runs one fixed configuration.
"""
import contextlib
import functools
import math

import torch
import triton
import triton.language as tl

from kernels import dispatch

LOG2E = math.log2(math.e)


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    # fp32 inputs: full precision unless the user allowed TF32 (torch's matmul flag); 16-bit: ignored.
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


# ------------------------------------------------------------------------------------ forward
@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, lo, hi,
               offs_m, offs_n, offs_d, N_CTX, qk_scale,
               BLOCK_N: tl.constexpr, MASK: tl.constexpr, IEEE: tl.constexpr):
    # MASK: 0 = every key in [lo, hi) is valid, 1 = causal diagonal, 2 = sequence tail.
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n
        k_ptrs = k_base + cols[None, :] * stride_kn + offs_d[:, None]  # K^T tile (HEAD_DIM, BLOCK_N)
        v_ptrs = v_base + cols[:, None] * stride_vn + offs_d[None, :]
        if MASK == 0:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        else:
            k = tl.load(k_ptrs, mask=cols[None, :] < N_CTX, other=0.0)
            v = tl.load(v_ptrs, mask=cols[:, None] < N_CTX, other=0.0)
        qk = _dot(q, k, tl.zeros([q.shape[0], BLOCK_N], dtype=tl.float32), IEEE)
        if MASK == 0:
            m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            qk = qk * qk_scale - m_ij[:, None]
        else:
            if MASK == 1:
                keep = offs_m[:, None] >= cols[None, :]  # for real rows this implies cols < N_CTX
            else:
                keep = (cols < N_CTX)[None, :]
            # Every row has a kept key in the first masked block it meets (key start_m*BLOCK_M
            # on the diagonal, key 0 in a lone tail block), so m_ij is finite and no NaN arises.
            qk = tl.where(keep, qk * qk_scale, float("-inf"))
            m_ij = tl.maximum(m_i, tl.max(qk, 1))
            qk = qk - m_ij[:, None]
        p = tl.math.exp2(qk)
        alpha = tl.math.exp2(m_i - m_ij)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], IEEE)
        m_i = m_ij
    return acc, l_i, m_i


@triton.jit
def _attn_fwd(Q, K, V, O, LSE,
              stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
              stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
              H, N_CTX, qk_scale,
              HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              CAUSAL: tl.constexpr, IEEE: tl.constexpr):
    tl.static_assert(BLOCK_M % BLOCK_N == 0)
    if CAUSAL:  # heaviest first: the last query block sees the most keys, so it is scheduled first
        start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    else:
        start_m = tl.program_id(0) * BLOCK_M
    off_bh = tl.program_id(1)
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    q_base = Q + off_b * stride_qb + off_h * stride_qh
    k_base = K + off_b * stride_kb + off_h * stride_kh
    v_base = V + off_b * stride_vb + off_h * stride_vh

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    m_valid = offs_m < N_CTX
    q = tl.load(q_base + offs_m[:, None] * stride_qn + offs_d[None, :], mask=m_valid[:, None], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    if CAUSAL:
        # stage 1: keys left of this row block (all valid, no mask); stage 2: the diagonal blocks.
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn,
                                   0, start_m, offs_m, offs_n, offs_d, N_CTX, qk_scale,
                                   BLOCK_N, 0, IEEE)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn,
                                   start_m, tl.minimum(start_m + BLOCK_M, N_CTX),
                                   offs_m, offs_n, offs_d, N_CTX, qk_scale, BLOCK_N, 1, IEEE)
    else:
        n_full = (N_CTX // BLOCK_N) * BLOCK_N
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn,
                                   0, n_full, offs_m, offs_n, offs_d, N_CTX, qk_scale,
                                   BLOCK_N, 0, IEEE)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn,
                                   n_full, N_CTX, offs_m, offs_n, offs_d, N_CTX, qk_scale,
                                   BLOCK_N, 2, IEEE)
    acc = acc / l_i[:, None]
    tl.store(LSE + off_bh.to(tl.int64) * N_CTX + offs_m, m_i + tl.math.log2(l_i), mask=m_valid)
    o_ptrs = O + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :]
    tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=m_valid[:, None])


# ----------------------------------------------------------------------------------- backward
@triton.jit
def _bwd_preprocess(O, DO, DELTA, stride_ob, stride_oh, stride_on, stride_db, stride_dh, stride_dn,
                    H, N_CTX, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    # delta_i = rowsum(dO * O) = sum_j P_ij dP_ij, the softmax-backward correction term.
    off_bh = tl.program_id(1)
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    mask = offs_m[:, None] < N_CTX
    o = tl.load(O + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :],
                mask=mask, other=0.0)
    do = tl.load(DO + off_b * stride_db + off_h * stride_dh + offs_m[:, None] * stride_dn + offs_d[None, :],
                 mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(DELTA + off_bh.to(tl.int64) * N_CTX + offs_m, delta, mask=offs_m < N_CTX)


@triton.jit
def _bwd_inner(dk, dv, k, v, q_base, do_base, dq_base, lse_base, delta_base, stride_qn, stride_dn,
               lo, hi, offs_n, offs_d, N_CTX, qk_scale, sm_scale,
               BLOCK_M: tl.constexpr, MASK: tl.constexpr, IEEE: tl.constexpr):
    # Transposed tiles (keys x queries), five matmuls per step: S^T = K Q^T, dP^T = V dO^T,
    # dV += P^T dO, dK += dS^T Q, and dQ += dS K, added into the fp32 dQ with atomics.
    # Out-of-range queries load q = dO = delta = 0, so they add nothing to dV (dO = 0) or dK
    # (dS = P (0 - 0) = 0), and their dQ rows are never written. Out-of-range keys get P = 0: a
    # zero-padded key's exp2(-lse2) may overflow, and unlike dK/dV rows, dQ mixes every key.
    key_valid = offs_n[:, None] < N_CTX
    for start_m in range(lo, hi, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_valid = offs_m < N_CTX
        qT = tl.load(q_base + offs_m[None, :] * stride_qn + offs_d[:, None], mask=m_valid[None, :], other=0.0)
        lse2 = tl.load(lse_base + offs_m, mask=m_valid, other=0.0)
        sT = _dot(k, qT, tl.zeros([k.shape[0], BLOCK_M], dtype=tl.float32), IEEE) * qk_scale - lse2[None, :]
        if MASK:
            keep = key_valid & (offs_m[None, :] >= offs_n[:, None])
        else:
            keep = key_valid
        pT = tl.math.exp2(tl.where(keep, sT, float("-inf")))
        do = tl.load(do_base + offs_m[:, None] * stride_dn + offs_d[None, :], mask=m_valid[:, None], other=0.0)
        dv = _dot(pT.to(do.dtype), do, dv, IEEE)
        delta = tl.load(delta_base + offs_m, mask=m_valid, other=0.0)
        dpT = _dot(v, tl.trans(do), tl.zeros([k.shape[0], BLOCK_M], dtype=tl.float32), IEEE)
        dsT = (pT * (dpT - delta[None, :])).to(qT.dtype)
        dk = _dot(dsT, tl.trans(qT), dk, IEEE)
        dq = _dot(tl.trans(dsT), k, tl.zeros([BLOCK_M, k.shape[1]], dtype=tl.float32), IEEE)
        tl.atomic_add(dq_base + offs_m[:, None] * k.shape[1] + offs_d[None, :], dq * sm_scale,
                      mask=m_valid[:, None], sem="relaxed")
    return dk, dv


@triton.jit
def _attn_bwd(Q, K, V, DO, LSE, DELTA, DQ, DK, DV,
              stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
              stride_vb, stride_vh, stride_vn, stride_db, stride_dh, stride_dn,
              H, N_CTX, sm_scale, qk_scale,
              HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              CAUSAL: tl.constexpr, IEEE: tl.constexpr):
    # One program per block of BLOCK_N keys; it walks over the queries in steps of BLOCK_M. Key block
    # 0 sees every query, so in causal attention the first programs are the heaviest already.
    tl.static_assert(BLOCK_N % BLOCK_M == 0)
    start_n = tl.program_id(0) * BLOCK_N
    off_bh = tl.program_id(1)
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    q_base = Q + off_b * stride_qb + off_h * stride_qh
    do_base = DO + off_b * stride_db + off_h * stride_dh
    lse_base = LSE + off_bh.to(tl.int64) * N_CTX
    delta_base = DELTA + off_bh.to(tl.int64) * N_CTX
    dq_base = DQ + off_bh.to(tl.int64) * N_CTX * HEAD_DIM  # dQ, dK, dV: contiguous (batch, heads, seq, head_dim)

    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    n_valid = offs_n[:, None] < N_CTX
    k = tl.load(K + off_b * stride_kb + off_h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :],
                mask=n_valid, other=0.0)
    v = tl.load(V + off_b * stride_vb + off_h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :],
                mask=n_valid, other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    lo = 0
    if CAUSAL:
        # the diagonal query blocks need the mask; queries past start_n + BLOCK_N see every key here
        dk, dv = _bwd_inner(dk, dv, k, v, q_base, do_base, dq_base, lse_base, delta_base, stride_qn, stride_dn,
                            start_n, tl.minimum(start_n + BLOCK_N, N_CTX), offs_n, offs_d, N_CTX,
                            qk_scale, sm_scale, BLOCK_M, True, IEEE)
        lo = start_n + BLOCK_N
    dk, dv = _bwd_inner(dk, dv, k, v, q_base, do_base, dq_base, lse_base, delta_base, stride_qn, stride_dn,
                        lo, N_CTX, offs_n, offs_d, N_CTX, qk_scale, sm_scale, BLOCK_M, False, IEEE)
    # dK = scale * dS^T Q
    out_offs = off_bh.to(tl.int64) * N_CTX * HEAD_DIM + offs_n[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(DK + out_offs, (dk * sm_scale).to(DK.dtype.element_ty), mask=n_valid)
    tl.store(DV + out_offs, dv.to(DV.dtype.element_ty), mask=n_valid)


# ------------------------------------------------------------------------------ block choices
# Forward autotuning candidates, (BLOCK_M, BLOCK_N, num_warps, num_stages), per GPU family (sm_80:
# A100-class, sm_90: H100-class) and head_dim: the configurations that kernels.aot compiles with no
# register spills and within shared memory in every dtype and mode (tests/test_triton_compile.py
# keeps it so; docs/kernels_compiled.md lists registers and shared memory). Left out for spilling or
# sitting at 255 registers: 16-bit 128 x 64 tiles with 4 warps from head_dim 32 (sm_80) / 64 (sm_90)
# on and every 128-row tile at head_dim 128 on sm_80; fp32 (no tensor cores unless TF32) 4-warp
# tiles past 32 x 16 from head_dim 64 on, and everything but 32 x 16 with 8 warps at head_dim 128.
_FWD_16BIT = {
    80: {16: [(128, 64, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (128, 128, 8, 3), (64, 32, 4, 4)],
         32: [(128, 64, 8, 3), (64, 64, 4, 3), (128, 128, 8, 3), (64, 32, 4, 4)],
         64: [(128, 64, 8, 3), (64, 64, 4, 3), (128, 128, 8, 3), (64, 32, 4, 4)],
         128: [(64, 32, 4, 4)]},
    90: {16: [(128, 64, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (128, 128, 8, 3), (64, 32, 4, 4)],
         32: [(128, 64, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (128, 128, 8, 3), (64, 32, 4, 4)],
         64: [(128, 64, 8, 3), (64, 64, 4, 3), (128, 128, 8, 3), (64, 32, 4, 4)],
         128: [(128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 4)]},
}
_FWD_FP32 = {16: [(64, 32, 8, 2), (32, 32, 4, 2), (64, 16, 4, 2), (32, 16, 4, 2)],  # both families
             32: [(64, 32, 8, 2), (32, 32, 4, 2), (64, 16, 4, 2), (32, 16, 4, 2)],
             64: [(64, 32, 8, 2), (32, 16, 4, 2), (32, 16, 8, 2)],
             128: [(32, 16, 8, 2)]}
SMEM_LIMIT = {80: 163 * 1024, 87: 163 * 1024, 90: 227 * 1024, 100: 227 * 1024}  # else 99 KiB (sm_86/89/120)


def _fwd_configs(head_dim: int, dtype: torch.dtype, arch: int | None) -> list[tuple[int, int, int, int]]:
    """Forward (BLOCK_M, BLOCK_N, num_warps, num_stages) candidates; autotuning picks one per shape on a GPU.

    Interpreter: one small tile, so tests are fast yet still cross several blocks. GPU: the list of
    the device's family, less the tiles whose K/V pipeline buffers (an upper bound: ``stages`` K and
    V tiles plus the Q tile) exceed the device's shared memory; the smallest tile always stays.
    """
    if arch is None:
        return [(32, 16, 4, 1)]
    family = 90 if arch >= 90 else 80
    configs = _FWD_FP32[head_dim] if dtype == torch.float32 else _FWD_16BIT[family][head_dim]
    limit, size = SMEM_LIMIT.get(arch, 99 * 1024), dtype.itemsize
    fits = [c for c in configs if (2 * c[3] * c[1] + c[0]) * head_dim * size <= limit]
    return fits or configs[-1:]


@functools.cache
def _fwd_tuner(configs: tuple[tuple[int, int, int, int], ...]):
    """The forward autotuned over ``configs`` (one tuner per candidate list; keyed by sequence length)."""
    return triton.autotune([triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st)
                            for m, n, w, st in configs], key=["N_CTX", "HEAD_DIM", "CAUSAL", "IEEE"])(_attn_fwd)


# Backward (BLOCK_M, BLOCK_N, num_warps, num_stages) per GPU family and head_dim: the largest key
# blocks (fewer dQ atomics) that kernels.aot compiles without spills in every dtype and mode. Before
# Hopper (no wgmma: MMA operands live in registers) the resident k, v, dk, dv need smaller blocks.
# Fixed, not autotuned: trials would have to re-zero the dQ accumulator between runs.
_BWD_16BIT = {80: {16: (32, 64, 4, 3), 32: (16, 128, 8, 3), 64: (16, 64, 8, 3), 128: (16, 32, 8, 3)},
              90: {16: (32, 128, 8, 3), 32: (32, 128, 8, 3), 64: (32, 128, 8, 3), 128: (32, 64, 8, 3)}}
_BWD_FP32 = {16: (16, 64, 4, 2), 32: (16, 64, 8, 2), 64: (16, 32, 8, 2), 128: (16, 32, 8, 2)}  # both families


def _bwd_config(head_dim: int, dtype: torch.dtype, arch: int | None) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for the backward.

    A program keeps a block of BLOCK_N keys (k, v, dk, dv) resident and streams BLOCK_M queries.
    """
    if arch is None:
        return 16, 32, 4, 1
    if dtype == torch.float32:
        return _BWD_FP32[head_dim]
    return _BWD_16BIT[90 if arch >= 90 else 80][head_dim]


def _ieee(dtype: torch.dtype) -> bool:
    return dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32


def _unit_stride(*ts):
    """The kernels take any batch/head/seq strides but need unit stride on head_dim."""
    return tuple(t if t.stride(-1) == 1 else t.contiguous() for t in ts)


def _bhn_strides(t: torch.Tensor):
    assert t.stride(-1) == 1
    return t.stride(0), t.stride(1), t.stride(2)


def _on_device(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def flash_attn_forward(q, k, v, causal: bool, scale: float):
    """Returns (o, lse2): o contiguous, shaped like q; lse2 float32 (batch, heads, seq), base 2."""
    q, k, v = _unit_stride(q, k, v)
    B, H, N, D = q.shape
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, N), dtype=torch.float32, device=q.device)
    arch = dispatch.gpu_arch(q.device)
    configs = _fwd_configs(D, q.dtype, arch)
    args = (q, k, v, o, lse, *_bhn_strides(q), *_bhn_strides(k), *_bhn_strides(v), *_bhn_strides(o),
            H, N, scale * LOG2E)
    meta = dict(HEAD_DIM=D, CAUSAL=causal, IEEE=_ieee(q.dtype))
    with _on_device(q):
        if arch is None:  # the interpreter: one fixed configuration, never autotuned
            block_m, block_n, warps, stages = configs[0]
            _attn_fwd[(triton.cdiv(N, block_m), B * H)](*args, BLOCK_M=block_m, BLOCK_N=block_n, **meta,
                                                         num_warps=warps, num_stages=stages)
        else:
            _fwd_tuner(tuple(configs))[lambda m: (triton.cdiv(N, m["BLOCK_M"]), B * H)](*args, **meta)
    return o, lse


def flash_attn_backward(do, q, k, v, o, lse, causal: bool, scale: float):
    """Returns (dq, dk, dv), contiguous, given dO (any strides) and the forward's o and lse2."""
    do, q, k, v = _unit_stride(do, q, k, v)  # e.g. the stride-0 gradient of out.sum()
    B, H, N, D = q.shape
    dk = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dv = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    delta = torch.empty((B, H, N), dtype=torch.float32, device=q.device)
    arch = dispatch.gpu_arch(q.device)
    block_m, block_n, warps, stages = _bwd_config(D, q.dtype, arch)
    dq32 = torch.zeros(q.shape, dtype=torch.float32, device=q.device)  # dQ is accumulated with atomics
    strides = (*_bhn_strides(q), *_bhn_strides(k), *_bhn_strides(v), *_bhn_strides(do))
    with _on_device(q):
        pre_m = 32 if arch is None else 64
        _bwd_preprocess[(triton.cdiv(N, pre_m), B * H)](
            o, do, delta, *_bhn_strides(o), *_bhn_strides(do), H, N, HEAD_DIM=D, BLOCK_M=pre_m)
        _attn_bwd[(triton.cdiv(N, block_n), B * H)](
            q, k, v, do, lse, delta, dq32, dk, dv, *strides, H, N, scale, scale * LOG2E,
            HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=block_n, CAUSAL=causal, IEEE=_ieee(q.dtype),
            num_warps=warps, num_stages=stages)
    dq = dq32 if q.dtype == torch.float32 else dq32.to(q.dtype)
    return dq, dk, dv
