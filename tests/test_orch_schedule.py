"""The scheduled re-merge, proven against a real Prefect server (`prefect server start`, with its scheduler):
`flows.deploy serve --cron '* * * * *'` must start a run by itself that merges the registry into a release,
and the server's log must hold no traceback (SQLAlchemy 2.1 once broke the scheduler in a loop: constraints.txt)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.harness import start_prefect_server, stop, wait_for

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_a_scheduled_remerge_starts_by_itself_and_publishes_a_release(tmp_path, smoke_anchor, packages):
    from flexolmo_core.registry.local import Registry

    registry, releases = tmp_path / "registry", tmp_path / "releases"
    Registry(registry).init(smoke_anchor)
    Registry(registry).publish(packages["code"])  # published by hand: no event, only the schedule can see it
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PREFECT_LOGGING_LEVEL": "WARNING", "OMP_NUM_THREADS": "1"}
    server_log, serve_log = tmp_path / "server.log", tmp_path / "serve.log"
    server, env = start_prefect_server(tmp_path / "prefect", env, server_log)
    served = None
    try:
        served = subprocess.Popen([sys.executable, "-m", "flows.deploy", "serve", "--registry", str(registry),
                                   "--anchor", str(smoke_anchor), "--releases", str(releases), "--cron", "* * * * *",
                                   "--no-evaluate", "--params", str(ROOT / "params.yaml")], env=env, cwd=ROOT,
                                  stdout=serve_log.open("w"), stderr=subprocess.STDOUT)
        current = releases / "current.json"

        def released():
            assert "Traceback" not in server_log.read_text(), server_log.read_text()[-4000:]  # fail fast, e.g. the scheduler
            return current.exists() and json.loads(current.read_text())

        release = wait_for(released, 240, "a scheduled run to publish a release", poll=2.0)
        assert release["version"] == 1 and set(release["experts"]) == {"code"}
        merged = json.loads((Path(release["path"]) / "flexolmo.json").read_text())
        assert [e["domain"] for e in merged["experts"]] == ["public", "code"]
        assert "Traceback" not in server_log.read_text(), server_log.read_text()[-4000:]
    finally:
        stop(served)
        stop(server)
        print("---- server log (tail) ----\n" + server_log.read_text()[-3000:])
        if serve_log.exists():
            print("---- serve log (tail) ----\n" + serve_log.read_text()[-3000:])
