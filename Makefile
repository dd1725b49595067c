# The README's two commands: `make run` (the full pipeline, tiny preset) and `make test`.
.PHONY: setup run test ui

setup:
	bash scripts/setup.sh

run: setup
	bash scripts/run.sh

test: setup
	.venv/bin/python -m pytest -q -p no:cacheprovider
