"""What do DVC and Prefect cost on top of the work itself?

Each mode runs the whole pipeline from scratch in its own temporary clone of this working tree:

- direct:  one Python process runs every stage module in dvc.yaml's order (`runpy`, same arguments as
           the stage command): the same core functions, imported once, no DVC, no Prefect.
- dvc:     `dvc repro` (a subprocess per stage, hashing, dvc.lock, cache).
- prefect: `python -m flows.pipeline` (a flow run per stage, DVC status + commit per stage; `--workers 1`
           is the like-for-like comparison, more workers run the per-domain stages side by side).
- add:     after the dvc run, one more domain in params.yaml, then `dvc repro` again: the cost of adding
           one expert to an existing pipeline, against the first full run.

    python benchmarks/pipeline_overhead.py --preset smoke --domains code,math --add news
    python benchmarks/pipeline_overhead.py --preset tiny --modes direct,prefect --workers 1
    python benchmarks/pipeline_overhead.py --from-log run.log --wall 1800   (DVC's share of a real `make run`)

Writes benchmarks/results/pipeline_overhead_<preset>.json and prints a table. Per-stage times of the
dvc mode come from timestamps of DVC's "Running stage" lines (so they include that stage's process start
and DVC's own bookkeeping); prefect-mode per-stage times are the flow runs' command time and DVC time.
On a shared machine compare CPU seconds (all child processes, `getrusage`): wall time follows other load."""
from __future__ import annotations

import argparse
import json
import os
import resource
import runpy
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.machine import recorded_stamp

ROOT = Path(__file__).resolve().parents[1]


def direct_worker(root: Path) -> dict:
    """Run inside a fresh interpreter (see `direct`)."""
    os.chdir(root)
    sys.path.insert(0, str(root))  # the clone's own flows and tasks, not this checkout's
    from flows.stages import load_stages, set_root

    set_root(root)
    stages, times = load_stages(), {}
    start = time.perf_counter()
    for stage in stages:
        argv = shlex.split(stage.cmd)
        assert argv[:2] == ["python", "-m"], stage.cmd
        t = time.perf_counter()
        sys.argv = [argv[2], *argv[3:]]
        try:
            runpy.run_module(argv[2], run_name="__main__", alter_sys=True)
        except SystemExit as exit_:
            if exit_.code not in (0, None):
                raise RuntimeError(f"{stage.name} exited with {exit_.code}") from None
        times[stage.name] = round(time.perf_counter() - t, 2)
    return {"stages": times, "total": round(time.perf_counter() - start, 2)}


def direct(root: Path, env: dict) -> dict:
    start = time.perf_counter()
    out = subprocess.run([sys.executable, __file__, "_direct", str(root)], cwd=root, env=env, capture_output=True,
                         text=True)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["process_wall"] = round(time.perf_counter() - start, 2)
    return result


def dvc_repro(root: Path, env: dict, *args: str) -> dict:
    from benchmarks.harness import dvc

    start = time.perf_counter()
    marks: list[tuple[str, float]] = []
    proc = subprocess.Popen([dvc(), "repro", *args], cwd=root, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    tail: list[str] = []
    for line in proc.stdout:
        tail = (tail + [line])[-40:]
        if line.startswith("Running stage '"):
            marks.append((line.split("'")[1], time.perf_counter()))
    if proc.wait():
        raise RuntimeError(f"dvc repro failed in {root}:\n{''.join(tail)}")
    end = time.perf_counter()
    stages = {name: round((marks[i + 1][1] if i + 1 < len(marks) else end) - t, 2) for i, (name, t) in enumerate(marks)}
    return {"stages": stages, "total": round(end - start, 2)}


def prefect(root: Path, env: dict, workers: int) -> dict:
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "flows.pipeline", "--root", str(root), "--json", "--workers",
                          str(workers)], cwd=root, env={**env, "PREFECT_LOGGING_LEVEL": "WARNING"},
                         capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stdout[-2000:] + out.stderr[-3000:])
    text = out.stdout
    summary = json.loads(text[text.index("{\n"): text.rindex("\n}") + 2])
    return {"stages": {n: round(r["seconds"] + r["overhead_seconds"], 2) for n, r in summary["stages"].items()},
            "command_seconds": {n: round(r["seconds"], 2) for n, r in summary["stages"].items()},
            "dvc_seconds": {n: round(r["overhead_seconds"], 2) for n, r in summary["stages"].items()},
            "flow_wall": summary["wall_seconds"], "total": round(time.perf_counter() - start, 2), "workers": workers}


