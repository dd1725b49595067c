"""One DVC stage as one Prefect flow run.

The stage list, commands, outputs and the DAG come from `dvc.yaml` (through DVC's own parser), so the
Prefect entry point runs exactly what `dvc repro` runs. A stage flow asks DVC whether the stage changed,
runs its command in a subprocess (as `dvc repro` does), and records the outputs with `dvc commit`, so
afterwards `dvc status` is clean and a later `dvc repro` reruns nothing. DVC owns caching and versions;
Prefect owns running, retrying and showing. Nothing is persisted as a Prefect result.
Not `dvc repro --single-item`: it deletes a stage's outputs before running it, so a retried training stage
could not resume from its checkpoints in run/ (two such processes do run side by side; that is not the reason)."""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from prefect import flow, get_run_logger

ROOT = Path(__file__).resolve().parents[1]
_DVC_LOCK = threading.Lock()  # DVC's Repo is not thread-safe; its own lock file guards other processes
_ROOT: dict[str, Path] = {}


def set_root(path: str | os.PathLike | None) -> Path:
    """Point the flows at another checkout (tests, benchmarks); None = this repository. DVC's Python API
    resolves paths against the working directory, so the process moves there (one repository per process)."""
    if path is None:
        _ROOT.pop("root", None)
    else:
        _ROOT["root"] = Path(path).resolve()
    if Path.cwd() != root():
        os.chdir(root())
    return root()


def root() -> Path:
    return _ROOT.get("root", ROOT)


class StageFailed(RuntimeError):
    """The stage's command exited non-zero: a bug or bad input; retrying will not help."""


class StageCancelled(RuntimeError):
    """Stopped by the pipeline because another stage failed."""


class TransientStageError(RuntimeError):
    """Worth a retry: the process was killed (OOM killer, preemption) or DVC's lock was busy."""


@dataclass
class Stage:
    name: str  # DVC address, e.g. "expert@code"
    cmd: str
    deps: list[str]
    outs: list[str]
    upstream: list[str] = field(default_factory=list)

    @property
    def family(self) -> str:  # "expert" for "expert@code": the Prefect flow name
        return self.name.split("@")[0]

    @property
    def fan_out(self) -> bool:
        return "@" in self.name


def _repo(root: Path):
    from dvc.repo import Repo

    return Repo(str(root))


def load_stages() -> list[Stage]:
    """Every stage of dvc.yaml in a topological order (upstream first), with its upstream stages."""
    import networkx as nx

    with _DVC_LOCK, _repo(root()) as repo:
        graph = repo.index.graph  # edges point from a stage to the stages it depends on
        order = list(reversed(list(nx.topological_sort(graph))))
        return [Stage(name=s.name, cmd=s.cmd, deps=[str(d.def_path) for d in s.deps],
                      outs=[str(o.def_path) for o in s.outs],
                      upstream=sorted(u.name for u in graph.successors(s)))
                for s in order if s.cmd]


def _dvc_call(fn, attempts: int = 20):
    """Run fn(repo) under the process lock, retrying while another DVC process holds the repo lock."""
    from dvc.lock import LockError

    for attempt in range(attempts):
        try:
            with _DVC_LOCK, _repo(root()) as repo:
                return fn(repo)
        except LockError as err:
            if attempt == attempts - 1:
                raise TransientStageError(f"DVC repository lock busy: {err}") from err
            time.sleep(0.5)


def _target(name: str) -> str:
    return f"{root() / 'dvc.yaml'}:{name}"  # absolute, so the process's working directory does not matter


def stage_changed(name: str) -> bool:
    return bool(_dvc_call(lambda repo: repo.status(targets=[_target(name)], with_deps=False)))


def commit_stage(name: str) -> None:
    _dvc_call(lambda repo: repo.commit(_target(name), force=True))


def _env(threads: int | None) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # `python` = this venv
    env["TQDM_DISABLE"] = "1"  # lm-eval's and transformers' bars are log noise here; [k/N] lines carry progress
    if threads:
        for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env[key] = str(threads)
    return env


