"""Published experts in, ours out: expert packages <-> standalone MoE checkpoints.

- `import_package`: expert `expert` of a FlexOlmo or Mixtral checkpoint becomes a package for `anchor`. A
  released per-domain FlexOlmo model has 2 experts (0 = the public FFN, 1 = the domain) and the router rows
  in `mlp.gate.weight`; a merged N-expert model splits into packages by importing each expert 1..N-1.
- `export_package`: a package as a standalone 2-expert model (the anchor merged with that package alone).

Before a package is written, the source's shared weights and public FFN are checked against the anchor's;
the package keeps only the expert and the router rows, so a merge rebuilds everything else from the anchor."""
from __future__ import annotations

import os
from pathlib import Path

import torch

import flexolmo_core.io.layout as layout
from flexolmo_core.anchor.families import expert_count, family_of_type, is_moe
from flexolmo_core.anchor.model import anchor_fingerprint
from flexolmo_core.errors import PackageError
from flexolmo_core.expert.package import save_package
from flexolmo_core.io.atomic import atomic_dir, refuse_overwriting_inputs, write_json
from flexolmo_core.io.checkpoint import load_state
from flexolmo_core.merge.merging import MERGED_MANIFEST, merge, read_manifest

# |source - anchor| <= ATOL + RTOL * |anchor| per element. RTOL = 2^-8 is bf16's rounding (half an ulp): a
# bf16 copy of fp32 anchor weights (norm weights near 1 move by up to 0.004) passes. ATOL = 1e-3 is what the
# reference merge allows for bf16 noise in small weights. A different anchor differs by far more.
RTOL, ATOL = 2.0 ** -8, 1e-3


def read_internal(folder: Path) -> dict[str, torch.Tensor]:
    """A checkpoint folder's tensors (dense or MoE, fused or per-expert) under internal names."""
    state = load_state(folder)
    return layout.from_hf_moe(state) if layout.is_moe_state(state) else layout.from_hf_dense(state)


def check_against_anchor(source: dict, anchor: dict, source_dir: Path, anchor_dir: Path) -> float:
    """Max |difference| over the shared weights and the public FFN (internal names); refuses naming the worst."""
    missing = sorted(set(anchor) - set(source))
    if missing:
        raise PackageError(f"{source_dir}: lacks the anchor's tensors {missing[:3]} ({len(missing)} in all)")
    worst_name, worst, worst_excess = None, 0.0, float("-inf")
    for name, expected in anchor.items():
        got = source[name]
        if got.shape != expected.shape:
            raise PackageError(f"{source_dir}: tensor {name} has shape {tuple(got.shape)}, the anchor's is "
                               f"{tuple(expected.shape)}")
        diff = (got.float() - expected.float()).abs()
        excess = float((diff - RTOL * expected.float().abs()).max())
        if excess > worst_excess:
            worst_name, worst_excess = name, excess
        worst = max(worst, float(diff.max()))
    if worst_excess > ATOL:
        raise PackageError(f"{source_dir}: was not trained against {anchor_dir}: tensor {worst_name} differs from "
                           f"the anchor's by {worst_excess:.3g} beyond {RTOL:.3g} x |anchor| (allowed: {ATOL:g}); "
                           "the shared weights and the public FFN (expert 0) must be the anchor's")
    return worst


def import_package(source: str | os.PathLike, anchor_dir: str | os.PathLike, out: str | os.PathLike,
                   domain: str | None = None, expert: int = 1) -> dict:
    """Expert `expert` of the MoE checkpoint `source` as a package for `anchor_dir`; returns its manifest."""
    from transformers import AutoConfig

    source, anchor_dir, out = Path(source), Path(anchor_dir), Path(out)
    refuse_overwriting_inputs(out, source, anchor_dir)
    for folder, what in ((source, "a FlexOlmo or Mixtral checkpoint folder"), (anchor_dir, "the anchor folder")):
        if not (folder / "config.json").is_file():
            raise PackageError(f"{folder / 'config.json'}: missing; expected {what}")
    config, anchor_config = AutoConfig.from_pretrained(source), AutoConfig.from_pretrained(anchor_dir)
    if not is_moe(config):
        raise PackageError(f"{source / 'config.json'}: model_type {config.model_type!r} is dense; expected a "
                           "flex_olmo or mixtral checkpoint (expert 0 the public FFN, expert 1 the domain)")
    if family_of_type(config.model_type) != family_of_type(anchor_config.model_type):
        raise PackageError(f"{source / 'config.json'}: a {config.model_type!r} model cannot hold experts of the "
                           f"{anchor_config.model_type!r} anchor {anchor_dir}")
    n_experts = expert_count(config)
    if not 1 <= expert < n_experts:
        raise PackageError(f"{source}: has experts 0..{n_experts - 1}; expert {expert} cannot be imported "
                           "(expert 0 is the public FFN)")
    ours = read_manifest(source) if (source / MERGED_MANIFEST).exists() else None
    recorded = sorted(ours["experts"], key=lambda e: e["index"])[expert] if ours else {}
    domain = domain or recorded.get("domain")
    if not domain:
        raise PackageError(f"{source}: no {MERGED_MANIFEST} names expert {expert}'s domain; give --domain")
    tensors, anchor = read_internal(source), read_internal(anchor_dir)
    worst = check_against_anchor(tensors, anchor, source, anchor_dir)
    if recorded.get("logit_bias"):  # our merged models keep learned biases in flexolmo.json
        for i, b in enumerate(recorded["logit_bias"]):
            tensors[f"layers.{i}.bias_{expert}"] = torch.tensor(float(b))
    dtype = anchor["embed"].dtype
    package = {k: v.to(dtype) for k, v in layout.to_package(tensors, expert).items()}
    training = {**recorded.get("training", {}), "imported_from": str(source), "expert_index": expert,
                "source_model_type": config.model_type, "source_top_k": config.num_experts_per_tok,
                "max_abs_difference_from_anchor": worst}
    return save_package(package, out, domain, anchor_fingerprint(anchor_dir), anchor_dir=anchor_dir, training=training,
                        data=recorded.get("data", {}))


SPLIT_RECORD = "split.json"  # what a split folder holds beside its packages (and how a rerun recognises it)


def split_merged(merged_dir: str | os.PathLike, anchor_dir: str | os.PathLike, out: str | os.PathLike) -> dict:
    """Every expert 1..N-1 of a merged model of ours as a package under out/<domain>; returns domain -> path."""
    refuse_overwriting_inputs(out, merged_dir, anchor_dir)
    domains = [e["domain"] for e in sorted(read_manifest(merged_dir)["experts"], key=lambda e: e["index"])]
    with atomic_dir(out, signature=(SPLIT_RECORD,)) as tmp:
        for e, domain in enumerate(domains[1:], start=1):
            import_package(merged_dir, anchor_dir, tmp / domain, domain=domain, expert=e)
        write_json(tmp / SPLIT_RECORD, {"source": str(merged_dir), "packages": domains[1:]})
    return {d: str(Path(out) / d) for d in domains[1:]}


def export_package(package_dir: str | os.PathLike, anchor_dir: str | os.PathLike, out: str | os.PathLike) -> dict:
    """The package as a standalone 2-expert model (FlexOlmo or Mixtral, top-2 of 2: the owner's model)."""
    return merge(anchor_dir, [package_dir], out, top_k=2, extra_manifest={"exported_package": str(package_dir)})
