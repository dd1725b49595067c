#!/usr/bin/env bash
# The prepared GPU check (one H100 or H200, 8 minutes or less): the device-parametrised tests on CUDA (the loop,
# the scale paths, DP-SGD's clipping), training throughput at `small` with MFU against the bf16 matmul peak it
# measures, a bf16 owner-expert step at a 1B-class shape (tokens/s, MFU, peak memory), a merged-model decode
# (tokens/s) and the owner's DP-SGD step beside the plain one at both shapes. Writes each part's output to $OUT
# (or runs/gpu_check/) and stops at the first failure. DP-SGD needs opacus importable (its accountant).
#
#   bash benchmarks/gpu_check.sh            # on the GPU machine, from the repository root
#   DEVICE=cpu QUICK=1 bash benchmarks/gpu_check.sh   # the same script end to end on the CPU, tiny shapes (CI-size)
#
# PYTHON: an interpreter whose torch has CUDA (default: .venv/bin/python when its torch sees a GPU, else python3,
# e.g. a GPU machine's own torch; the project's pure-Python dependencies must import there).
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
if [ -z "${PYTHON:-}" ]; then
  PYTHON=python3
  if [ -x .venv/bin/python ] && .venv/bin/python -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
    PYTHON=.venv/bin/python
  fi
  [ "$DEVICE" = cpu ] && [ -x .venv/bin/python ] && PYTHON=.venv/bin/python
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
start=$(date +%s)
step() { echo; echo "== [$1] $2 ($(( $(date +%s) - start )) s so far)"; }

step 0/4 "the machine"
"$PYTHON" - <<EOF | tee "$OUT/machine.txt"
import torch
print("torch", torch.__version__, "CUDA", torch.version.cuda)
if "$DEVICE" == "cuda":
    assert torch.cuda.is_available(), "torch sees no GPU: set PYTHON to an interpreter with a CUDA build of torch"
    p = torch.cuda.get_device_properties(0)
    print("GPU:", p.name, f"{p.total_memory / 2**30:.0f} GiB")
else:
    print("GPU: none (DEVICE=cpu)")
EOF

if [ -n "${QUICK:-}" ]; then  # CPU rehearsal: the same four parts at shapes a laptop finishes in a minute or two
  SMALL=(--preset smoke --batch 4 --seq-len 64 --steps 2); ONEB=(--preset smoke --batch 2 --seq-len 64 --steps 2)
  DECODE=(--preset smoke --experts 4 --top-k 2 --tokens 16); TESTS=(-k "scale_paths and pickle or clipped_grad")
else
  SMALL=(--preset small --batch 8 --seq-len 1024 --steps 10); ONEB=(--preset olmo2-1b --batch 4 --seq-len 2048 --steps 6)
  DECODE=(--preset small --experts 8 --top-k 4 --tokens 128); TESTS=(-k "cuda")
fi

step 1/5 "device-parametrised tests ($DEVICE)"
"$PYTHON" -m pytest -q -p no:cacheprovider tests/test_scale_paths.py tests/test_train_loop.py \
  tests/test_privacy_training.py "${TESTS[@]}" 2>&1 \
  | tee "$OUT/tests.txt"

step 2/5 "train_throughput at ${SMALL[1]}: tokens/s and MFU against the measured bf16 matmul peak"
"$PYTHON" benchmarks/train_throughput.py --device "$DEVICE" "${SMALL[@]}" 2>&1 | grep -v '^{' | tee "$OUT/train_small.txt"

step 3/5 "a bf16 owner-expert step at ${ONEB[1]}: tokens/s, MFU, peak memory"
"$PYTHON" benchmarks/train_throughput.py --device "$DEVICE" --only expert "${ONEB[@]}" 2>&1 | grep -v '^{' \
  | tee "$OUT/expert_1b.txt"

step 4/5 "merged-model decode"
"$PYTHON" benchmarks/decode_throughput.py --device "$DEVICE" "${DECODE[@]}" 2>&1 | grep -v '^{' | tee "$OUT/decode.txt"

step 5/5 "the owner's DP-SGD step beside the plain one (${SMALL[1]}, then ${ONEB[1]})"
"$PYTHON" benchmarks/train_throughput.py --device "$DEVICE" --only expert --dp "${SMALL[@]}" 2>&1 | grep -v '^{' \
  | tee "$OUT/dp_owner.txt"
# micro-batch 1 at the 1B shape: per-example gradients at micro-batch 4 ran out of the H200's 139.8 GiB
"$PYTHON" benchmarks/train_throughput.py --device "$DEVICE" --only expert --dp "${ONEB[@]}" --micro-batch 1 2>&1 \
  | grep -v '^{' | tee -a "$OUT/dp_owner.txt"

echo; echo "gpu_check: done in $(( $(date +%s) - start )) s; outputs in $OUT/"
