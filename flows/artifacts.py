"""What the Prefect UI shows, under stable keys (each run adds a new version of the same artifact):

- `flexolmo-stages`      table: every stage of the last pipeline run, ran or up to date, seconds, outputs
- `flexolmo-outputs`     markdown: absolute paths of the outputs, the results table and the plots
- `flexolmo-results`     markdown: the evaluation report (reports/results.md)
- `flexolmo-eval-table`  table: one row per model variant (reports/results_table.json)
- `flexolmo-release`     markdown: the current release of the re-merge flow (experts, hashes, path)"""
from __future__ import annotations

import json
from pathlib import Path

from prefect.artifacts import create_markdown_artifact, create_table_artifact

RESULTS_MD = Path("reports/results.md")
RESULTS_TABLE = Path("reports/results_table.json")
PLOTS = Path("outputs/evaluate/plots")


def report_lines(root: Path) -> list[str]:
    """The lines printed at the end of a run: where the results are."""
    lines = []
    if (root / RESULTS_MD).exists():
        lines.append(f"results table: {root / RESULTS_MD}")
    plots = sorted((root / PLOTS).glob("*.png")) if (root / PLOTS).exists() else []
    if plots:
        lines.append(f"plots: {root / PLOTS}/ ({', '.join(p.name for p in plots)})")
    if (root / "outputs/merge/flexolmo").exists():
        lines.append(f"merged model: {root / 'outputs/merge/flexolmo'}")
    return lines or ["no results yet (the evaluate stage has not run)"]


def publish_pipeline(summary: dict, root: Path) -> None:
    rows = [{"stage": name, "ran": r["ran"], "seconds": round(r["seconds"], 1),
             "dvc_seconds": round(r["overhead_seconds"], 2), "outputs": ", ".join(r["outs"])}
            for name, r in summary["stages"].items()]
    rows += [{"stage": name, "ran": False, "seconds": None, "dvc_seconds": None, "outputs": "FAILED / not run"}
             for name in summary["failed"]]
    create_table_artifact(key="flexolmo-stages", table=rows,
                          description=f"pipeline stages ({summary['wall_seconds']:.0f} s wall)")
    outs = sorted({o for r in summary["stages"].values() for o in r["outs"]})
    md = ["# FlexOlmo pipeline outputs", "", f"Repository: `{root}`", ""]
    md += [f"- {line}" for line in report_lines(root)]
    md += ["", "| output | exists |", "|---|---|"] + [f"| `{root / o}` | {(root / o).exists()} |" for o in outs]
    create_markdown_artifact(key="flexolmo-outputs", markdown="\n".join(md), description="where everything is")
    publish_results(root)


def publish_results(root: Path) -> None:
    if (root / RESULTS_MD).exists():
        create_markdown_artifact(key="flexolmo-results", markdown=(root / RESULTS_MD).read_text(),
                                 description="evaluation report")
    if (root / RESULTS_TABLE).exists():
        table = json.loads((root / RESULTS_TABLE).read_text())
        if table:
            create_table_artifact(key="flexolmo-eval-table", table=table, description="evaluation, one row per variant")


def publish_release(release: dict) -> None:
    md = [f"# Release v{release['version']}", "", f"Model: `{release['path']}`",
          f"Anchor: `{release['anchor_fingerprint']}`", f"Registry version: {release['registry_version']}", "",
          "| expert | package sha256 |", "|---|---|"]
    md += [f"| {d} | `{sha[:16]}` |" for d, sha in sorted(release["experts"].items())]
    if release.get("check"):
        md += ["", f"Check: {release['check']}"]
    create_markdown_artifact(key="flexolmo-release", markdown="\n".join(md), description="current merged model")
