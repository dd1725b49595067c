"""Artifacts follow the process umask (a team on a shared filesystem can read them), and the one lock helper
serialises writers across processes."""
import multiprocessing
import os
import stat
import time

import torch
from safetensors.torch import save_file

from flexolmo_core.atomic import atomic_dir, atomic_file, locked, write_json


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_artifacts_follow_the_umask(tmp_path):
    old = os.umask(0o002)
    try:
        with atomic_dir(tmp_path / "model") as tmp:
            (tmp / "weights.bin").write_bytes(b"x")
            save_file({"w": torch.zeros(2)}, str(tmp / "model.safetensors"))  # safetensors writes 0600
            (tmp / "sub").mkdir()
        write_json(tmp_path / "model" / "meta.json", {"a": 1})
        with atomic_file(tmp_path / "notes.txt") as handle:
            handle.write("hello")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "model") == 0o775
    assert _mode(tmp_path / "model" / "meta.json") == 0o664
    assert _mode(tmp_path / "notes.txt") == 0o664
    assert _mode(tmp_path / "model" / "weights.bin") & stat.S_IRGRP
    assert _mode(tmp_path / "model" / "model.safetensors") == 0o664 and _mode(tmp_path / "model" / "sub") == 0o775


def test_a_registry_is_group_readable_under_umask_002(tmp_path, smoke_anchor, packages):
    from flexolmo_core.registry import Registry

    old = os.umask(0o002)
    try:
        registry = Registry(tmp_path / "reg")
        registry.init(smoke_anchor)
        entry = registry.publish(packages["code"])
    finally:
        os.umask(old)
    for path in [registry.root / "registry.json", *entry.path.iterdir(), entry.path]:
        assert _mode(path) & stat.S_IRGRP, path


def _hold(lock_path, log_path, hold: float, ready_dir, n: int) -> None:
    (ready_dir / str(os.getpid())).touch()
    while len(list(ready_dir.iterdir())) < n:  # both processes are up before either asks for the lock
        time.sleep(0.01)
    with locked(lock_path):
        with open(log_path, "a") as log:
            log.write(f"in {time.monotonic()}\n")
        time.sleep(hold)
        with open(log_path, "a") as log:
            log.write(f"out {time.monotonic()}\n")


def test_lock_serialises_two_processes(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    (tmp_path / "ready").mkdir()
    procs = [ctx.Process(target=_hold, args=(tmp_path / ".lock", tmp_path / "log", 1.0, tmp_path / "ready", 2))
             for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    events = [line.split()[0] for line in (tmp_path / "log").read_text().splitlines()]
    assert events == ["in", "out", "in", "out"]  # never two holders at once
