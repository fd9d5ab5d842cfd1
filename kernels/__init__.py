"""Triton kernels with bit-exact PyTorch references, behind one dispatch rule."""
from kernels.attention import attention
from kernels.philox import philox4x32
from kernels.sparse_parity import sparse_parity

__all__ = ["attention", "philox4x32", "sparse_parity"]
