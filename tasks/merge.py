"""DVC stage `merge`: outputs/anchor + outputs/expert/<d> -> outputs/merge/<variant>/ (no training).

Variants (`flexolmo_core/merge/variants.py`): `flexolmo` (every domain in params.yaml), `optout_<d>`, `dense_<d>`
and `soup`. `outputs/merge/index.json` lists them with the experts each contains. The whole folder is replaced in
one rename."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from flexolmo_core.expert.package import MANIFEST_FILE
from flexolmo_core.io.artifacts import stage_artifact
from flexolmo_core.io.atomic import atomic_dir, write_json
from flexolmo_core.io.params import load_section, read_params
from flexolmo_core.merge.variants import MergeConfig, merge_variants
from tasks import run

ANCHOR = Path("outputs/anchor")
EXPERTS = Path("outputs/expert")
OUT = Path("outputs/merge")


def main(params: str = "params.yaml") -> int:
    cfg = load_section(MergeConfig, "merge", params)
    domains = sorted(read_params(params).get("domains") or {})
    if not domains:
        print(f"merge: {params} lists no domains", file=sys.stderr)
        return 2
    packages = {d: stage_artifact(EXPERTS / d, MANIFEST_FILE) for d in domains}
    missing = [d for d, p in packages.items() if p is None]
    if missing:
        print(f"merge: no expert package for {missing} under {EXPERTS} (run the expert stages)", file=sys.stderr)
        return 2
    start = time.perf_counter()
    with atomic_dir(OUT) as tmp:
        index = merge_variants(cfg, stage_artifact(ANCHOR) or ANCHOR, packages, tmp, OUT)
        write_json(tmp / "index.json", {"variants": index, "domains": domains, "top_k": cfg.top_k})
    print(json.dumps({"variants": sorted(index), "seconds": round(time.perf_counter() - start, 1)}))
    return 0


if __name__ == "__main__":
    run(main)
