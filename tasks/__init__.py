"""Stage wrappers (`python -m tasks.<stage>`). Importing the package starts a clock: when a stage process
exits it prints one `[stage-time]` line (wall clock, seconds spent before/inside the stage's module), which
`benchmarks/pipeline_overhead.py --from-log` turns into the DVC/Prefect overhead of a real run."""
from __future__ import annotations

import atexit
import sys
import time

_START = time.time()


def say(message: str) -> None:
    """A stage's progress line for whoever watches it (stderr: stdout carries the stage's result)."""
    print(message, file=sys.stderr, flush=True)


def not_run(out, stage: str, reason: str) -> dict:
    """A stage that is switched off in params: clear its old outputs (DVC would remove them too) and record
    why in `out`/summary.json, which the evaluation reports as `not run: <reason>`."""
    import shutil
    from pathlib import Path

    from flexolmo_core.atomic import write_json

    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    summary = {"status": "not run", "reason": reason}
    write_json(out / "summary.json", summary)
    print(f"{stage}: {reason}")
    return summary


def run(main) -> None:
    """A stage module's entry point: main(*argv), with the CLI's one error handler (bad input: one line
    naming the file and field, exit 2; a bug: its traceback, exit 70)."""
    from flexolmo_core.cli import guarded

    name = getattr(sys.modules.get("__main__"), "__spec__", None)
    stage = (getattr(name, "name", "") or "stage").removeprefix("tasks.")
    sys.exit(guarded(f"{' '.join([stage, *sys.argv[1:]])}: error:", lambda: main(*sys.argv[1:])))


def _report() -> None:
    module = sys.modules.get("__main__")
    spec = getattr(module, "__spec__", None)
    name = getattr(spec, "name", "") or ""
    if not name.startswith("tasks."):
        return  # imported by tests or flows, not run as a stage
    import multiprocessing

    if multiprocessing.parent_process() is not None:
        return  # a worker the stage spawned (evaluate's variant workers): the stage process reports
    end = time.time()
    print(f"[stage-time] {name} start={_START:.3f} end={end:.3f} seconds={end - _START:.2f}", flush=True)


atexit.register(_report)
