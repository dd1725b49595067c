"""Concurrent publishers: 4 real processes x 10 rounds, on a local registry directory and on a file:// URL
whose writers share one local mirror (the default). Each round, two writers publish two new domains and two
race for one domain with different weights. Every publish either is in the index, complete, with exit 0, or
is refused (exit 2, "already published") and leaves nothing behind."""
from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

import pytest

from tests.test_registry import as_domain

WRITERS, ROUNDS = 4, 10


def _writer(rank: int, registry: str, plan: list, barrier, results, cache: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    import contextlib
    import io

    import flexolmo_core.registry.remote as remote

    remote.CACHE_ROOT = Path(cache)  # all writers share this one mirror, as processes on one host do
    from flexolmo_core.cli.main import main

    for round_packages in plan:
        barrier.wait(timeout=120)
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(["publish", round_packages[rank], "--registry", registry])
        results.put((round_packages[rank], code, err.getvalue()))


@pytest.mark.parametrize("kind", ["directory", "file-url"])
def test_four_processes_ten_rounds_index_files_and_exit_codes_agree(kind, tmp_path, smoke_anchor, packages):
    from flexolmo_core.expert.package import load_package
    from flexolmo_core.registry.local import Registry
    from flexolmo_core.registry.remote import RemoteRegistry, open_registry

    if kind == "directory":
        registry = str(tmp_path / "registry")
        Registry(registry).init(smoke_anchor)
    else:
        registry = (tmp_path / "remote").as_uri()
        RemoteRegistry(registry, mirror=tmp_path / "init_mirror").init(smoke_anchor)
    plan = []
    for r in range(ROUNDS):  # writers 0, 1: new domains; writers 2, 3: the same domain, other weights
        names = [(packages["code"], f"a{r}"), (packages["news"], f"b{r}"), (packages["code"], f"c{r}"),
                 (packages["news"], f"c{r}")]
        plan.append([str(as_domain(src, tmp_path / "pkgs" / f"{r}_{w}", d)) for w, (src, d) in enumerate(names)])
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(WRITERS), ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(rank, registry, plan, barrier, results, str(tmp_path / "cache")))
             for rank in range(WRITERS)]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=300) for _ in range(WRITERS * ROUNDS)]
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * WRITERS

    codes = {pkg: (code, err) for pkg, code, err in outcomes}
    assert all(code in (0, 2) and "Traceback" not in err for code, err in codes.values()), codes
    refused = [pkg for pkg, (code, err) in codes.items() if code == 2]
    assert all("already published" in codes[pkg][1] for pkg in refused)
    assert len(refused) == ROUNDS  # exactly one loser per race, no other refusal
    reg = open_registry(registry)
    index = reg.index()
    expected = {}
    for r, round_packages in enumerate(plan):
        winners = [p for p in round_packages[2:] if codes[p][0] == 0]
        assert len(winners) == 1, [codes[p] for p in round_packages[2:]]
        for pkg in [*round_packages[:2], winners[0]]:
            package = load_package(pkg)
            expected[package.domain] = package.sha256
    assert reg.contents() == expected and index["version"] == 3 * ROUNDS
    assert reg.verify() == {d: "ok" for d in expected}
    root = Path(registry.removeprefix("file://")) if kind == "file-url" else Path(registry)
    on_disk = {f"{p.parent.name}/{p.name}" for p in (root / "packages").glob("*/*")}
    assert on_disk == {f"{d}/{sha[:16]}" for d, sha in expected.items()}  # refused publishes left no files
    assert not list((reg.root / ".staging").glob("*"))
    assert reg.gc() == []
