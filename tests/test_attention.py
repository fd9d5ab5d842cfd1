"""kernels.attention: the Triton FlashAttention kernels against a float64 reference.

CPU tests run the kernels under the Triton interpreter. Tolerances follow FlashAttention's
tests: the kernel's max abs error against float64 may be at most 2x (forward) / 3x (backward)
the error of PyTorch's own attention in the same dtype (explicit softmax attention), plus 8
fp32 ulps of the tensor's scale. Where the exact gradient is 0 (seq 1, causal row 0: dS =
P (dP - rowsum(P dP)) cancels) PyTorch's error is often exactly 0 too, so there the kernel's
fp32-accumulation noise is bounded by an absolute ZERO_ATOL instead.
GPU tests (``-m gpu``) need compiled Triton, so they skip if TRITON_INTERPRET=1.
"""
import math
import os

import torch

# Before triton is imported (importing torch does not import it). Only without CUDA, as in
# conftest.py: on a GPU machine the interpreter would take over every Triton kernel of the run.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib  # noqa: E402
import logging  # noqa: E402

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import kernels.dispatch as dispatch  # noqa: E402
from kernels.attention import attention  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
interp = pytest.mark.skipif(not INTERPRET, reason="CPU kernel tests need TRITON_INTERPRET=1")


def gpu(fn):
    """Marks a GPU test: ``-m gpu`` selects it; it skips without CUDA or under the interpreter."""
    fn = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")(fn)
    fn = pytest.mark.skipif(INTERPRET, reason="GPU tests need compiled Triton (TRITON_INTERPRET=0)")(fn)
    return pytest.mark.gpu(fn)


ZERO_ATOL = 1e-5
EPS32 = torch.finfo(torch.float32).eps


def _inputs(b, h, n, d, dtype, device="cpu", seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    q, k, v, do = (torch.randn(b, h, n, d, generator=g).to(device=device, dtype=dtype) for _ in range(4))
    return q, k, v, do


def _explicit(q, k, v, causal, scale):
    """softmax(scale q k^T) v in the inputs' dtype, as plain PyTorch ops."""
    s = (q @ k.transpose(-1, -2)) * scale
    if causal:
        n = q.shape[-2]
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return torch.softmax(s, dim=-1) @ v


def _fwd_bwd(fn, q, k, v, do):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    o = fn(q, k, v)
    return (o, *torch.autograd.grad(o, (q, k, v), do))


def _max_err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def _check(n, d, causal, dtype, *, b=1, h=2, scale=None, device="cpu", prep=None, do_fn=None, dq_floor=0.0):
    q, k, v, do = _inputs(b, h, n, d, dtype, device)
    if prep is not None:
        q, k, v = prep(q, k, v)
    do_kernel = do if do_fn is None else do_fn(do)
    s = d ** -0.5 if scale is None else scale
    ref = _fwd_bwd(lambda *x: _explicit(*(t.double() for t in x), causal, s), q, k, v, do.double())
    pt = _fwd_bwd(lambda *x: _explicit(*x, causal, s), q, k, v, do)
    out = _fwd_bwd(lambda *x: attention(*x, causal=causal, scale=scale, backend="triton"), q, k, v, do_kernel)
    for name, got, base, want, factor in zip(("out", "dq", "dk", "dv"), out, pt, ref, (2, 3, 3, 3)):
        assert got.dtype == dtype and got.shape == want.shape
        zero = want == 0
        err, base_err = _max_err(got[~zero], want[~zero]), _max_err(base[~zero], want[~zero])
        tol = factor * base_err + 8 * EPS32 * want.abs().max().item() + (dq_floor if name == "dq" else 0.0)
        where = f"{name} (n={n}, d={d}, causal={causal}, {dtype})"
        assert err <= tol, f"{where}: kernel err {err:.3g} > {factor} x torch err {base_err:.3g} + floor"
        assert _max_err(got[zero], want[zero]) <= ZERO_ATOL, f"{where}: error where the exact value is 0"


# ------------------------------------------------------------------ CPU, Triton interpreter
SEQS = (1, 7, 64, 100, 130)


@interp
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("d", [16, 32, 64])
@pytest.mark.parametrize("n", SEQS)
def test_fp32(n, d, causal):
    _check(n, d, causal, torch.float32)


# fp16: every seq, head_dim and mode, but not the whole product (the interpreter is slow)
FP16_CASES = [(n, d, causal) for i, n in enumerate(SEQS) for j, causal in enumerate((False, True))
              for d in ((16, 32, 64)[(i + j) % 3], (16, 32, 64)[(i + j + 1) % 3])]


@interp
@pytest.mark.parametrize("n, d, causal", FP16_CASES)
def test_fp16(n, d, causal):
    _check(n, d, causal, torch.float16)


@interp
@pytest.mark.parametrize("causal", [False, True])
def test_head_dim_128_batch_scale_and_strided_inputs(causal):
    # q, k, v as views of one (batch, seq, 3, heads, head_dim) projection, as in a transformer
    def from_qkv(t):
        b, h, n, d = t.shape
        qkv = torch.zeros(b, n, 3, h, d, dtype=t.dtype)
        qkv[:, :, 1] = t.transpose(1, 2)
        return qkv[:, :, 1].transpose(1, 2)
    _check(37, 128, causal, torch.float32, b=2, h=3, scale=0.3, prep=lambda *t: [from_qkv(x) for x in t])


@interp
@pytest.mark.parametrize("causal", [False, True])
# the dK/dV pass may overflow in rows of padded keys, which it never stores; numpy says so
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning",
                            "ignore:invalid value encountered:RuntimeWarning")
