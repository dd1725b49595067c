"""Where a stage folder keeps its artifact: the one owner of that layout.

A training stage writes `<out>/model/` (a checkpoint) or `<out>/package/` (an expert package) beside `run/` and
`summary.json`; the merge stage and older layouts put the checkpoint at `<out>/` itself."""
from __future__ import annotations

from pathlib import Path

MODEL_DIR = "model"      # <out>/model: the checkpoint a training stage writes
PACKAGE_DIR = "package"  # <out>/package: the expert package the expert stage writes


def stage_artifact(stage_out: str | Path, marker: str = "config.json") -> Path | None:
    """The folder under `stage_out` that holds `marker` (config.json: a checkpoint; manifest.json: a package),
    or None when there is none."""
    stage_out = Path(stage_out)
    for candidate in (stage_out / MODEL_DIR, stage_out / PACKAGE_DIR, stage_out):
        if (candidate / marker).exists():
            return candidate
    return None
