"""Stage `evaluate`: every model variant (built from outputs/merge) on the configured suites, then the report.

Writes outputs/evaluate/results/<variant>.json, outputs/evaluate/heldout_bpb.json (the headline metrics), outputs/evaluate/plots/*.png
and reports/results.md (+ the same PNGs and results_table.json for the Prefect table artifact).
"""
from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from flexolmo_core.evaluation import report, runner, variants
from flexolmo_core.io.atomic import atomic_dir
from flexolmo_core.merge.merging import expert_domains
from flexolmo_core.training.config import load_stage
from tasks import NUMERICS, run

OUT = Path("outputs/evaluate")
REPORTS = Path("reports")


def _evaluate_job(job) -> dict:
    variant, task_names, cfg, out_json = job
    return variants.evaluate_variant(variant, task_names, cfg, out_json=out_json)


def _worker_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def run_jobs(jobs: list, cfg: runner.EvalConfig):
    """Yield each variant's result. With workers > 1, variants run side by side in spawned processes (small
    models use 2 cores better as two 1-thread processes than as one 2-thread process), costliest first."""
    if cfg.workers <= 1:
        if cfg.threads:
            _worker_threads(cfg.threads)
        for job in jobs:
            yield _evaluate_job(job)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    cost = {"btm": 0, "prompt_routing": 1, "flexolmo": 2, "flexolmo_rt": 2, "unrestricted": 2}
    ordered = sorted(jobs, key=lambda j: (cost.get(j[0].name, 3), -len(j[1])))
    with ProcessPoolExecutor(cfg.workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_worker_threads, initargs=(cfg.threads or 1,)) as pool:
        for future in as_completed([pool.submit(_evaluate_job, job) for job in ordered]):
            yield future.result()


def eta(elapsed: float, done: int, total: int) -> str:
    """Time left if the remaining variants cost what the finished ones did on average (the light ones are
    cheaper, so it errs long)."""
    left = elapsed / done * (total - done)
    return "done" if done == total else f"about {left / 60:.1f} min left ({elapsed / 60:.1f} min so far)"


def main(params: str = "params.yaml") -> int:
    _, cfg, _ = load_stage(runner.EvalConfig, "evaluate", params)  # with the preset's overrides
    merged = Path(cfg.merged_dir)
    if not (merged / "config.json").exists():
        print(f"evaluate: no merged checkpoint at {merged} (run the merge stage)", file=sys.stderr)
        return 2
    if cfg.domains is None:  # the held-out domains are the merged model's experts: public + params.yaml's domains
        cfg.domains = expert_domains(merged)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="flexolmo-variants-") as work, atomic_dir(OUT / "results") as results:
        chosen = [v for v in variants.build_variants(merged, work, cfg.anchor_dir, cfg.extra_variants, cfg.btm_top_k)
                  if runner.selected(v.name, cfg)]
        jobs = [(v, runner.suites_for(v.name, cfg), cfg, results / f"{v.name}.json") for v in chosen]
        print(f"evaluate: {len(jobs)} variants, {cfg.workers} worker(s); built in {time.perf_counter() - start:.1f} s",
              flush=True)
        began = time.perf_counter()
        for done, result in enumerate(run_jobs(jobs, cfg), 1):
            ran = sum(r["status"] == "ok" for r in result["tasks"].values())
            print(f"evaluate: [{done}/{len(jobs)}] {result['variant']}: {ran}/{len(result['tasks'])} tasks in "
                  f"{result['seconds']} s; {eta(time.perf_counter() - began, done, len(jobs))}", flush=True)
    numerics = json.loads(NUMERICS.read_text()) if NUMERICS.exists() else None
    report.write_report(OUT / "results", REPORTS, metrics_path=OUT / "heldout_bpb.json", numerics=numerics)
    plots = OUT / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    for png in REPORTS.glob("*.png"):
        shutil.copy2(png, plots / png.name)
    print(f"evaluate: report in {REPORTS / 'results.md'}")
    return 0


if __name__ == "__main__":
    run(main)
