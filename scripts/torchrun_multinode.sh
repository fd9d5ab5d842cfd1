#!/usr/bin/env bash
# Multi-node DDP with torchrun. Run the same command on every node; only NODE_RANK differs.
#
#   # on node0 (10.0.0.1) and node1:
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 RUN_ID=cot-seed0 scripts/torchrun_multinode.sh experiment=cot_parity
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 RUN_ID=cot-seed0 scripts/torchrun_multinode.sh experiment=cot_parity
#
# RUN_ID (torchrun's --rdzv-id) names the run directory, runs/<experiment>/torchrun-<RUN_ID>, alike on
# every rank; the repository and runs/ must be on a file system all nodes share (only rank 0 writes,
# every rank reads the checkpoint it resumes). Running the same commands again continues the run from
# its last checkpoint (resume=auto). GPUS_PER_NODE defaults to the GPUs nvidia-smi lists; for CPU nodes
# set GPUS_PER_NODE=<processes> and add trainer.accelerator=cpu.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${NNODES:?set NNODES}" "${NODE_RANK:?set NODE_RANK}" "${MASTER_ADDR:?set MASTER_ADDR}" "${RUN_ID:?set RUN_ID}"
PYTHON=${PYTHON:-.venv/bin/python}
GPUS_PER_NODE=${GPUS_PER_NODE:-$(nvidia-smi -L | wc -l)}
exec "$PYTHON" -m torch.distributed.run --nnodes="$NNODES" --nproc_per_node="$GPUS_PER_NODE" \
  --node_rank="$NODE_RANK" --master_addr="$MASTER_ADDR" --master_port="${MASTER_PORT:-29500}" --rdzv_id="$RUN_ID" \
  train.py trainer=ddp trainer.num_nodes="$NNODES" trainer.devices="$GPUS_PER_NODE" trainer.progress_bar=false \
  resume=auto "$@"
