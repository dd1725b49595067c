"""Merge an anchor and N expert packages into one FlexOlmoForCausalLM checkpoint (MixtralForCausalLM for a
Llama-family anchor), with no training.

Per layer: experts [FFN_public, FFN_1, ..., FFN_N], router [r_public; r_1; ...; r_N]; everything else
from the anchor. Deterministic (sorted names, fixed metadata), atomic (temp dir + rename), and bounded in
memory: tensors are read from disk one at a time and written one expert matrix at a time (the released
per-expert layout, io/layout.py), so the peak is about one expert's FFN matrix, whatever the model size or the number of experts
(`benchmarks/merge_memory.py`). The output is sharded in transformers' layout (`shard_size`)."""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch

import flexolmo_core.io.layout as layout
from flexolmo_core.anchor.families import (
    DENSE_TYPE,
    expert_count,
    family_of_type,
    is_moe,
    moe_config,
    set_expert_count,
    write_config,
)
from flexolmo_core.anchor.model import anchor_fingerprint, copy_tokenizer
from flexolmo_core.data.config import check_domain_name
from flexolmo_core.errors import InputError, MissingInput, PackageError, read_json, require
from flexolmo_core.expert.canary import check_canary
from flexolmo_core.expert.package import ExpertPackage, load_package
from flexolmo_core.io.atomic import atomic_dir, refuse_overwriting_inputs, write_json
from flexolmo_core.io.checkpoint import check_checkpoint, checkpoint_dtype, checkpoint_getter, checkpoint_meta
from flexolmo_core.io.dtypes import dtype_name
from flexolmo_core.io.stream_safetensors import DEFAULT_SHARD_BYTES, write_model

MERGED_MANIFEST = "flexolmo.json"
MODEL_SIGNATURE = ("config.json", MERGED_MANIFEST)  # what every model folder this project writes has


def default_top_k(num_experts: int) -> int:
    """Half the experts, as the paper's 4 of 8."""
    return max(1, math.ceil(num_experts / 2))


def anchor_shapes(anchor_config) -> dict:
    return {"n_layers": anchor_config.num_hidden_layers, "d_model": anchor_config.hidden_size,
            "ffn_hidden": anchor_config.intermediate_size}


def load_packages(package_paths, fingerprint: str, shapes: dict, exclude=(), dtype: str | None = None) -> list[ExpertPackage]:
    """Validate packages against the anchor; refuse two for one domain; drop excluded domains."""
    packages: list[ExpertPackage] = []
    seen: dict[str, Path] = {}
    for path in package_paths:
        package = load_package(path, anchor_fingerprint=fingerprint, anchor_shapes=shapes, expected_dtype=dtype)
        if package.domain in seen:
            raise PackageError(f"two packages for domain '{package.domain}': {seen[package.domain]} and {package.path}")
        seen[package.domain] = package.path
        packages.append(package)
    unknown = sorted(set(exclude) - set(seen))
    if unknown:
        raise PackageError(f"--exclude names unknown domain(s) {unknown}; packages given: {sorted(seen)}")
    return [p for p in packages if p.domain not in set(exclude)]


def merge(anchor_dir: str | os.PathLike, package_paths, out: str | os.PathLike, top_k: int | None = None,
          exclude=(), extra_manifest: dict | None = None, shard_bytes: int = DEFAULT_SHARD_BYTES,
          router_scale: float = 1.0) -> dict:
    """Write the merged checkpoint to `out`; returns its flexolmo.json manifest. `router_scale` multiplies every
    router row, the public one included (1/temperature of the router's softmax; 1 = the paper). Opt-out stays
    exact: a row is scaled before it is stacked, and removing an expert removes its scaled row."""
    from transformers import AutoConfig

    anchor_dir, package_paths = Path(anchor_dir), list(package_paths)
    refuse_overwriting_inputs(out, anchor_dir, *package_paths)
    if not (anchor_dir / "config.json").is_file():
        raise MissingInput(f"{anchor_dir / 'config.json'}: missing; expected the anchor checkpoint folder")
    anchor_cfg = AutoConfig.from_pretrained(anchor_dir)
    if anchor_cfg.model_type in DENSE_TYPE:
        raise InputError(f"{anchor_dir}: a {anchor_cfg.model_type!r} model is a mixture of experts; merge needs the "
                         "dense anchor the packages were trained against")
    fingerprint = anchor_fingerprint(anchor_dir)  # computed from the weights, not trusted from a file
    anchor_dtype = dtype_name(checkpoint_dtype(anchor_dir))  # packages must match (dtypes.py)
    packages = load_packages(package_paths, fingerprint, anchor_shapes(anchor_cfg), exclude, anchor_dtype)
    num_experts = 1 + len(packages)
    top_k = default_top_k(num_experts) if top_k is None else top_k
    if not 1 <= top_k <= num_experts:
        raise InputError(f"--top-k must be between 1 and the number of experts ({num_experts}), got {top_k}")
    if not (math.isfinite(router_scale) and router_scale > 0):
        raise InputError(f"--router-scale must be a finite number > 0 (1/temperature of the router), got {router_scale}")

    for package in packages:  # the weights back the fingerprint's claim: anchor + package must give its logits
        check_canary(anchor_dir, anchor_cfg, package)
    specs, config = merged_specs(anchor_dir, anchor_cfg, packages, top_k, router_scale)
    manifest = {
        "format_version": 1,
        "anchor_fingerprint": fingerprint,
        "num_experts": num_experts,
        "top_k": top_k,
        # transformers' FlexOlmo has no router bias, so learned biases are dropped (as the reference merge
        # does) but kept here so flexolmo_core.inference.model can re-apply them on request.
        "router_bias": "dropped" if any(p.uses_bias for p in packages) else "none",
        "experts": [{"index": 0, "domain": "public", "package_sha256": None, "logit_bias": None}] + [
            {"index": j + 1, "domain": p.domain, "package_sha256": p.sha256,
             "logit_bias": _bias_list(p, anchor_cfg.num_hidden_layers),
             "training": p.manifest.get("training", {}), "data": p.manifest.get("data", {})}
            for j, p in enumerate(packages)],
        "excluded_at_merge": sorted(exclude),
        "router_scale": router_scale,
        **(extra_manifest or {}),
    }
    write_merged(out, specs, config, anchor_dir, manifest, shard_bytes)
    return manifest


