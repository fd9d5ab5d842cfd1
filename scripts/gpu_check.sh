#!/usr/bin/env bash
# The GPU checks on one CUDA machine, in at most 8 minutes: the gpu-marked tests, then short runs of the three
# benchmarks (train throughput at ensembles 1, 64 and 1024 against the plain PyTorch loop; data generation;
# attention). Each step has its own time limit; a failed step is recorded and the next one runs. Writes
# benchmarks/results/gpu_check_<device>_<versions>*.json and ends with one summary line.
#
#   scripts/gpu_check.sh                    # with `python` on the PATH
#   PYTHON=/path/to/python scripts/gpu_check.sh
#
# It installs nothing but missing pure-Python packages (omegaconf, pytest) from device_wheels/ (pip
# --no-index: torch, triton and lightning stay as the machine has them); it never runs `make setup`.
# Exit status: 0 all steps passed, 1 some failed, 2 no CUDA device (nothing run).
set -u
cd "$(dirname "$0")/.."
unset TRITON_INTERPRET  # compiled Triton: the interpreter's numbers mean nothing
PY=${PYTHON:-python}
BUDGET_S=${BUDGET_S:-450}  # of the 8 minutes; the rest is start-up and the summary
RESULTS=benchmarks/results

if ! "$PY" -c 'import torch' 2>/dev/null; then
    echo "gpu_check: $PY cannot import torch; nothing run" >&2
    exit 2
fi
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check: no CUDA device (torch.cuda.is_available() is False); nothing run" >&2
    exit 2
fi
TAG=$("$PY" - <<'EOF'
import re
from importlib.metadata import PackageNotFoundError, version
import torch
def installed(name):
    try:
        return version(name)
    except PackageNotFoundError:
        return "none"
parts = [torch.cuda.get_device_name()] + [f"{name}{installed(name)}" for name in ("torch", "triton", "lightning")]
print("_".join(re.sub(r"[^A-Za-z0-9.]+", "-", part).strip("-") for part in parts))
EOF
)
PREFIX=$RESULTS/gpu_check_$TAG
LOGS=$PREFIX.logs
mkdir -p "$LOGS"
echo "gpu_check: $TAG; logs in $LOGS, budget ${BUDGET_S}s"

NAMES=() STATUS=() SECS=()
step() {  # step NAME LIMIT_S COMMAND...: run COMMAND under the smaller of LIMIT_S and the budget left
    local name=$1 limit=$2 start=$SECONDS rc
    shift 2
    local left=$((BUDGET_S - SECONDS))
    ((limit > left)) && limit=$left
    if ((limit < 10)); then
        NAMES+=("$name") STATUS+=("skipped (time budget spent)") SECS+=(0)
        echo "== $name: skipped, ${left}s of the budget left"
        return
    fi
    echo "== $name (limit ${limit}s): $*"
    timeout --kill-after=10 "$limit" "$@" > "$LOGS/$name.log" 2>&1
    rc=$?
    tail -n 25 "$LOGS/$name.log"
    case $rc in
        0) STATUS+=("passed") ;;
        124|137) STATUS+=("timed out after ${limit}s") ;;
        *) STATUS+=("failed (exit $rc)") ;;
    esac
    NAMES+=("$name") SECS+=($((SECONDS - start)))
    echo "== $name: ${STATUS[-1]} in ${SECS[-1]}s"
}

missing=()  # pure-Python packages the image may lack: installed from device_wheels/ only
for module in omegaconf pytest; do
    "$PY" -c "import $module" 2>/dev/null || missing+=("$module")
done
if ((${#missing[@]})); then
    step install 30 "$PY" -m pip install --no-index --find-links device_wheels "${missing[@]}"
fi
step gpu_tests_cuda_graph 75 "$PY" -m pytest -m gpu -q -p no:cacheprovider tests/test_cuda_graph.py
step gpu_tests_others 100 "$PY" -m pytest -m gpu -q -p no:cacheprovider tests --ignore=tests/test_cuda_graph.py
for ensemble in 1 64 1024; do
    step "train_throughput_e$ensemble" 50 "$PY" -m benchmarks.train_throughput --device cuda --steps 2000 \
        --repeats 1 --ensemble "$ensemble" --json "${PREFIX}_train_throughput_e$ensemble.json"
done
step bitgen 35 "$PY" -m benchmarks.bitgen --repeats 3 --json "${PREFIX}_bitgen.json"
step attention 45 "$PY" -m benchmarks.attention --head-dims 64 128 --seqs 512 2048 --json "${PREFIX}_attention.json"

STEPS=$(printf '%s\n' "${NAMES[@]}") OUTCOMES=$(printf '%s\n' "${STATUS[@]}") TIMES=$(printf '%s\n' "${SECS[@]}") \
    PREFIX=$PREFIX TAG=$TAG "$PY" - <<'EOF'
import json, os
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
import torch
def installed(name):
    try:
        return version(name)
    except PackageNotFoundError:
        return None
prefix = os.environ["PREFIX"]
steps = [{"step": name, "status": status, "seconds": int(secs)} for name, status, secs in
         zip(*(os.environ[key].splitlines() for key in ("STEPS", "OUTCOMES", "TIMES")))]
throughput = {}
for ensemble in (1, 64, 1024):
    path = Path(f"{prefix}_train_throughput_e{ensemble}.json")
    if path.exists():
        r = json.loads(path.read_text())
        throughput[ensemble] = {key: r[key] for key in ("train_py_member_steps_per_s", "plain_steps_per_s", "ratio")}
        print(f"train.py E={ensemble:<5} {r['train_py_member_steps_per_s']:12.0f} member-steps/s = "
              f"{r['ratio']:7.2f}x the plain loop ({r['plain_steps_per_s']:.0f} steps/s)")
summary = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": installed("triton"),
           "lightning": installed("lightning"), "steps": steps, "train_throughput": throughput}
Path(f"{prefix}.json").write_text(json.dumps(summary, indent=2) + "\n")
print(f"wrote {prefix}.json")
EOF

failed=()
for i in "${!NAMES[@]}"; do
    [ "${STATUS[$i]}" = passed ] || failed+=("${NAMES[$i]}: ${STATUS[$i]}")
done
if ((${#failed[@]} == 0)); then
    echo "gpu_check: all ${#NAMES[@]} steps passed in ${SECONDS}s ($TAG)"
    exit 0
fi
echo "gpu_check: $((${#NAMES[@]} - ${#failed[@]}))/${#NAMES[@]} steps passed in ${SECONDS}s; $(printf '%s; ' "${failed[@]}" | sed 's/; $//')"
exit 1