PROGRESS = re.compile(r"\[(\d+)/(\d+)\]")  # tasks.say and the training loop print `stage: [k/N] ...`
BAR = re.compile(r"\d+%\|.*\|\s*\d+/\d+")  # a tqdm bar that ignored TQDM_DISABLE
PROGRESS_EVERY_S = 2.0  # at most one progress-artifact update per this many seconds


class OutputRelay:
    """A stage's output into its own flow run: lines go to the run's log, except progress bars, and every
    `[k/N]` line also moves a Prefect progress artifact on the run's page."""

    def __init__(self, stage: str, log):
        self.stage, self.log = stage, log
        self.artifact, self.updated, self.dropped, self.percent = None, 0.0, 0, 0.0

    def feed(self, line: str) -> None:
        line = line.rstrip().rsplit("\r", 1)[-1]  # a carriage-return redraw: only its last state matters
        if BAR.search(line):
            self.dropped += 1
            return
        if line:
            self.log.info(line)
        found = PROGRESS.search(line)
        if found and int(found.group(2)) > 0:
            self.progress(100.0 * int(found.group(1)) / int(found.group(2)), line)

    def progress(self, percent: float, description: str, force: bool = False) -> None:
        from prefect.artifacts import create_progress_artifact, update_progress_artifact

        self.percent = percent
        now = time.monotonic()
        if self.artifact is None:
            self.artifact = create_progress_artifact(percent, description=f"{self.stage}: {description}")
        elif force or now - self.updated >= PROGRESS_EVERY_S:
            update_progress_artifact(self.artifact, percent, description=f"{self.stage}: {description}")
        else:
            return
        self.updated = now

    def close(self, ok: bool) -> None:
        if self.artifact is not None and ok:
            self.progress(100.0, "done", force=True)
        if self.dropped:
            self.log.info(f"({self.dropped} progress-bar lines left out of this log)")


_RUNNING: dict[str, subprocess.Popen] = {}  # stage name -> its command, while it runs in this process
_CANCELLED: set[str] = set()
_RUNNING_LOCK = threading.Lock()


def cancel_stages(names) -> list[str]:
    """Stop these stages (a sibling failed): kill the commands already running and make the others refuse to
    start, so a stage whose flow run is just starting cannot slip through. Returns the ones killed. Only this
    process's stages: under Dask, stages in worker processes run to their end."""
    killed = []
    with _RUNNING_LOCK:
        _CANCELLED.update(names)
        for name in names:
            proc = _RUNNING.get(name)
            if proc is not None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)  # the shell and what it started
                    killed.append(name)
                except ProcessLookupError:
                    pass
    return killed


def forget_cancelled(names) -> None:
    """The pipeline run is over: these stages may run again in the next one."""
    with _RUNNING_LOCK:
        _CANCELLED.difference_update(names)


def run_command(stage: Stage, cwd: Path, threads: int | None, log, keep_outs: bool = False) -> float:
    """Run the stage's command like `dvc repro` does (shell, repo root, outputs removed first). On a retry
    the outputs are kept, so a training stage resumes from its last checkpoint in run/."""
    for out in ([] if keep_outs else stage.outs):
        path = cwd / out
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
    start = time.perf_counter()
    relay = OutputRelay(stage.name, log)
    with _RUNNING_LOCK:
        if stage.name in _CANCELLED:
            raise StageCancelled(f"stage {stage.name}: cancelled because another stage failed (not started)")
        proc = subprocess.Popen(stage.cmd, shell=True, cwd=cwd, env=_env(threads), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True)
        _RUNNING[stage.name] = proc
    tail: list[str] = []
    try:
        for line in proc.stdout:  # into this stage's flow run (its page in the UI)
            relay.feed(line)
            tail = (tail + [line.rstrip()])[-20:]
        code = proc.wait()
    finally:
        with _RUNNING_LOCK:
            _RUNNING.pop(stage.name, None)
            cancelled = stage.name in _CANCELLED
    relay.close(ok=code == 0)
    seconds = time.perf_counter() - start
    if cancelled:
        raise StageCancelled(f"stage {stage.name}: cancelled because another stage failed")
    # Killed from outside (OOM killer, preemption): negative when direct, 128 + signal through the shell.
    signal_ = -code if code < 0 else code - 128 if code in (128 + 9, 128 + 15) else None
    if signal_:
        raise TransientStageError(f"stage {stage.name}: `{stage.cmd}` was killed by signal {signal_}")
    if code != 0:  # its output (the traceback or error line) is already in the log: name it, do not repeat it
        last = next((t for t in reversed(tail) if t.strip() and not t.startswith("[stage-time]")), "")
        raise StageFailed(f"stage {stage.name}: `{stage.cmd}` exited with {code}: {last}")
    missing = [o for o in stage.outs if not (cwd / o).exists()]
    if missing:
        raise StageFailed(f"stage {stage.name}: `{stage.cmd}` did not write its declared outputs {missing}")
    return seconds


