"""Artifacts follow the process umask (a team on a shared filesystem can read them), and the one lock helper
serialises writers across processes."""
import multiprocessing
import os
import stat
import time

import torch
from safetensors.torch import save_file

from flexolmo_core.io.atomic import atomic_dir, atomic_file, locked, write_json


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
    from flexolmo_core.registry.local import Registry

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


KILLED_WRITER = r"""
import os, signal, sys
from pathlib import Path
import flexolmo_core.io.atomic as atomic

final, mode = Path(sys.argv[1]), sys.argv[2]
real_replace, real_rmtree = os.replace, atomic.shutil.rmtree
if mode == "between-renames":  # no exchange: die after the old folder moved away, before the new one moved in
    atomic._exchange = lambda a, b: False
    calls = []
    def replace(a, b):
        calls.append(a)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        real_replace(a, b)
    os.replace = replace
else:  # die right after the exchange, before the old folder (now at the temporary path) is deleted
    atomic.shutil.rmtree = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
with atomic.atomic_dir(final) as tmp:
    (tmp / "v").write_text("new")
"""


def _killed_write(final, mode):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(final), mode])
    assert proc.returncode == -9


def test_a_kill_after_the_exchange_leaves_the_new_folder_and_the_next_writer_sweeps(tmp_path):
    final = tmp_path / "out"
    with atomic_dir(final) as tmp:
        (tmp / "v").write_text("old")
    _killed_write(final, "exchange")
    assert (final / "v").read_text() == "new"  # the output path never went missing
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "out"]
    assert len(leftovers) == 1 and leftovers[0].startswith(".out.tmp-")
    with atomic_dir(final) as tmp:
        (tmp / "v").write_text("third")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_kill_between_two_renames_is_repaired_by_the_next_writer(tmp_path, monkeypatch):
    import flexolmo_core.io.atomic as atomic

    final = tmp_path / "out"
    with atomic_dir(final) as tmp:
        (tmp / "v").write_text("old")
    _killed_write(final, "between-renames")
    assert not final.exists()  # the one window a filesystem without exchange has
    assert atomic.sweep_stale(final)  # what the next writer does first
    assert (final / "v").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_the_sweep_leaves_live_and_foreign_writers_alone(tmp_path):
    import socket
    import subprocess
    import sys

    import flexolmo_core.io.atomic as atomic

    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    final = tmp_path / "out"
    mine = tmp_path / f".out.tmp-{socket.gethostname()}.{os.getpid()}.abcd1234"  # this process: alive
    foreign = tmp_path / f".out.tmp-otherhost.{dead}.abcd1234"  # that pid is gone here, but on its host?
    unrelated = tmp_path / f".outer.tmp-{socket.gethostname()}.{dead}.abcd1234"  # another output's leftover
    stale = tmp_path / f".out.tmp-{socket.gethostname()}.{dead}.abcd1234"
    for p in (mine, foreign, unrelated, stale):
        p.mkdir()
    assert atomic.sweep_stale(final) == [stale]
    assert mine.exists() and foreign.exists() and unrelated.exists()
