"""The one dispatch rule: Triton for CUDA tensors, the PyTorch reference otherwise."""
import logging
import os

import torch

log = logging.getLogger("paritylab.kernels")
BACKENDS = ("auto", "triton", "torch")
_warned: set[str] = set()


def warn_once(key: str, message: str) -> None:
    """Log ``message`` once per process for each ``key``."""
    if key not in _warned:
        _warned.add(key)
        log.warning(message)


def resolve_backend(backend: str, device: torch.device, op: str) -> str:
    """'triton' or 'torch' for running ``op`` on ``device``, by the rule in docs/design.md (3)."""
    if backend not in BACKENDS:
        raise ValueError(f"kernels.backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    if device.type == "cuda":
        return "triton"
    if backend == "triton":
        if os.environ.get("TRITON_INTERPRET") == "1":
            return "triton"
        warn_once(f"{op}-interp", f"{op}: backend='triton' on {device.type} needs TRITON_INTERPRET=1 "
                                  "set before triton is imported; using the PyTorch reference")
    return "torch"


def gpu_arch(device: torch.device) -> int | None:
    """Compute capability of a CUDA device as 10 * major + minor (80, 90, ...); None elsewhere."""
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor
