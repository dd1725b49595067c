"""DVC stage `merge`: outputs/anchor + outputs/expert/<d> -> outputs/merge/<variant>/ (no training).

Variants: `flexolmo` (every domain in params.yaml), `optout_<d>` (merged without d: the exact opt-out
model, `merge.opt_out` of the full merge), and the baselines from flexolmo_core/merge/baselines.py: `dense_<d>` (one expert alone as a dense
model, public included) and `soup` (mean FFN of the dense experts). `outputs/merge/index.json` lists
them with the experts each contains. The whole folder is replaced in one rename."""
from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from flexolmo_core.io.atomic import atomic_dir, write_json
from flexolmo_core.io.params import load_section, read_params
from flexolmo_core.merge.merging import merge, opt_out
from tasks import run

ANCHOR = Path("outputs/anchor")
EXPERTS = Path("outputs/expert")
OUT = Path("outputs/merge")


@dataclass
class MergeConfig:
    """`merge` section of params.yaml."""

    top_k: int | None = None  # experts per token; None = half of (public + domains), rounded up
    opt_out: bool = True  # one opt-out variant per domain (the model merged without it)
    dense_experts: bool = True  # each expert alone as a dense Olmo2 model (baseline)
    soup: bool = True  # mean FFN of the dense experts (baseline; needs dense_experts)
    shard_size: str = "5GB"  # weights past this are split into model-0000k-of-0000N.safetensors + index (transformers' layout)


def artifact_dir(stage_out: Path, marker: str) -> Path:
    """A training stage writes its artifact to `<out>/model/` or `<out>/package/` next to run/ and
    summary.json; older layouts put it at `<out>/` itself."""
    for candidate in (stage_out / "model", stage_out / "package", stage_out):
        if (candidate / marker).exists():
            return candidate
    return stage_out


def build_variants(cfg: MergeConfig, anchor: Path, packages: dict[str, Path], out: Path) -> dict:
    """Write every variant under `out`; returns the index (variant -> experts, path, seconds)."""
    index: dict[str, dict] = {}

    def timed(name: str, fn) -> None:
        start = time.perf_counter()
        experts = fn(out / name)
        index[name] = {"path": str(OUT / name), "experts": experts, "seconds": round(time.perf_counter() - start, 3)}
        print(f"merge: {name} ({', '.join(experts)}) in {index[name]['seconds']} s", flush=True)

    from flexolmo_core.io.stream_safetensors import parse_size

    shard = parse_size(cfg.shard_size)
    paths = [packages[d] for d in sorted(packages)]
    domains_of = lambda manifest: [e["domain"] for e in manifest["experts"]]  # noqa: E731
    timed("flexolmo", lambda o: domains_of(merge(anchor, paths, o, top_k=cfg.top_k, shard_bytes=shard)))
    if cfg.opt_out and len(packages) > 1:
        for d in sorted(packages):
            # top_k is re-derived for the smaller model unless fixed in params (clipped to its expert count)
            top_k = None if cfg.top_k is None else min(cfg.top_k, len(packages))
            timed(f"optout_{d}", lambda o, d=d, k=top_k: domains_of(opt_out(out / "flexolmo", [d], o, top_k=k, shard_bytes=shard)))
    if cfg.dense_experts or cfg.soup:
        from flexolmo_core.merge import baselines

        names = ["public", *sorted(packages)]
        for i, d in enumerate(names):
            timed(f"dense_{d}", lambda o, i=i, d=d: baselines.extract_dense_expert(out / "flexolmo", i, o, shard) and [d])
        if cfg.soup:
            timed("soup", lambda o: baselines.model_soup([out / f"dense_{d}" for d in names], o,
                                                                         shard_bytes=shard) and names)
        if not cfg.dense_experts:  # built only as the soup's ingredients
            for d in names:
                shutil.rmtree(out / f"dense_{d}")
                index.pop(f"dense_{d}")
    return index


def main(params: str = "params.yaml") -> int:
    cfg = load_section(MergeConfig, "merge", params)
    domains = sorted(read_params(params).get("domains") or {})
    if not domains:
        print(f"merge: {params} lists no domains", file=sys.stderr)
        return 2
    packages = {d: artifact_dir(EXPERTS / d, "manifest.json") for d in domains}
    missing = [d for d, p in packages.items() if not (p / "manifest.json").exists()]
    if missing:
        print(f"merge: no expert package for {missing} under {EXPERTS} (run the expert stages)", file=sys.stderr)
        return 2
    start = time.perf_counter()
    with atomic_dir(OUT) as tmp:
        index = build_variants(cfg, artifact_dir(ANCHOR, "config.json"), packages, tmp)
        write_json(tmp / "index.json", {"variants": index, "domains": domains, "top_k": cfg.top_k})
    print(json.dumps({"variants": sorted(index), "seconds": round(time.perf_counter() - start, 1)}))
    return 0


if __name__ == "__main__":
    run(main)