def test_very_negative_scores_stay_finite(causal):
    # Every score is about -150, so exp(score - lse) of a zero-padded tail key would be inf:
    # the kernels must mask such keys rather than rely on k = v = 0 there.
    # dq = s sum_j P_ij (dP_ij - D_i) k_j with D_i = rowsum(dO * O): the kernel's D (from its own O) differs
    # from autograd's by rounding, and with every k near -6 that difference is not cancelled: allow s max|k| dD.
    q, k, v, do = _inputs(1, 2, 37, 16, torch.float32)
    d_rounding = EPS32 * math.sqrt(37 * 16) * do.abs().max().item() * v.abs().max().item()
    dq_floor = 2 * 16 ** -0.5 * (k * 0.1 - 6.0).abs().max().item() * d_rounding
    _check(37, 16, causal, torch.float32, prep=lambda q, k, v: (q * 0.1 + 6.0, k * 0.1 - 6.0, v), dq_floor=dq_floor)


def _transposed(t):  # same values, stride(-1) != 1
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_noncontiguous_incoming_gradient(dtype):
    # dO (and q, k, v) with a non-unit stride on head_dim, and the stride-0 gradient of out.sum()
    _check(50, 32, True, dtype, do_fn=_transposed, prep=lambda *t: [_transposed(x) for x in t])
    q, k, v, _ = _inputs(1, 2, 50, 32, dtype)
    got = _fwd_bwd(lambda *x: attention(*x, backend="triton").sum(), q, k, v, torch.tensor(1.0, dtype=dtype))
    ref = _fwd_bwd(lambda *x: attention(*x, backend="torch").double().sum(), q, k, v, torch.tensor(1.0).double())
    for g, r in zip(got[1:], ref[1:]):
        torch.testing.assert_close(g, r, atol=2e-2 if dtype == torch.float16 else 1e-5, rtol=1e-2)


@interp
def test_fallback_warns_once_and_matches_sdpa(caplog):
    for key in [k for k in dispatch._warned if k.startswith("attention:")]:
        dispatch._warned.discard(key)
    q, k, v, do = _inputs(1, 2, 9, 24, torch.float32)  # head_dim 24: not a kernel size
    with caplog.at_level(logging.WARNING, logger="paritylab.kernels"):
        got = _fwd_bwd(lambda *x: attention(*x, backend="triton"), q, k, v, do)
        got = _fwd_bwd(lambda *x: attention(*x, backend="triton"), q, k, v, do)
    ours = [r.getMessage() for r in caplog.records if r.name == "paritylab.kernels"]
    assert len(ours) == 1 and "head_dim 24" in ours[0], ours
    want = _fwd_bwd(lambda *x: F.scaled_dot_product_attention(*x, is_causal=True), q, k, v, do)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    # bf16 is not run by the interpreter either: same fallback, same result as SDPA
    qb, kb, vb = (t.bfloat16() for t in (q[..., :16], k[..., :16], v[..., :16]))
    torch.testing.assert_close(attention(qb, kb, vb, backend="triton"),
                               F.scaled_dot_product_attention(qb, kb, vb, is_causal=True))


def test_torch_and_auto_backends_on_cpu_are_sdpa():
    q, k, v, _ = _inputs(2, 2, 33, 16, torch.float32)
    for causal in (False, True):
        want = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        assert torch.equal(attention(q, k, v, causal=causal, backend="torch"), want)
        assert torch.equal(attention(q, k, v, causal=causal, backend="auto"), want)
    with pytest.raises(ValueError):
        attention(q, k, v, backend="cuda")