def merged_specs(anchor_dir: Path, anchor_cfg, packages: list[ExpertPackage], top_k: int, router_scale: float = 1.0):
    """(tensor specs, MoE config) of the anchor merged with `packages`: lazy tensors, produced one at a time."""
    names, get = checkpoint_getter(anchor_dir)  # lazy reads; works for sharded checkpoints too
    meta = checkpoint_meta(anchor_dir)  # dtypes and shapes from the headers, nothing loaded yet
    public_rows = _agreed_public_rows(packages, anchor_cfg.num_hidden_layers, anchor_cfg.hidden_size)
    num_experts = 1 + len(packages)

    specs = [(name, *meta[name], (lambda name=name: get(name, None))) for name in names if ".mlp." not in name]
    family = family_of_type(anchor_cfg.model_type)
    for i in range(anchor_cfg.num_hidden_layers):
        dense = dict(zip(layout.PARTS, layout.dense_ffn_names(i)))
        dtype, (inter, d) = meta[dense["gate"]]

        def part(e, name, i=i, dense=dense, inter=inter, dtype=dtype):  # expert 0: the anchor's FFN; e: package e-1's
            if e == 0:
                return get(dense[name], None)
            if name == "down":
                return _expert_tensor(packages[e - 1], f"layers.{i}.down_proj", dtype)
            gate_up = _expert_tensor(packages[e - 1], f"layers.{i}.gate_up_proj", dtype)
            return (gate_up[:inter] if name == "gate" else gate_up[inter:]).clone()

        def router(i=i, dtype=dtype):
            public = public_rows[i].to(dtype)
            rows = torch.stack([public] + [_expert_tensor(p, f"layers.{i}.router", dtype) for p in packages])
            return rows if router_scale == 1.0 else (rows.float() * router_scale).to(dtype)

        specs += layout.released_moe_specs(family, i, num_experts, dtype, inter, d, part, router)

    config = moe_config(anchor_cfg, num_experts=num_experts, top_k=top_k)  # FlexOlmo or Mixtral, by family
    return specs, config


def write_merged(out, specs, config, tokenizer_dir, manifest: dict, shard_bytes: int = DEFAULT_SHARD_BYTES) -> None:
    """A model folder, atomically: streamed (sharded) weights, config.json (a transformers config or its dict),
    the tokenizer of `tokenizer_dir`, and flexolmo.json with the tensor layout written (io/layout.LAYOUTS)."""
    specs = list(specs)
    with atomic_dir(out, signature=MODEL_SIGNATURE) as tmp:
        write_model(tmp, specs, shard_bytes, metadata={"format": "pt"})
        write_config(tmp, config)
        copy_tokenizer(tokenizer_dir, tmp)
        write_json(tmp / MERGED_MANIFEST, {**manifest, "layout": layout.layout_name(s[0] for s in specs)})


def _expert_tensor(package: ExpertPackage, name: str, dtype: torch.dtype) -> torch.Tensor:
    return package.tensor(name).to(dtype)


def _bias_list(package: ExpertPackage, n_layers: int) -> list[float] | None:
    if not package.uses_bias:
        return None
    return [float(package.tensor(f"layers.{i}.logit_bias")) for i in range(n_layers)]


def _agreed_public_rows(packages: list[ExpertPackage], n_layers: int, d_model: int) -> list[torch.Tensor]:
    """The public router row per layer; every package must have trained with the same one."""
    if not packages:
        return [torch.zeros(d_model) for _ in range(n_layers)]
    first = packages[0]
    rows = [first.tensor(f"layers.{i}.public_router") for i in range(n_layers)]
    for other in packages[1:]:
        for i in range(n_layers):
            if not torch.equal(other.tensor(f"layers.{i}.public_router"), rows[i]):
                raise PackageError(f"{other.path} and {first.path} were trained with different public router rows "
                                   f"(layer {i}); the public row belongs to the anchor and must be the same for all")
    return rows