@contextlib.contextmanager
def own_run_context():
    """Prefect 3.8 keeps the calling task's run context inside a flow called from that task, so the flow's
    logs and artifacts would land on the parent's task run; without it they belong to this flow run."""
    from prefect.context import TaskRunContext

    token = TaskRunContext.__var__.set(None)
    try:
        yield
    finally:
        TaskRunContext.__var__.reset(token)


@flow(name="stage", flow_run_name="{stage_name}", log_prints=True)
def stage_flow(stage_name: str, cmd: str, outs: list[str], repo_root: str, force: bool = False,
               threads: int | None = None, retry: bool = False):
    """Run one DVC stage if DVC says it changed (or `force`), then `dvc commit` it. A failed command ends the
    run Failed (a cancelled one Cancelled) with a one-line message; its output is already in the log."""
    from prefect.states import Cancelled, Failed

    set_root(repo_root)  # also in a Dask worker process
    with own_run_context():
        try:
            return _run_stage(stage_name, cmd, outs, force, threads, retry)
        except StageFailed as err:
            get_run_logger().error(str(err))
            return Failed(message=str(err))
        except StageCancelled as err:
            get_run_logger().warning(str(err))
            return Cancelled(message=str(err))


def _run_stage(stage_name: str, cmd: str, outs: list[str], force: bool, threads: int | None, retry: bool) -> dict:
    log = get_run_logger()
    stage = Stage(name=stage_name, cmd=cmd, deps=[], outs=outs)
    start = time.perf_counter()
    if not force and not stage_changed(stage_name):
        log.info(f"{stage_name}: up to date (dvc.lock matches), skipped")
        return {"stage": stage_name, "ran": False, "seconds": 0.0, "overhead_seconds": time.perf_counter() - start,
                "outs": outs}
    log.info(f"{stage_name}: running `{cmd}`" + (f" with {threads} thread(s)" if threads else "")
             + (" (retry: outputs kept for resuming)" if retry else ""))
    started = time.time()
    seconds = run_command(stage, root(), threads, log, keep_outs=retry)
    finished = time.time()
    commit_stage(stage_name)
    total = time.perf_counter() - start
    log.info(f"{stage_name}: done in {seconds:.1f} s (+{total - seconds:.1f} s DVC status/commit); outputs {outs}")
    return {"stage": stage_name, "ran": True, "seconds": seconds, "overhead_seconds": total - seconds, "outs": outs,
            "started": started, "finished": finished}


def run_stage_flow(stage: Stage, force: bool = False, threads: int | None = None, retry: bool = False):
    """The stage's flow under its own flow name (the stage family) so the UI groups runs by stage; returns its
    final state."""
    return stage_flow.with_options(name=stage.family)(stage_name=stage.name, cmd=stage.cmd, outs=stage.outs,
                                                      repo_root=str(root()), force=force, threads=threads,
                                                      retry=retry, return_state=True)
