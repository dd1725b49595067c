# The README's two commands: `make run` (the full pipeline, tiny preset) and `make test`.
.PHONY: setup run run-smollm2 test test-fast ui exps

setup:
	bash scripts/setup.sh

run: setup
	bash scripts/run.sh

# The pipeline on the real pretrained SmolLM2-135M (imported anchor, Mixtral merges) with three domains: DVC's
# foreach cannot depend on the preset, so the other domains are removed with -S ~domains.<d> (46m24s from a fresh clone at 9b4b07b, Intel Xeon).
SMOLLM2_DROP = creative academic educational reddit
run-smollm2: setup
	EXP="-S preset=smollm2 $(foreach d,$(SMOLLM2_DROP),-S ~domains.$(d))" bash scripts/run.sh

# Two workers, one test file each at a time (--dist loadfile keeps a file's module fixtures in one process):
# 313 tests in 711 s on an AMD EPYC; one process took 1,149 s (that run shared the machine with other work).
# 333 tests in 932 s on an Intel Xeon of this kind (2026-12-02, set-up already done); from a fresh clone at 830575b
# `make test` took 1110 s there, 335 tests in 985 s (beside a niced benchmark run). From a fresh clone at b506eb2
# on an AMD EPYC of this kind (2026-12-04): 896 s with set-up, 363 tests in 783.14 s; at dc9a171 780 s, 368 in 684.93 s.
# At 67bacf7, beside a SmolLM2 study that kept both cores busy: 1486 s with set-up, 387 tests in 1338.10 s.
test: setup
	.venv/bin/python -m pytest -q -p no:cacheprovider -n 2 --dist loadfile

# The loop while working: everything not marked slow (the orchestration clones, torchrun, the GPU-script rehearsal,
# kill-and-resume). AMD EPYC of this kind, 2026-12-04: 350 tests in 166.41 s (240.92 s before the torchrun tests,
# the GPU-script rehearsal and kill-and-resume were marked slow too).
test-fast: setup
	.venv/bin/python -m pytest -q -p no:cacheprovider -n 2 --dist loadfile -m "not slow"

# A local Prefect server with its UI; point runs at it with PREFECT_API_URL (printed). Stop with Ctrl-C.
ui: setup
	@echo "Prefect UI: http://127.0.0.1:4200  -- in another shell: export PREFECT_API_URL=http://127.0.0.1:4200/api"
	PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1 .venv/bin/prefect server start --host 127.0.0.1 --port 4200

# The experiments' headline: mean held-out bpb per model (plain `dvc exp show` has ~340 columns, most of them params).
exps: setup
	.venv/bin/dvc exp show --drop '.*' --keep '^(Experiment|Created|public|soup|btm|prompt_routing|flexolmo|flexolmo_rt|unrestricted|btx)$$'
