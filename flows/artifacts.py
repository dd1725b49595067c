"""What the Prefect UI shows, under stable keys (each run adds a new version of the same artifact):

- `flexolmo-stages`      table: every stage of the last pipeline run: ran, up to date, failed or cancelled
- `flexolmo-outputs`     markdown: absolute paths of the outputs, the results table and the plots
- `flexolmo-eval-bpb`    table: held-out and gold bpb per variant (first: at small scale bpb is the signal)
- `flexolmo-eval-table`  table: task-group scores, only the variants and groups that ran
- `flexolmo-results`     markdown: the evaluation report (reports/results.md), plots embedded
- `flexolmo-release`     markdown: the current release of the re-merge flow (experts, hashes, held-out bpb)

Tables keep their columns in the order built here (`model` first): the UI shows a row's keys as they come."""
from __future__ import annotations

import base64
import json
import re
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
    rows = [{"stage": name, "state": "ran" if r["ran"] else "up to date", "seconds": round(r["seconds"], 1),
             "dvc_seconds": round(r["overhead_seconds"], 2), "outputs": ", ".join(r["outs"])}
            for name, r in summary["stages"].items()]
    rows += [{"stage": name, "state": "FAILED", "seconds": None, "dvc_seconds": None, "outputs": why}
             for name, why in summary["failed"].items()]
    rows += [{"stage": name, "state": "cancelled", "seconds": None, "dvc_seconds": None, "outputs": why}
             for name, why in summary.get("cancelled", {}).items()]
    create_table_artifact(key="flexolmo-stages", table=rows,
                          description=f"pipeline stages ({summary['wall_seconds']:.0f} s wall)")
    outs = sorted({o for r in summary["stages"].values() for o in r["outs"]})
    md = ["# FlexOlmo pipeline outputs", "", f"Repository: `{root}`", ""]
    md += [f"- {line}" for line in report_lines(root)]
    md += ["", "| output | exists |", "|---|---|"] + [f"| `{root / o}` | {(root / o).exists()} |" for o in outs]
    create_markdown_artifact(key="flexolmo-outputs", markdown="\n".join(md), description="where everything is")
    publish_results(root)


BPB_COLUMNS = {"domain bpb avg": "held-out bpb (mean over domains)", "gold bpb avg": "gold bpb (mean over groups)"}
SCORE_FIRST = ("Avg.", "groups ran")


def _table(rows: list[dict], columns: dict[str, str], digits: int) -> list[dict]:
    """`model` then `columns` (source key -> shown name) that hold a value somewhere, for the rows that have one."""
    present = [c for c in columns if any(r.get(c) is not None for r in rows)]
    kept = [r for r in rows if any(r.get(c) is not None for c in present if c != "groups ran")]
    return [{"model": r["model"], **{columns[c]: round(r[c], digits) if isinstance(r.get(c), float) else r.get(c)
                                     for c in present}} for r in kept]


def eval_tables(rows: list[dict]) -> dict[str, list[dict]]:
    """results_table.json's rows as the UI's two tables: bpb first, then the scores of what ran."""
    from flexolmo_core.evaluation.suite import GROUPS  # the paper's order (the JSON file's keys are sorted)

    groups = [g for g in GROUPS if any(g in r for r in rows)]
    scores = _table(rows, {**{c: c for c in SCORE_FIRST}, **{g: g for g in groups}}, 1)
    return {"flexolmo-eval-bpb": _table(rows, BPB_COLUMNS, 4),
            "flexolmo-eval-table": scores if any(len(r) > 2 for r in scores) else []}


def embed_plots(markdown: str, folder: Path) -> str:
    """Relative image links as data URIs: the UI serves no files, so a link to `plot.png` shows broken."""
    def inline(found: re.Match) -> str:
        path = folder / found.group(2)
        if not path.is_file():
            return found.group(0)
        return f"![{found.group(1)}](data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()})"

    return re.sub(r"!\[([^\]]*)\]\(([^)/:]+\.png)\)", inline, markdown)


def publish_results(root: Path) -> None:
    if (root / RESULTS_TABLE).exists():
        rows = json.loads((root / RESULTS_TABLE).read_text())
        for key, table in eval_tables(rows).items():
            if table:
                create_table_artifact(key=key, table=table, description=f"evaluation ({key.rsplit('-', 1)[-1]})")
    if (root / RESULTS_MD).exists():
        markdown = embed_plots((root / RESULTS_MD).read_text(), (root / RESULTS_MD).parent)
        create_markdown_artifact(key="flexolmo-results", markdown=markdown, description="evaluation report")


def publish_release(release: dict, previous: dict | None = None) -> None:
    md = [f"# Release v{release['version']}", "", f"Model: `{release['path']}`",
          f"Anchor: `{release['anchor_fingerprint']}`", f"Registry version: {release['registry_version']}", "",
          "| expert | package sha256 |", "|---|---|"]
    md += [f"| {d} | `{sha[:16]}` |" for d, sha in sorted(release["experts"].items())]
    if release.get("heldout_bpb") is not None:
        md += ["", "Held-out bpb (mean over the evaluated domains; lower is better):", "",
               "| release | held-out bpb | domains |", "|---|---|---|",
               f"| v{release['version']} (this) | {release['heldout_bpb']:.4f} | {', '.join(release['heldout_domains'])} |"]
        if previous and previous.get("heldout_bpb") is not None:
            md.append(f"| v{previous['version']} (previous) | {previous['heldout_bpb']:.4f} | "
                      f"{', '.join(previous['heldout_domains'])} |")
        elif previous:
            md.append(f"| v{previous['version']} (previous) | not evaluated | |")
    if release.get("check"):
        md += ["", f"Check: {release['check']}"]
    create_markdown_artifact(key="flexolmo-release", markdown="\n".join(md), description="current merged model")
