"""Stage `evaluate`: every model variant (built from outputs/merge) on the configured suites, then the report.

Writes outputs/evaluate/results/<variant>.json, outputs/evaluate/metrics.json, outputs/evaluate/plots/*.png
and reports/results.md (+ the same PNGs and results_table.json for the Prefect table artifact).
"""
from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

from flexolmo_core.atomic import atomic_dir
from flexolmo_core.evaluation import report, runner, variants
from flexolmo_core.params import load_section

OUT = Path("outputs/evaluate")
REPORTS = Path("reports")


def main(params: str = "params.yaml") -> int:
    cfg = load_section(runner.EvalConfig, "evaluate", params)
    merged = Path(cfg.merged_dir)
    if not (merged / "config.json").exists():
        print(f"evaluate: no merged checkpoint at {merged} (run the merge stage)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="flexolmo-variants-") as work, atomic_dir(OUT / "results") as results:
        for variant in variants.build_variants(merged, work, cfg.anchor_dir, cfg.extra_variants, cfg.btm_top_k):
            if cfg.variants and variant.name not in cfg.variants:
                continue
            task_names = runner.suites_for(variant.name, cfg)
            result = variants.evaluate_variant(variant, task_names, cfg, out_json=results / f"{variant.name}.json")
            ran = sum(r["status"] == "ok" for r in result["tasks"].values())
            print(f"evaluate: {variant.name}: {ran}/{len(task_names)} tasks in {result['seconds']} s", flush=True)
    report.write_report(OUT / "results", REPORTS, metrics_path=OUT / "metrics.json")
    plots = OUT / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    for png in REPORTS.glob("*.png"):
        shutil.copy2(png, plots / png.name)
    print(f"evaluate: report in {REPORTS / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
