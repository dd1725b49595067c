"""The whole DAG of dvc.yaml as Prefect flow runs, with the per-domain stages running concurrently.

    python -m flows.pipeline                 # like `dvc repro`: runs what changed, then `dvc commit`s it
    python -m flows.pipeline --force         # rerun every stage
    python -m flows.pipeline --workers 3     # concurrent stages (default: 2)
    python -m flows.pipeline --dask          # Dask (prefect-dask) instead of the local thread pool

Each stage is a child flow run (flow name = stage, run name = DVC address such as `expert@code`)
submitted as a task, so the stages of one fan-out (every `domain_embedding@<d>`, every `expert@<d>`)
run side by side as soon as their own upstream stages finish. Transient failures (a killed process, a
busy DVC lock) are retried; a stage that exits with an error is not. With `PREFECT_API_URL` set the runs
appear in that server's UI; otherwise Prefect starts an ephemeral one."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from prefect import flow, get_run_logger, task
from prefect.futures import as_completed
from prefect.states import Cancelled, Failed
from prefect.task_runners import ThreadPoolTaskRunner

import flows  # noqa: F401  (offline environment defaults, before prefect is imported)
from flexolmo_core.errors import InputError
from flows import artifacts
from flows.stages import (
    Stage,
    TransientStageError,
    cancel_stages,
    forget_cancelled,
    load_stages,
    root,
    run_stage_flow,
    set_root,
)


def retry_transient(task_, task_run, state) -> bool:
    """Retry only failures that can go away by themselves."""
    try:
        state.result()
    except TransientStageError:
        return True
    except Exception:  # noqa: BLE001
        return False
    return False


@task(task_run_name="{stage.name}", retries=2, retry_delay_seconds=5, retry_condition_fn=retry_transient)
def run_stage(stage: Stage, force: bool, threads: int | None, repo: str):
    from prefect.runtime import task_run

    set_root(repo)  # a Dask worker is another process: the repository must travel with the task
    state = run_stage_flow(stage, force=force, threads=threads, retry=task_run.run_count > 1)
    if state.is_completed():
        return state.result()
    try:
        state.result()
    except TransientStageError:
        raise  # retried (retry_transient)
    except Exception:  # noqa: BLE001  (failed or cancelled: the stage's run already logged why, once)
        pass
    return (Cancelled if state.is_cancelled() else Failed)(message=state.message)  # a new state: the stage's own
    # would become "1/1 states failed"


def threads_per_stage(stage: Stage, workers: int) -> int | None:
    """Fan-out stages share the cores; the others get all of them (None = the library default)."""
    if not stage.fan_out or workers <= 1:
        return None
    return max(1, (os.cpu_count() or 1) // workers)


def select(stages: list[Stage], targets: list[str] | None) -> list[Stage]:
    """The targets and everything upstream of them (all stages when no targets)."""
    if not targets:
        return stages
    by_name = {s.name: s for s in stages}
    unknown = [t for t in targets if t not in by_name and not any(s.family == t for s in stages)]
    if unknown:
        raise InputError(f"unknown stage(s) {unknown}; dvc.yaml has {sorted(by_name)}")
    keep: set[str] = set()
    todo = [s.name for s in stages if s.name in targets or s.family in targets]
    while todo:
        name = todo.pop()
        if name not in keep:
            keep.add(name)
            todo += by_name[name].upstream
    return [s for s in stages if s.name in keep]


@flow(name="flexolmo-pipeline", log_prints=True)
def pipeline(targets: list[str] | None = None, force: bool = False, workers: int = 2):
    """Run dvc.yaml's DAG (or the targets and their upstream) as flow runs; returns a summary per stage, or
    a Failed state naming the failed and cancelled stages (the first failure cancels the rest)."""
    log = get_run_logger()
    start = time.perf_counter()
    stages = select(load_stages(), targets)
    log.info(f"{len(stages)} stages from {root() / 'dvc.yaml'}: {', '.join(s.name for s in stages)}")
    waiting, running, results, failed, cancelled = list(stages), {}, {}, {}, {}
    while waiting or running:
        # Submit a stage once its upstream stages completed, and nothing after a failure: the stages that
        # never started are reported cancelled instead of sitting Pending in the UI.
        for stage in [s for s in waiting if not failed and all(u in results for u in s.upstream)]:
            waiting.remove(stage)
            running[stage.name] = run_stage.submit(stage, force, threads_per_stage(stage, workers), str(root()))
        if not running:
            break
        done = next(as_completed(list(running.values())))
        name = next(n for n, f in running.items() if f is done)
        del running[name]
        done.wait()  # the future's final state (before this, `.state` may still read Running)
        state = done.state
        if state.is_completed():
            results[name] = done.result()
        elif state.is_cancelled():
            cancelled[name] = state.message or "cancelled"
        else:
            failed[name] = state.message or state.name
            log.error(f"{name} failed: {failed[name]} (its own flow run has the output)")
            if running:
                cancel_stages(list(running))
                log.warning(f"cancelling {', '.join(running)}: {name} failed")
    forget_cancelled([s.name for s in stages])
    for stage in waiting:
        cancelled[stage.name] = f"not started: {', '.join(failed)} failed"
    summary = {"stages": results, "failed": failed, "cancelled": cancelled,
               "wall_seconds": round(time.perf_counter() - start, 3)}
    artifacts.publish_pipeline(summary, root())
    if failed:
        return Failed(message=f"pipeline failed at {sorted(failed)}; cancelled {sorted(cancelled)}")
    ran = [n for n, r in results.items() if r["ran"]]
    log.info(f"pipeline: {len(ran)} stage(s) ran ({', '.join(ran) or 'none'}), "
             f"{len(results) - len(ran)} up to date, {summary['wall_seconds']:.1f} s")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run dvc.yaml's pipeline as Prefect flow runs.")
    parser.add_argument("targets", nargs="*", help="stages to run with their upstream (default: all)")
    parser.add_argument("--force", action="store_true", help="rerun stages even if DVC says they are up to date")
    parser.add_argument("--workers", type=int, default=2, help="stages running at once (default 2)")
    parser.add_argument("--dask", action="store_true", help="use prefect-dask's DaskTaskRunner (local cluster)")
    parser.add_argument("--root", default=None, help="repository to run in (default: this one)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = parser.parse_args(argv)
    set_root(args.root)
    if args.dask:
        try:
            from prefect_dask import DaskTaskRunner
        except ImportError:
            print("--dask needs prefect-dask: pip install -c constraints.txt prefect-dask", file=sys.stderr)
            return 2
        runner = DaskTaskRunner(cluster_kwargs={"n_workers": args.workers, "threads_per_worker": 1,
                                                "processes": True})
    else:
        runner = ThreadPoolTaskRunner(max_workers=args.workers)
    state = pipeline.with_options(task_runner=runner)(targets=args.targets or None, force=args.force,
                                                      workers=args.workers, return_state=True)
    if not state.is_completed():
        print(f"pipeline: {state.message}", file=sys.stderr)
        return 1
    summary = state.result()
    if args.json:
        print(json.dumps(summary, indent=2))
    for line in artifacts.report_lines(root()):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