def test_dispatch_table_picks_triton_only_where_measured_faster(monkeypatch):
    attn = importlib.import_module("kernels.attention")  # the module: kernels.attention is also the function
    def q(n, d=64, dtype=torch.float16):
        return torch.empty(2, 3, n, d, dtype=dtype, device="meta")
    monkeypatch.setattr(attn, "gpu_arch", lambda device: 90)
    assert not attn._faster(q(100))  # nothing measured: SDPA
    monkeypatch.setattr(attn, "TRITON_FASTER", {(90, "fp16", 64): ((64, 512), (2048, 4096))})
    assert attn._faster(q(100)) and attn._faster(q(64)) and attn._faster(q(3000))
    assert not attn._faster(q(63)) and not attn._faster(q(512)) and not attn._faster(q(4096))
    assert not attn._faster(q(100, dtype=torch.float32)) and not attn._faster(q(100, d=32))
    monkeypatch.setattr(attn, "gpu_arch", lambda device: 80)
    assert not attn._faster(q(100))


@interp
def test_opcheck():
    q, k, v, do = _inputs(1, 2, 19, 16, torch.float32)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    torch.library.opcheck(torch.ops.paritylab.flash_attn_fwd.default, (q, k, v, True, 0.25))
    torch.library.opcheck(torch.ops.paritylab.flash_attn_fwd.default, (q, k, v, False, 0.25))
    o, lse = torch.ops.paritylab.flash_attn_fwd(q.detach(), k.detach(), v.detach(), True, 0.25)
    torch.library.opcheck(torch.ops.paritylab.flash_attn_bwd.default,
                          (do, q.detach(), k.detach(), v.detach(), o, lse, True, 0.25))


class _TinyBlock(torch.nn.Module):
    def __init__(self, dim=32, heads=2, backend="auto"):
        super().__init__()
        self.heads, self.backend = heads, backend
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.proj = torch.nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).unbind(2)
        y = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), backend=self.backend)
        return self.proj(y.transpose(1, 2).reshape(b, n, c))


def _compile_matches_eager(backend, device, dtype=torch.float32, compiler="aot_eager", atol=1e-5):
    torch.manual_seed(0)
    model = _TinyBlock(backend=backend).to(device=device, dtype=dtype)
    x = torch.randn(2, 21, 32, device=device, dtype=dtype)
    eager = model(x)
    eager.square().mean().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=compiler)
    got = compiled(x)
    got.square().mean().backward()
    torch.testing.assert_close(got, eager, atol=atol, rtol=1e-3)
    for p, g in zip(model.parameters(), grads):
        torch.testing.assert_close(p.grad, g, atol=atol, rtol=1e-3)


def test_compile_fullgraph_torch_backend():
    _compile_matches_eager("torch", "cpu")


@interp
def test_compile_fullgraph_triton_interpreter():
    # The custom op is opaque to dynamo: it traces through its fake implementation.
    _compile_matches_eager("triton", "cpu")
    # dynamic sequence length; and an unsupported head_dim falls back inside the graph too
    f = torch.compile(lambda q: attention(q, q * 2, q, backend="triton"), fullgraph=True,
                      backend="aot_eager", dynamic=True)
    for n, d in ((9, 16), (23, 16), (9, 24)):
        q = torch.randn(1, 2, n, d)
        torch.testing.assert_close(f(q), F.scaled_dot_product_attention(q, q * 2, q, is_causal=True))


# ----------------------------------------------------------------------------- GPU (compiled)
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("d", [16, 32, 64, 128])
@pytest.mark.parametrize("n", [1, 100, 257, 1000, 2048])
def test_gpu_against_float64(n, d, causal, dtype):
    _check(n, d, causal, dtype, b=2, h=3, device="cuda")


@gpu
def test_gpu_auto_is_sdpa_where_unmeasured():
    q, k, v, _ = _inputs(2, 3, 257, 64, torch.float16, device="cuda")
    assert torch.equal(attention(q, k, v, backend="auto"), F.scaled_dot_product_attention(q, k, v, is_causal=True))


@gpu
def test_gpu_strided_inputs_and_gradient():
    def from_qkv(t):
        b, h, n, d = t.shape
        qkv = torch.zeros(b, n, 3, h, d, dtype=t.dtype, device=t.device)
        qkv[:, :, 0] = t.transpose(1, 2)
        return qkv[:, :, 0].transpose(1, 2)
    _check(777, 64, True, torch.bfloat16, b=2, h=4, prep=lambda *t: [from_qkv(x) for x in t],
           do_fn=_transposed, device="cuda")


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_compile_fullgraph_inductor(dtype):
    _compile_matches_eager("triton", "cuda", dtype, compiler="inductor",
                           atol=2e-2 if dtype == torch.bfloat16 else 1e-4)
