#!/usr/bin/env bash
# The README's main command (after scripts/setup.sh): the whole pipeline at the `tiny` preset on the full-tier
# mini FlexMix with `dvc repro`, then the paths of the results table and plots. Offline by construction.
#   RUNNER=prefect bash scripts/run.sh   runs the same DAG as Prefect flow runs (experts concurrently)
#   bash scripts/run.sh expert@code      any `dvc repro` arguments (a target, --force, ...)
#   EXP="-S preset=smollm2 ..." bash scripts/run.sh   a variant: `dvc exp run` with those params overrides (DVC
#                                        writes them into params.yaml; `git checkout params.yaml` undoes that)
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
export PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
       TOKENIZERS_PARALLELISM=false
start=$(date +%s)
mkdir -p runs
log=runs/last-run.log  # also read by `python benchmarks/pipeline_overhead.py --from-log runs/last-run.log`
if [ "${RUNNER:-dvc}" = prefect ]; then
  python -m flows.pipeline "$@" 2>&1 | tee "$log"
elif [ -n "${EXP:-}" ]; then
  # shellcheck disable=SC2086  # EXP is a list of -S flags
  dvc exp run $EXP "$@" 2>&1 | tee "$log"
else
  dvc repro "$@" 2>&1 | tee "$log"
fi
wall=$(( $(date +%s) - start ))
echo "[run] pipeline finished in $wall s (preset: $(python -c 'import yaml; print(yaml.safe_load(open("params.yaml"))["preset"])'))"
python benchmarks/pipeline_overhead.py --from-log "$log" --wall "$wall" | tail -1 || true
[ -f reports/results.md ] && echo "results table: $PWD/reports/results.md"
[ -d outputs/evaluate/plots ] && echo "plots: $PWD/outputs/evaluate/plots/ ($(ls outputs/evaluate/plots | tr '\n' ' '))"
[ -f outputs/evaluate/heldout_bpb.json ] && echo "metrics: $PWD/outputs/evaluate/heldout_bpb.json (dvc metrics show)"
echo "merged model: $PWD/outputs/merge/flexolmo"
