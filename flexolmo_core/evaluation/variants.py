"""Every model variant of the paper, built from a merged FlexOlmo checkpoint (plus optional extra dirs),
and the evaluation of one variant into one result JSON.

Built here from HF checkpoints only (no training): public (the anchor), dense_<d> (expert alone as a dense
model), owner_<d> (the owner's 2-expert model = public + d, sliced from the merge), soup, btm,
prompt_routing, flexolmo, optout_<d>. From elsewhere (dirs given in params): flexolmo_rt, unrestricted, ...
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from flexolmo_core.anchor.families import is_moe
from flexolmo_core.evaluation import runner, sources
from flexolmo_core.evaluation.routing import routing_share
from flexolmo_core.inference.model import load_flexolmo
from flexolmo_core.io.artifacts import stage_artifact
from flexolmo_core.io.atomic import write_json
from flexolmo_core.merge import baselines
from flexolmo_core.merge.merging import expert_domains, opt_out, read_manifest


@dataclasses.dataclass
class Variant:
    name: str
    kind: str                 # hf | btm | prompt_routing
    paths: list[str]          # hf: [dir]; btm: dense dirs; prompt_routing: [merged dir]
    flexolmo: bool = False    # record routing shares
    note: str = ""


def merge_index(merged_dir) -> dict[str, str]:
    """Variants the merge stage already wrote (`<merge out>/index.json`: flexolmo, optout_<d>, dense_<d>,
    soup); reused as they are instead of being rebuilt."""
    index = Path(merged_dir).parent / "index.json"
    if not index.exists():
        return {}
    found = json.loads(index.read_text()).get("variants", {})
    return {name: str(Path(merged_dir).parent / name) for name in found
            if (Path(merged_dir).parent / name / "config.json").exists()}


def build_variants(merged_dir, work_dir, anchor_dir=None, extra: dict[str, str] | None = None,
                   btm_top_k: int = 2) -> list[Variant]:
    """List every variant to evaluate; baselines the merge stage did not write are built under `work_dir`."""
    merged_dir, work_dir = Path(merged_dir), Path(work_dir)
    domains = expert_domains(merged_dir)
    n = len(domains)
    existing = merge_index(merged_dir)
    merged_k = read_manifest(merged_dir)["top_k"]

    def build(name, fn):
        if name in existing:
            return existing[name]
        out = work_dir / name
        if not (out / "config.json").exists():  # cheap to rebuild, but reuse within one run
            fn(out)
        return str(out)

    dense = [build(f"dense_{d}", lambda o, i=i: baselines.extract_dense_expert(merged_dir, i, o))
             for i, d in enumerate(domains)]
    anchor = stage_artifact(anchor_dir) if anchor_dir else None
    public = str(anchor) if anchor else dense[0]
    out = [Variant("public", "hf", [public], note="anchor" if public != dense[0] else "expert 0 of the merge "
                   "(bit-identical to the anchor by construction)")]
    for i, d in enumerate(domains[1:], start=1):
        out.append(Variant(f"dense_{d}", "hf", [dense[i]], note="domain FFN alone in a dense model"))
        others = [x for x in domains[1:] if x != d]
        owner = build(f"owner_{d}", lambda o, others=others: opt_out(merged_dir, others, o, top_k=2))
        out.append(Variant(f"owner_{d}", "hf", [owner], flexolmo=True, note="public + this expert, top-2"))
    # Soup over every expert FFN, public included (all share the anchor's non-FFN weights).
    out.append(Variant("soup", "hf", [build("soup", lambda o: baselines.model_soup(dense, o))], note="mean FFN"))
    out.append(Variant("btm", "btm", dense, note=f"ensemble of {n} dense experts, top-{btm_top_k} by prefix posterior"))
    out.append(Variant("prompt_routing", "prompt_routing", [str(merged_dir)],
                       note="one expert per input by cosine to layer-0 router rows"))
    out.append(Variant("flexolmo", "hf", [str(merged_dir)], flexolmo=True, note="all experts"))
    for d in domains[1:]:
        path = build(f"optout_{d}", lambda o, d=d: opt_out(merged_dir, [d], o, top_k=min(merged_k, n - 1)))
        out.append(Variant(f"optout_{d}", "hf", [path], flexolmo=True, note=f"merged without the {d} expert"))
    for name, path in (extra or {}).items():
        path = stage_artifact(path) or Path(path)  # missing -> evaluated as `not run` with the reason
        cfg = Path(path) / "config.json"
        moe = cfg.exists() and is_moe(json.loads(cfg.read_text()))
        out.append(Variant(name, "hf", [str(path)], flexolmo=moe, note="given in params"))
    return out


def make_lm(variant: Variant, cfg: runner.EvalConfig):
    if variant.kind == "btm":
        from flexolmo_core.evaluation.btm import BTMLM
        # Every expert's full log-distribution is held at once ([E, B, T, V]): shrink the batch by E.
        batch = max(1, cfg.batch_size // len(variant.paths))
        return BTMLM(variant.paths, top_k=cfg.btm_top_k, batch_size=batch, max_length=cfg.max_length,
                     device=cfg.device)
    if variant.kind == "prompt_routing":
        from flexolmo_core.evaluation.routed import PromptRoutedLM
        return PromptRoutedLM(variant.paths[0], batch_size=cfg.batch_size, max_length=cfg.max_length,
                              device=cfg.device)
    if variant.flexolmo and cfg.prefix_pool:  # routers that pool need the batch shape: our inference loader
        loaded = load_flexolmo(variant.paths[0], device=cfg.device, prefix_pool=cfg.prefix_pool)
        return runner.hf_lm(loaded.model, cfg, loaded.tokenizer)
    return runner.hf_lm(variant.paths[0], cfg)


def evaluate_variant(variant: Variant, task_names: list[str], cfg: runner.EvalConfig, out_json=None) -> dict:
    """Evaluate one variant; a variant whose checkpoint is missing is recorded as not run, with the reason."""
    start = time.perf_counter()
    missing = [p for p in variant.paths if not (Path(p) / "config.json").exists()]
    if missing:
        result = {"variant": variant.name, "status": "not run", "reason": f"no checkpoint at {missing}",
                  "tasks": {t: {"status": "not run", "reason": f"variant checkpoint missing: {missing}"}
                            for t in task_names}, "seconds": 0.0}
    else:
        lm = make_lm(variant, cfg)
        result = runner.evaluate_lm(lm, task_names, cfg, variant=variant.name,
                                    info={"kind": variant.kind, "paths": variant.paths, "note": variant.note})
        if variant.flexolmo and cfg.domains_dir:
            result["routing_share"] = _routing_share(lm, variant.paths[0], cfg)
        result["seconds"] = round(time.perf_counter() - start, 2)
    if out_json:
        write_json(out_json, result)
    return result


def _routing_share(lm, model_dir, cfg: runner.EvalConfig) -> dict | None:
    texts = {}
    for d in cfg.domains or expert_domains(model_dir):
        try:
            docs = sources.domain_texts(cfg.domains_dir, d, max_chars=cfg.domain_max_chars)
        except sources.DataUnavailable:
            continue
        texts[d] = [x["text"] for x in docs[: min(4, cfg.domain_limit or 4)]]  # a few docs: a share, not a score
    if not texts:
        return None
    found = routing_share(lm.model, lm.tokenizer, texts)
    return {"experts": expert_domains(model_dir), "domains": {d: f["share"] for d, f in found.items()},
            "top1": {d: f["top1"] for d, f in found.items()},
            "entropy_bits": {d: f["entropy_bits"] for d, f in found.items()}}