def read_manifest(model_dir: str | os.PathLike) -> dict:
    """The one reader of flexolmo.json (merged models, opt-outs, router-tuned and baseline models). Its expert
    list must agree with the weights: one record per expert (indices 0..E-1, distinct valid domains), E being
    the expert count of config.json and of every router; otherwise an opt-out could miss an unlisted expert."""
    model_dir = Path(model_dir)
    path = model_dir / MERGED_MANIFEST
    if not path.exists():
        raise MissingInput(f"{path}: missing; {model_dir} is not a model this project wrote")
    manifest = read_json(path, what="merged-model manifest")
    config = check_checkpoint(model_dir)
    if not is_moe(config):  # a dense baseline: its manifest records what it was made from, not experts
        return manifest
    experts = require(manifest, "experts", list, path)
    require(manifest, "top_k", int, path)
    for n, record in enumerate(experts):
        require(record, "index", int, f"{path}: experts[{n}]")
        try:
            check_domain_name(require(record, "domain", str, f"{path}: experts[{n}]"))
        except InputError as err:
            raise InputError(f"{path}: experts[{n}]: {err}") from None
    if sorted(e["index"] for e in experts) != list(range(len(experts))):
        raise InputError(f"{path}: expert indices {[e['index'] for e in experts]} are not 0..{len(experts) - 1}")
    domains = [e["domain"] for e in experts]
    if len(set(domains)) != len(domains):
        raise InputError(f"{path}: domains {domains} repeat")
    routers = {shape[0] for name, (_, shape) in checkpoint_meta(model_dir).items() if name.endswith(".gate.weight")}
    if {expert_count(config)} != {len(experts)} or routers - {len(experts)}:
        raise InputError(f"{path}: lists {len(experts)} experts {domains}, but the weights have "
                         f"{expert_count(config)} (config.json) and routers of {sorted(routers)} rows; "
                         "the manifest and the weights must describe the same experts")
    return manifest


def expert_domains(model_dir: str | os.PathLike) -> list[str]:
    """Domain of each expert of a merged model, in index order."""
    return [e["domain"] for e in sorted(read_manifest(model_dir)["experts"], key=lambda e: e["index"])]


def opt_out(merged_dir: str | os.PathLike, exclude, out: str | os.PathLike, top_k: int | None = None,
            shard_bytes: int = DEFAULT_SHARD_BYTES) -> dict:
    """The one opt-out: `merged_dir` without the experts of the `exclude` domains, written as a merged
    model (released layout, flexolmo.json; either MoE form is read). It equals `merge(..., exclude=...)` tensor for tensor (a softmax
    over the kept router rows is the softmax with the others masked to -inf), and needs no package.
    top_k None = merge's default for the kept count. Returns the new manifest."""
    from transformers import AutoConfig

    merged_dir, exclude = Path(merged_dir), sorted(set(exclude))
    refuse_overwriting_inputs(out, merged_dir)
    manifest = read_manifest(merged_dir)
    experts = sorted(manifest["experts"], key=lambda e: e["index"])
    domains = [e["domain"] for e in experts]
    unknown = sorted(set(exclude) - set(domains))
    if unknown:
        raise InputError(f"opt-out names unknown expert(s) {unknown}; {merged_dir} has {domains}")
    if domains[0] in exclude:
        raise InputError(f"expert 0 ({domains[0]}) is the anchor's FFN and cannot be removed from a model file; "
                         "mask it at inference instead (flexolmo generate --exclude)")
    keep = [i for i, d in enumerate(domains) if d not in exclude]
    top_k = default_top_k(len(keep)) if top_k is None else top_k
    if not 1 <= top_k <= len(keep):
        raise InputError(f"top_k must be between 1 and the number of kept experts ({len(keep)}), got {top_k}")
    config = AutoConfig.from_pretrained(merged_dir)
    names, get = checkpoint_getter(merged_dir)  # either MoE form in; the released one out, streamed
    meta, reader = checkpoint_meta(merged_dir), layout.MoEReader(names, get)
    specs = [(n, *meta[n], lambda n=n: get(n, None)) for n in names if not layout.is_moe_tensor(n)]
    for i in sorted(reader.routers):
        specs += layout.released_moe_specs(family_of_type(config.model_type), i, len(keep),
                                           meta[reader.routers[i]][0], config.intermediate_size, config.hidden_size,
                                           lambda j, part, i=i: reader.part(i, keep[j], part),
                                           lambda i=i: reader.router(i)[keep])
    set_expert_count(config, len(keep), top_k)
    kept = [dict(experts[i], index=j) for j, i in enumerate(keep)]
    new = dict(manifest, num_experts=len(keep), top_k=top_k, experts=kept,
               router_bias="dropped" if any(e.get("logit_bias") for e in kept) else "none",
               excluded_at_merge=sorted(set(manifest.get("excluded_at_merge", [])) | set(exclude)),
               opted_out_of=str(merged_dir))
    write_merged(out, specs, config, merged_dir, new, shard_bytes)
    return new
