"""One DVC stage as one Prefect flow run.

The stage list, commands, outputs and the DAG come from `dvc.yaml` (through DVC's own parser), so the
Prefect entry point runs exactly what `dvc repro` runs. A stage flow asks DVC whether the stage changed,
runs its command in a subprocess (as `dvc repro` does), and records the outputs with `dvc commit`, so
afterwards `dvc status` is clean and a later `dvc repro` reruns nothing. DVC owns caching and versions;
Prefect owns running, retrying and showing. Nothing is persisted as a Prefect result."""
from __future__ import annotations

import os
import shutil
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
    if threads:
        for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env[key] = str(threads)
    return env


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
    proc = subprocess.Popen(stage.cmd, shell=True, cwd=cwd, env=_env(threads), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)
    tail: list[str] = []
    for line in proc.stdout:  # stream into the flow run's logs (visible in the UI)
        log.info(line.rstrip())
        tail = (tail + [line.rstrip()])[-20:]
    code = proc.wait()
    seconds = time.perf_counter() - start
    # Killed from outside (OOM killer, preemption): negative when direct, 128 + signal through the shell.
    signal_ = -code if code < 0 else code - 128 if code in (128 + 9, 128 + 15) else None
    if signal_:
        raise TransientStageError(f"stage {stage.name}: `{stage.cmd}` was killed by signal {signal_}")
    if code != 0:
        raise StageFailed(f"stage {stage.name}: `{stage.cmd}` exited with {code}:\n" + "\n".join(tail))
    missing = [o for o in stage.outs if not (cwd / o).exists()]
    if missing:
        raise StageFailed(f"stage {stage.name}: `{stage.cmd}` did not write its declared outputs {missing}")
    return seconds


@flow(name="stage", flow_run_name="{stage_name}", log_prints=True)
def stage_flow(stage_name: str, cmd: str, outs: list[str], repo_root: str, force: bool = False,
               threads: int | None = None, retry: bool = False) -> dict:
    """Run one DVC stage if DVC says it changed (or `force`), then `dvc commit` it."""
    log = get_run_logger()
    set_root(repo_root)  # also in a Dask worker process
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


def run_stage_flow(stage: Stage, force: bool = False, threads: int | None = None, retry: bool = False) -> dict:
    """The stage's flow under its own flow name (the stage family) so the UI groups runs by stage."""
    return stage_flow.with_options(name=stage.family)(stage_name=stage.name, cmd=stage.cmd, outs=stage.outs,
                                                      repo_root=str(root()), force=force, threads=threads,
                                                      retry=retry)
