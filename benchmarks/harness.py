"""Helpers for the orchestration tests and benchmarks: a temporary clone of this working tree (tracked and
untracked files, no outputs) set to the `smoke` preset, with a small data tier and a fast evaluation."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SKIP = {".venv", ".git", "outputs", "reports", "runs", "dvc.lock", "__pycache__", ".pytest_cache", "flexolmo.egg-info"}

def smoke_params(params: dict, domains: list[str]) -> dict:
    """The smoke preset on a small data tier, with fast evaluation."""
    params = dict(params)
    params["preset"] = "smoke"
    params["domains"] = {d: {} for d in domains}
    prep = params.setdefault("prepare", {})
    prep["tiers"] = {**prep.get("tiers", {}), "smoke": {"tokens_per_domain": 20_000}}
    prep["tier"] = "smoke"
    prep["decontam_ngram"] = 0  # the eval-set n-gram index costs ~30 s; decontamination has its own tests
    if "tokenizer" in params:
        params["tokenizer"] = {**params["tokenizer"], "min_frequency": 2, "seq_len": 64}  # vocab: the preset's
    if "evaluate" in params:
        params["evaluate"] = {**params["evaluate"], "suites": ["domains"], "limit": 2, "domain_limit": 2,
                              "domain_max_chars": 500, "batch_size": 4}
    # a few optimiser steps are enough to exercise every stage; the training engineer's tests cover the loop
    for section, steps in (("anchor", 4), ("expert", 3)):
        if section in params:
            presets = dict(params[section].get("presets") or {})
            presets["smoke"] = {**(presets.get("smoke") or {}), "steps": steps, "checkpoint_every": 2}
            params[section] = {**params[section], "presets": presets}
    if "domain_embedding" in params:  # the paper's random-row ablation: no encoder to load
        params["domain_embedding"] = {**params["domain_embedding"], "mode": "random"}
    params["merge"] = {**params.get("merge", {}), "opt_out": True, "dense_experts": False, "soup": False}
    return params


def make_clone(dest: Path, domains: list[str], preset: str = "smoke") -> Path:
    """Copy the working tree (tracked and untracked, not outputs) to `dest`, git-init it; `smoke` gets the
    fast test params above, any other preset only its name and the domains."""
    def ignore(directory, names):
        return [n for n in names if n in SKIP or n.endswith(".pyc")]

    shutil.copytree(ROOT, dest, ignore=ignore, symlinks=True)
    if (ROOT / "data/packages").exists() and not (dest / "data/packages").exists():
        (dest / "data").mkdir(exist_ok=True)
        os.symlink(ROOT / "data/packages", dest / "data/packages")
    for cache in (dest / ".dvc/cache", dest / ".dvc/tmp"):
        shutil.rmtree(cache, ignore_errors=True)
    params = yaml.safe_load((dest / "params.yaml").read_text())
    if preset == "smoke":
        params = smoke_params(params, domains)
    else:
        params = {**params, "preset": preset, "domains": {d: (params.get("domains") or {}).get(d) or {} for d in domains}}
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = clone_env(dest)
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True, env=env)
    subprocess.run(["git", "add", "-A"], cwd=dest, check=True, env=env)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "clone"], cwd=dest,
                   check=True, env=env)
    subprocess.run([dvc(), "remote", "add", "--local", "-f", "-d", "local", str(dest.parent / "remote")], cwd=dest,
                   check=True, env=env)
    return dest


def dvc() -> str:
    return str(Path(sys.executable).parent / "dvc")


def clone_env(dest: Path) -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(dest)  # the clone's own packages, not the editable install of the original
    for key, value in (("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"), ("DO_NOT_TRACK", "1"),
                       ("PREFECT_SERVER_ANALYTICS_ENABLED", "false"), ("OMP_NUM_THREADS", "2")):
        env.setdefault(key, value)
    return env


def repro(dest: Path, *args: str) -> tuple[list[str], str]:
    """`dvc repro` in the clone; returns the stages that ran and the full output."""
    out = subprocess.run([dvc(), "repro", *args], cwd=dest, env=clone_env(dest), capture_output=True, text=True)
    if out.returncode:
        raise AssertionError(f"dvc repro failed ({out.returncode}):\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}")
    ran = [line.split("'")[1] for line in out.stdout.splitlines() if line.startswith("Running stage '")]
    return ran, out.stdout


def set_domains(dest: Path, domains: dict) -> None:
    params = yaml.safe_load((dest / "params.yaml").read_text())
    params["domains"] = domains
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def wait_for(predicate, timeout: float, what: str, poll: float = 1.0):
    """Poll `predicate` until it returns something truthy (returned); fail naming `what` after `timeout` s."""
    end = time.time() + timeout
    while time.time() < end:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def stop(proc) -> None:
    """SIGTERM a served process, SIGKILL it if it has not gone after 20 s."""
    if proc is None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


def scripted_repo(repo: Path, dvc_yaml: str, files: dict[str, str]) -> Path:
    """A git + DVC repository whose stages are the given scripts (for orchestration tests that need no model)."""
    repo.mkdir(parents=True)
    env = clone_env(repo)
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run([dvc(), "init", "-q"], cwd=repo, check=True, env=env)
    for name, text in files.items():
        (repo / name).write_text(text)
    (repo / "dvc.yaml").write_text(dvc_yaml)
    return repo


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_prefect_server(home: Path, env: dict, log: Path, timeout: float = 120) -> tuple[subprocess.Popen, dict]:
    """`prefect server start` on a free loopback port with its own PREFECT_HOME, once it answers /api/health;
    returns the process and `env` pointed at it (PREFECT_API_URL)."""
    import urllib.request

    port = free_port()
    env = {**env, "PREFECT_HOME": str(home), "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
    server = subprocess.Popen([str(Path(sys.executable).with_name("prefect")), "server", "start", "--host",
                               "127.0.0.1", "--port", str(port)], env=env, stdout=log.open("w"),
                              stderr=subprocess.STDOUT, cwd=home.parent)

    def healthy():
        try:
            return urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2).status == 200
        except OSError:
            return False

    try:
        wait_for(healthy, timeout, "the Prefect server")
    except AssertionError:
        stop(server)
        raise
    return server, env
