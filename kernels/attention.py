"""Scaled dot-product attention: the FlashAttention-2 Triton kernels behind the one dispatch rule.

``attention(q, k, v)`` is ``torch.nn.functional.scaled_dot_product_attention`` for
(batch, heads, seq, head_dim) inputs. The Triton path is a pair of PyTorch custom ops,
``paritylab::flash_attn_fwd`` (returns o and the log-sum-exp) and ``paritylab::flash_attn_bwd``,
with fake (meta) implementations and an autograd formula, so ``torch.compile(fullgraph=True)``
treats the kernel as one opaque node. The reference path is SDPA itself.

Which kernel ``backend="auto"`` runs on a GPU is the dispatch table ``TRITON_FASTER``: keys
``(arch, dtype, head_dim)`` (arch = 10 * major + minor compute capability, dtype "fp32"/"fp16"/
"bf16"), values the half-open sequence-length ranges ``(lo, hi)`` where the Triton kernel was measured
faster than SDPA (forward + backward, ``python -m benchmarks.attention``). Inside a listed range auto
runs Triton; anywhere else, unmeasured included, SDPA. Nothing is measured yet, so the table is
empty and auto means SDPA on every GPU; ``backend="triton"`` always runs the Triton kernel (on a
CPU through the interpreter, as the tests do).
"""
import os

import torch
import torch.nn.functional as F

from kernels.dispatch import gpu_arch, resolve_backend, warn_once

HEAD_DIMS = (16, 32, 64, 128)
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
TRITON_FASTER: dict[tuple[int, str, int], tuple[tuple[int, int], ...]] = {}  # see the module docstring


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
              scale: float | None = None, backend: str = "auto") -> torch.Tensor:
    """softmax(scale * q k^T [+ causal mask]) v, differentiable; scale defaults to head_dim ** -0.5.

    ``causal=True`` masks key j > query i (top-left aligned, as SDPA's ``is_causal``).
    The Triton kernels take q, k, v of one shape (batch, heads, seq >= 1, head_dim in
    16/32/64/128) and one dtype (fp32/fp16/bf16; no bf16 under the CPU interpreter); anything
    else runs SDPA, with one logged warning per kind of reason. On a GPU, ``backend="auto"`` runs
    the Triton kernel only where ``TRITON_FASTER`` lists the shape (see the module docstring).
    """
    if resolve_backend(backend, q.device, "attention") == "triton" and (backend == "triton" or _faster(q)):
        reason = _unsupported(q, k, v)
        if reason is None:
            scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
            return torch.ops.paritylab.flash_attn_fwd(q, k, v, bool(causal), scale)[0]
        if not torch.compiler.is_compiling():  # dynamo can't trace logging; the eager call warns
            topic, why = reason.split(": ", 1)
            warn_once(f"attention:{topic}", f"attention: {why}; falling back to scaled_dot_product_attention")
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)


def _faster(q: torch.Tensor) -> bool:
    """True where the dispatch table says the Triton kernel beats SDPA for q's arch, dtype, head_dim, seq."""
    if not TRITON_FASTER or q.dim() != 4:
        return False
    ranges = TRITON_FASTER.get((gpu_arch(q.device), DTYPE_NAMES.get(q.dtype), q.shape[-1]), ())
    return any(lo <= q.shape[-2] < hi for lo, hi in ranges)


def _unsupported(q, k, v) -> str | None:
    """'topic: why' the Triton kernels can't take these inputs, or None; one warning per topic."""
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        return (f"shapes: the Triton kernel needs q, k, v of one (batch, heads, seq, head_dim) shape, "
                f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.numel() == 0:
        return "empty: empty inputs"
    if q.shape[-1] not in HEAD_DIMS:
        return f"head_dim: head_dim {q.shape[-1]} is not one of {HEAD_DIMS}"
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"dtype: dtypes {q.dtype}, {k.dtype}, {v.dtype} (need one of fp32/fp16/bf16, all the same)"
    if k.device != q.device or v.device != q.device:
        return "device: q, k, v on different devices"
    if q.device.type == "cuda" and q.shape[0] * q.shape[1] > 65535:
        return "grid: batch * heads > 65535 (the kernels' CUDA grid y limit)"
    if q.dtype == torch.bfloat16 and (q.device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1"):
        return "bf16: bf16 under the Triton interpreter (its bf16 tl.dot is wrong)"
    return None


# ---------------------------------------------------------------------------- custom ops
@torch.library.custom_op("paritylab::flash_attn_fwd", mutates_args=())
def flash_attn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                   scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(o, lse2): o contiguous like q; lse2 = log2(sum_j exp(scale q.k_j)), float32 (batch, heads, seq)."""
    from kernels.attention_triton import flash_attn_forward
    return flash_attn_forward(q, k, v, causal, scale)


@flash_attn_fwd.register_fake
def _(q, k, v, causal, scale):
    return q.new_empty(q.shape), q.new_empty(q.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("paritylab::flash_attn_bwd", mutates_args=())
def flash_attn_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   o: torch.Tensor, lse: torch.Tensor, causal: bool,
                   scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv), contiguous; ``do`` may have any strides."""
    from kernels.attention_triton import flash_attn_backward
    return flash_attn_backward(do, q, k, v, o, lse, causal, scale)


@flash_attn_bwd.register_fake
def _(do, q, k, v, o, lse, causal, scale):
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, causal, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.causal, ctx.scale = causal, scale


def _backward(ctx, do, dlse):
    # lse is an auxiliary output for the backward; attention() never exposes it, so dlse is ignored.
    q, k, v, o, lse = ctx.saved_tensors
    if do.stride(-1) != 1:  # e.g. the expanded (stride-0) gradient of out.sum()
        do = do.contiguous()
    dq, dk, dv = flash_attn_bwd(do, q, k, v, o, lse, ctx.causal, ctx.scale)
    return dq, dk, dv, None, None


flash_attn_fwd.register_autograd(_backward, setup_context=_setup_context)
