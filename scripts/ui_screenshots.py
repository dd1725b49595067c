"""Screenshots of the Prefect UI after a smoke run, taken in headless Chromium (Debian's `chromium`), to check
what a person sees: the pipeline run, a stage's own logs and progress artifact, the evaluation artifacts, and
a failed run whose running sibling was cancelled.

    python scripts/ui_screenshots.py --out runs/ui-screens      # about 3 minutes on 2 cores

It clones this working tree at the `smoke` preset (benchmarks/harness.py), starts `prefect server start`
on a free port, runs `python -m flows.pipeline` twice (once through, then with `domains.math.steps: 0` so
expert@math fails while expert@code trains and is cancelled), and writes one PNG per page with the run ids in `pages.json`."""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars"]


def api(url: str, path: str, body: dict | None = None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"},
                                     method="POST" if body is not None else "GET")
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def screenshot(chromium: str, page: str, out: Path, size: str = "1600,1100", wait_ms: int = 12000) -> None:
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={size}",
                        f"--virtual-time-budget={wait_ms}", f"--screenshot={out}", page],
                       check=True, capture_output=True, timeout=120)
    print(f"  {out.name}: {page}", flush=True)


def run_pipeline(clone: Path, env: dict) -> int:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "flows.pipeline", "--workers", "2"], cwd=clone, env=env,
                          capture_output=True, text=True)
    print(f"pipeline: exit {proc.returncode} in {time.perf_counter() - start:.0f} s", flush=True)
    return proc.returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/ui-screens", help="folder for the PNGs and pages.json")
    parser.add_argument("--keep", action="store_true", help="keep the temporary clone and server home")
    args = parser.parse_args(argv)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        print("needs Debian's chromium: apt-get install -y chromium", file=sys.stderr)
        return 2
    from benchmarks.harness import clone_env, make_clone, set_domains, start_prefect_server, stop

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="ui-screens-"))
    clone = make_clone(work / "repo", ["code", "math"])
    server, env = start_prefect_server(work / "prefect", clone_env(clone), work / "server.log")
    url = env["PREFECT_API_URL"].removesuffix("/api")
    pages = {}
    try:
        run_pipeline(clone, env)
        set_domains(clone, {"code": {"steps": 400}, "math": {"steps": 0}})  # math fails at once, code is training
        failed_rc = run_pipeline(clone, env)
        runs = api(f"{url}/api", "/flow_runs/filter", {"sort": "START_TIME_ASC", "limit": 200})
        parents = [r for r in runs if r["parent_task_run_id"] is None]
        by_name = {}
        for r in runs:
            by_name.setdefault(r["name"], []).append(r)
        first, second = parents[0], parents[-1]
        expert = by_name["expert@code"][0]
        def artifact(body: dict) -> str:
            found = api(f"{url}/api", "/artifacts/filter", {"artifacts": body, "sort": "CREATED_DESC", "limit": 1})
            return f"{url}/artifacts/artifact/{found[0]['id']}" if found else f"{url}/artifacts"

        def latest(key: str) -> str:
            return artifact({"key": {"any_": [key]}})

        pages = {"pipeline": f"{url}/runs/flow-run/{first['id']}",
                 "stage_logs": f"{url}/runs/flow-run/{expert['id']}",
                 "stage_progress": artifact({"flow_run_id": {"any_": [expert["id"]]}, "type": {"any_": ["progress"]}}),
                 "evaluate_logs": f"{url}/runs/flow-run/{by_name['evaluate'][0]['id']}",
                 "eval_bpb": latest("flexolmo-eval-bpb"), "eval_table": latest("flexolmo-eval-table"),
                 "results": latest("flexolmo-results"), "stages_table": latest("flexolmo-stages"),
                 "failed_pipeline": f"{url}/runs/flow-run/{second['id']}",
                 "failed_stage_logs": f"{url}/runs/flow-run/{by_name['expert@math'][-1]['id']}",
                 "cancelled_stage_logs": f"{url}/runs/flow-run/{by_name['expert@code'][-1]['id']}",
                 "runs": f"{url}/runs"}
        tall = {"results": "1600,7600", "evaluate_logs": "1600,2000", "failed_pipeline": "1600,3000",
                "failed_stage_logs": "1600,2200"}
        for name, page in pages.items():
            screenshot(chromium, page, out / f"{name}.png", size=tall.get(name, "1600,1100"))
        states = {r["name"]: r["state_type"] for r in runs if r["id"] not in (first["id"],)}
        (out / "pages.json").write_text(json.dumps({"pages": pages, "second_run_exit": failed_rc,
                                                    "last_states": states}, indent=2))
    finally:
        stop(server)
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(f"screenshots in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
