"""Stage wrappers (`python -m tasks.<stage>`). Importing the package starts a clock: when a stage process
exits it prints one `[stage-time]` line (wall clock, seconds spent before/inside the stage's module), which
`benchmarks/pipeline_overhead.py --from-log` turns into the DVC/Prefect overhead of a real run."""
from __future__ import annotations

import atexit
import sys
import time
from pathlib import Path

_START = time.time()
NUMERICS = Path("outputs/numerics/numerics.json")  # the numerics stage's record: what `loop.dtype: auto` means here


def say(message: str) -> None:
    """A stage's progress line for whoever watches it (stderr: stdout carries the stage's result)."""
    print(message, file=sys.stderr, flush=True)


def pin_dtype(loop):
    """The stage's LoopConfig with `dtype: auto` replaced by the numerics stage's choice for this machine (a named
    dtype is kept as given)."""
    import dataclasses
    import json

    from flexolmo_core.errors import MissingInput
    from flexolmo_core.io.dtypes import pinned_dtype

    if loop.dtype != "auto":
        return loop
    if not NUMERICS.exists():
        raise MissingInput(f"{NUMERICS}: missing; loop.dtype auto is resolved once per machine by the numerics "
                           "stage (dvc repro numerics)")
    return dataclasses.replace(loop, dtype=pinned_dtype("auto", loop.device, json.loads(NUMERICS.read_text()),
                                                          str(NUMERICS)))


def not_run(out, stage: str, reason: str) -> dict:
    """A stage that is switched off in params: clear its old outputs (DVC would remove them too) and record
    why in `out`/summary.json, which the evaluation reports as `not run: <reason>`."""
    import shutil
    from pathlib import Path

    from flexolmo_core.io.atomic import write_json

    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    summary = {"status": "not run", "reason": reason}
    write_json(out / "summary.json", summary)
    print(f"{stage}: {reason}")
    return summary


# Help for the arguments stage `main` functions take (their names are the convention every stage shares).
ARGUMENT_HELP = {
    "params": "the params file to read: this stage's section, with the preset's and the domain's overrides",
    "domain": "the domain this stage runs for (a key of `domains` in the params file, or `public`)",
}


def stage_parser(main, stage: str):
    """The stage's command line, from main's signature: arguments without a default are positional, the others
    are `--name VALUE` options (`--params FILE` for every stage). argparse answers --help and refuses unknown
    flags and extra words (exit 2)."""
    import argparse
    import inspect

    module = sys.modules.get(main.__module__)
    doc = (getattr(module, "__doc__", None) or "").strip()
    parser = argparse.ArgumentParser(prog=f"python -m tasks.{stage}", description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, p in inspect.signature(main).parameters.items():
        text = ARGUMENT_HELP.get(name, "")
        if p.default is inspect.Parameter.empty:
            parser.add_argument(name, help=text)
        else:
            parser.add_argument(f"--{name}", default=p.default, metavar="FILE" if name == "params" else None,
                                help=f"{text} (default: {p.default})")
    return parser


def run(main) -> None:
    """A stage module's entry point: its arguments parsed from main's signature (`stage_parser`), then main with
    the CLI's one error handler (bad input: one line naming the file and field, exit 2; a bug: its traceback,
    exit 70)."""
    from flexolmo_core.cli.main import guarded

    module = main.__module__
    if module == "__main__":  # run as `python -m tasks.<stage>`: the module's import name is in its spec
        module = getattr(getattr(sys.modules["__main__"], "__spec__", None), "name", "") or "stage"
    stage = module.removeprefix("tasks.")
    args = vars(stage_parser(main, stage).parse_args(sys.argv[1:]))
    sys.exit(guarded(f"{' '.join([stage, *sys.argv[1:]])}: error:", lambda: main(**args)))


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
    try:
        print(f"[stage-time] {name} start={_START:.3f} end={end:.3f} seconds={end - _START:.2f}", flush=True)
    except BrokenPipeError:  # `python -m tasks.merge --help | head`: the reader has gone
        pass


atexit.register(_report)
