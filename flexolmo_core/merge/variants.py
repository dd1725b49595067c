"""The merge stage's variants, written side by side: `flexolmo` (every package), `optout_<d>` (the exact
opt-out model: `opt_out` of the full merge without d), and the baselines of `merge/baselines.py`: `dense_<d>` (one
expert alone as a dense model, public included) and `soup` (mean FFN of the dense experts)."""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from flexolmo_core.io.stream_safetensors import parse_size
from flexolmo_core.merge import baselines
from flexolmo_core.merge.merging import merge, opt_out


@dataclass
class MergeConfig:
    """`merge` section of params.yaml."""

    top_k: int | None = None  # experts per token; None = half of (public + domains), rounded up
    opt_out: bool = True  # one opt-out variant per domain (the model merged without it)
    dense_experts: bool = True  # each expert alone as a dense Olmo2 model (baseline)
    soup: bool = True  # mean FFN of the dense experts (baseline; needs dense_experts)
    shard_size: str = "5GB"  # weights past this are split into model-0000k-of-0000N.safetensors + index (transformers' layout)
    router_scale: float = 1.0  # multiplies every router row: 1/temperature of the router softmax (1 = the paper)


def merge_variants(cfg: MergeConfig, anchor: Path, packages: dict[str, Path], out: Path, index_root: Path) -> dict:
    """Write every variant under `out`; returns the index (variant -> experts, path under `index_root`, seconds)."""
    index: dict[str, dict] = {}

    def timed(name: str, fn) -> None:
        start = time.perf_counter()
        experts = fn(out / name)
        index[name] = {"path": str(Path(index_root) / name), "experts": experts, "seconds": round(time.perf_counter() - start, 3)}
        print(f"merge: {name} ({', '.join(experts)}) in {index[name]['seconds']} s", flush=True)

    shard = parse_size(cfg.shard_size)
    paths = [packages[d] for d in sorted(packages)]
    domains_of = lambda manifest: [e["domain"] for e in manifest["experts"]]  # noqa: E731
    timed("flexolmo", lambda o: domains_of(merge(anchor, paths, o, top_k=cfg.top_k, shard_bytes=shard,
                                                           router_scale=cfg.router_scale)))
    if cfg.opt_out and len(packages) > 1:
        for d in sorted(packages):
            # top_k is re-derived for the smaller model unless fixed in params (clipped to its expert count)
            top_k = None if cfg.top_k is None else min(cfg.top_k, len(packages))
            timed(f"optout_{d}", lambda o, d=d, k=top_k: domains_of(opt_out(out / "flexolmo", [d], o, top_k=k, shard_bytes=shard)))
    if cfg.dense_experts or cfg.soup:
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
