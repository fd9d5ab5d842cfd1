#!/usr/bin/env bash
# Data parallel over the GPUs of one machine: Lightning starts one process per GPU (DDP, NCCL).
# data.batch_size stays the *global* batch: each of W ranks trains on batch_size / W of it.
#
#   scripts/ddp_single_node.sh experiment=cot_parity                 # every GPU of this machine
#   GPUS=4 scripts/ddp_single_node.sh experiment=parity_mlp seed=3  # four of them
#   GPUS=2 scripts/ddp_single_node.sh trainer.accelerator=cpu       # two CPU processes (gloo)
#
# Continue a run that was stopped: the same command with run_dir=<its directory> resume=auto.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
exec "$PYTHON" train.py trainer=ddp trainer.devices="${GPUS:-auto}" "$@"