def children_cpu() -> float:
    """CPU seconds of every finished child process tree: robust to other load on a shared machine,
    where wall time is not."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def from_log(path: Path, wall: float | None) -> dict:
    """DVC's (or Prefect + DVC's) own share of a real run, from the `[stage-time]` lines every stage process
    prints at exit (tasks/__init__.py): wall time when no stage process was running (hashing, cache, dvc.lock,
    flow-run bookkeeping, process start) against the time some stage was running. The stages' own imports count as work here; the `direct` mode measures them."""
    import re

    pattern = re.compile(r"\[stage-time\] (\S+) start=([\d.]+) end=([\d.]+) seconds=([\d.]+)")
    runs = [(m[1], float(m[2]), float(m[3])) for m in pattern.finditer(Path(path).read_text(errors="replace"))]
    if not runs:
        raise SystemExit(f"{path}: no [stage-time] lines (was it written by `dvc repro` of this project?)")
    inside, covered_to = 0.0, float("-inf")  # the union of the stage intervals: stages may run side by side
    for _, start, end in sorted(runs, key=lambda r: r[1]):
        if end > covered_to:
            inside += end - max(start, covered_to)
            covered_to = end
    span = max(r[2] for r in runs) - min(r[1] for r in runs)
    wall = wall or span
    stages = {}
    for name, start, end in runs:
        key = name.removeprefix("tasks.")
        stages[key] = round(stages.get(key, 0.0) + end - start, 2)
    outside = wall - inside
    return {"log": str(path), "stages": stages, "stage_processes": len(runs), "inside_stages": round(inside, 2),
            "total": round(wall, 2), "outside_stages": round(outside, 2),
            "overhead_vs_inside": round(outside / inside, 4)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from-log", default=None, metavar="LOG",
                        help="no new run: read the [stage-time] lines of a `dvc repro` log (e.g. `make run`)")
    parser.add_argument("--wall", type=float, default=None, help="with --from-log: the run's total wall seconds")
    parser.add_argument("--preset", default="smoke")
    parser.add_argument("--domains", default="code,math")
    parser.add_argument("--modes", default="direct,dvc,prefect")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--add", default=None, help="a domain to add after the dvc run (the add-an-expert cost)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.from_log:
        report = {"cpus": os.cpu_count(), "loadavg": os.getloadavg(), "recorded": recorded_stamp(),
                  **from_log(Path(args.from_log), args.wall)}
        for name, seconds in report["stages"].items():
            print(f"{name:>28} {seconds:>9.2f} s")
        print(f"inside {report['stage_processes']} stage processes: {report['inside_stages']} s; total "
              f"{report['total']} s; outside (orchestration: DVC, Prefect, process start): {report['outside_stages']} s = "
              f"{report['overhead_vs_inside']:+.1%}")
        if args.out:
            Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        return 0
    import yaml

    from benchmarks.harness import clone_env, make_clone, set_domains

    domains = [d for d in args.domains.split(",") if d]
    modes = args.modes.split(",")
    report: dict = {"preset": args.preset, "domains": domains, "cpus": os.cpu_count(),
                    "loadavg_at_start": os.getloadavg(), "modes": {}}
    with tempfile.TemporaryDirectory(prefix="pipeline-overhead-") as tmp:
        for mode in modes:
            root = make_clone(Path(tmp) / mode / "repo", domains, preset=args.preset)
            env = clone_env(root)
            env.pop("OMP_NUM_THREADS", None)  # every mode uses the library default threads
            print(f"[{mode}] running in {root}", flush=True)
            cpu0 = children_cpu()
            if mode == "direct":
                report["modes"][mode] = direct(root, env)
            elif mode == "dvc":
                report["modes"][mode] = dvc_repro(root, env)
                if args.add:
                    report["modes"][mode]["cpu"] = round(children_cpu() - cpu0, 2)
                    params = yaml.safe_load((root / "params.yaml").read_text())
                    set_domains(root, {**params["domains"], args.add: {}})
                    cpu0 = children_cpu()
                    report["modes"]["add"] = {"domain": args.add, **dvc_repro(root, env),
                                              "cpu": round(children_cpu() - cpu0, 2)}
                    cpu0 = None
            elif mode == "prefect":
                report["modes"][mode] = prefect(root, env, args.workers)
            if cpu0 is not None:
                report["modes"][mode]["cpu"] = round(children_cpu() - cpu0, 2)
            print(f"[{mode}] {report['modes'][mode]['total']} s wall, {report['modes'][mode]['cpu']} s CPU", flush=True)
    base = report["modes"].get("direct")
    if base:
        for mode in ("dvc", "prefect"):
            if mode in report["modes"]:
                r = report["modes"][mode]
                r["overhead_vs_direct"] = round(r["total"] / base["total"] - 1, 4)
                r["cpu_overhead_vs_direct"] = round(r["cpu"] / base["cpu"] - 1, 4)
                r["overhead_per_stage"] = {n: round(r["stages"].get(n, 0.0) - t, 2) for n, t in base["stages"].items()}
    if "add" in report["modes"] and "dvc" in report["modes"]:
        add, first = report["modes"]["add"], report["modes"]["dvc"]
        add["ratio_to_first_run"] = round(add["total"] / first["total"], 4)
        add["cpu_ratio_to_first_run"] = round(add["cpu"] / first["cpu"], 4)
    report["loadavg_at_end"] = os.getloadavg()  # other work on the machine inflates wall times
    report["recorded"] = recorded_stamp()
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"pipeline_overhead_{args.preset}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    names = list(dict.fromkeys(n for m in report["modes"].values() for n in m["stages"]))
    header = ["stage"] + [m for m in ("direct", "dvc", "prefect", "add") if m in report["modes"]]
    print(" | ".join(f"{h:>24}" for h in header))
    for n in names + ["TOTAL wall", "TOTAL CPU"]:
        key = {"TOTAL wall": "total", "TOTAL CPU": "cpu"}.get(n)
        row = [n] + [str(report["modes"][m][key] if key else report["modes"][m]["stages"].get(n, "-"))
                     for m in header[1:]]
        print(" | ".join(f"{c:>24}" for c in row))
    for mode in ("dvc", "prefect"):
        if "overhead_vs_direct" in report["modes"].get(mode, {}):
            r = report["modes"][mode]
            print(f"{mode}: {r['overhead_vs_direct']:+.1%} wall, {r['cpu_overhead_vs_direct']:+.1%} CPU vs direct")
    if "ratio_to_first_run" in report["modes"].get("add", {}):
        add = report["modes"]["add"]
        print(f"adding one expert: {add['ratio_to_first_run']:.1%} of the first full run's wall time, "
              f"{add['cpu_ratio_to_first_run']:.1%} of its CPU time")
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "_direct":
        print(json.dumps(direct_worker(Path(sys.argv[2]))))
        sys.exit(0)
    sys.exit(main())
