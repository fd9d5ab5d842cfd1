#!/bin/sh
# Install PyTorch into the environment of $1 (a pip): CUDA wheels where `nvidia-smi` sees a GPU,
# CPU wheels elsewhere, so a laptop or CI box never downloads gigabytes of CUDA libraries.
# TORCH=cpu|cuda overrides the detection; TORCH_CPU_VERSION picks the CPU release tried first.
set -eu
PIP=$1
MODE=${TORCH:-auto}
CPU_VERSION=${TORCH_CPU_VERSION:-2.13.0}
if [ "$MODE" = auto ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then MODE=cuda; else MODE=cpu; fi
fi
case "$MODE" in
  cuda)  # PyPI's Linux wheels of torch are CUDA builds and bring a matching triton
    echo "install_torch: CUDA build from PyPI"
    "$PIP" install "torch>=2.4" ;;
  cpu)
    if [ "$(uname -s)" != Linux ]; then
      "$PIP" install "torch>=2.4"  # macOS and Windows wheels on PyPI are CPU builds already
    elif "$PIP" install "torch==${CPU_VERSION}+cpu" >/dev/null 2>&1; then  # a local wheel cache or mirror
      echo "install_torch: torch ${CPU_VERSION}+cpu"
    else
      echo "install_torch: CPU build from the PyTorch CPU index"
      "$PIP" install torch --index-url https://download.pytorch.org/whl/cpu --extra-index-url https://pypi.org/simple
    fi ;;
  *) echo "install_torch: TORCH must be auto, cpu or cuda, got '$MODE'" >&2; exit 2 ;;
esac
