"""Baselines of the paper built from a merged checkpoint's safetensors, through the one layout converter
(`flexolmo_core.io.layout`):

- `extract_dense_expert`: one expert of a merged checkpoint as a dense model of the anchor's family ("expert alone").
- `model_soup`: average the FFNs of dense experts whose shared weights are identical.
- `prompt_route`: pick one expert per input by cosine similarity of the input's embedding to the domain
  embeddings (stand-in: the layer-0 router rows and the mean hidden state entering layer 0's MoE).
Opt-out variants and the owners' 2-expert models are `merge.opt_out`.

A dense baseline's flexolmo.json records `shared_sha256`, the hash of its non-FFN weights; `inspect` recomputes
it, so a baseline is checked against the anchor its merged model was verified against.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch

import flexolmo_core.io.layout as layout
from flexolmo_core.anchor.families import dense_config_dict, write_config
from flexolmo_core.anchor.model import copy_tokenizer
from flexolmo_core.errors import InputError, read_json
from flexolmo_core.io.atomic import atomic_dir, write_json
from flexolmo_core.io.checkpoint import checkpoint_getter, checkpoint_meta
from flexolmo_core.io.stream_safetensors import DEFAULT_SHARD_BYTES, write_model
from flexolmo_core.merge.merging import (
    MERGED_MANIFEST,
    MODEL_SIGNATURE,
    expert_domains,
    read_manifest,
)


def _config(model_dir) -> dict:
    return read_json(Path(model_dir) / "config.json", what="model config")


def _hash_shared(h, name: str, tensor: torch.Tensor) -> None:
    flat = tensor.detach().contiguous().cpu().reshape(-1)
    h.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}|".encode())
    h.update(flat.view(torch.uint8).numpy().tobytes())


def shared_sha256(state: dict[str, torch.Tensor]) -> str:
    """Hash of every non-FFN tensor (names sorted): equal for all dense baselines of one anchor."""
    h = hashlib.sha256()
    for name in sorted(n for n in state if ".mlp." not in n):
        _hash_shared(h, name, state[name])
    return h.hexdigest()


def _write_dense(out_dir, specs: list, config: dict, src_dir, manifest: dict,
                 shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """A dense baseline folder, atomically, its weights streamed from lazy `specs` (one tensor at a time).
    shared_sha256 is computed on the way: the writer produces tensors in sorted name order, as the hash reads them."""
    h = hashlib.sha256()

    def hashed(name, produce):
        def run():
            tensor = produce()
            _hash_shared(h, name, tensor)
            return tensor
        return run

    specs = [(n, dt, shape, hashed(n, produce) if ".mlp." not in n else produce) for n, dt, shape, produce in specs]
    with atomic_dir(out_dir, signature=MODEL_SIGNATURE) as tmp:
        write_model(tmp, specs, shard_bytes, metadata={"format": "pt"})
        write_config(tmp, config)
        copy_tokenizer(src_dir, tmp)
        write_json(tmp / MERGED_MANIFEST, {**manifest, "shared_sha256": h.hexdigest(),
                                           "layout": layout.layout_name(s[0] for s in specs)})
    return Path(out_dir)


def dense_expert_state(merged: dict[str, torch.Tensor], index: int) -> dict[str, torch.Tensor]:
    """Shared weights + expert `index`'s FFN as a dense `mlp.{gate,up,down}_proj`; router dropped."""
    return layout.to_hf_dense(layout.from_hf_moe(merged), expert=index)


def dense_expert_specs(merged_dir, index: int) -> list:
    """Lazy specs of expert `index` of a merged checkpoint (either MoE form) as a dense model: every tensor read
    from disk when written (one expert's matrix), so memory stays about one tensor."""
    names, get = checkpoint_getter(merged_dir)
    meta, reader = checkpoint_meta(merged_dir), layout.MoEReader(names, get)
    specs = [(n, *meta[n], lambda n=n: get(n, None)) for n in names if not layout.is_moe_tensor(n)]
    config = _config(merged_dir)
    shapes = {"gate": (config["intermediate_size"], config["hidden_size"]),
              "up": (config["intermediate_size"], config["hidden_size"]),
              "down": (config["hidden_size"], config["intermediate_size"])}
    for i in sorted(reader.routers):
        dtype = meta[reader.routers[i]][0]
        specs += [(name, dtype, shapes[part], lambda i=i, part=part: reader.part(i, index, part))
                  for part, name in zip(layout.PARTS, layout.dense_ffn_names(i))]
    return specs


def extract_dense_expert(merged_dir, index: int, out_dir, shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Expert `index` of a merged FlexOlmo (Mixtral) checkpoint as a dense Olmo2 (Llama) checkpoint."""
    domain = expert_domains(merged_dir)[index]
    return _write_dense(out_dir, dense_expert_specs(merged_dir, index), dense_config_dict(_config(merged_dir)),
                        merged_dir, {"baseline": "dense_expert", "expert_index": index, "domain": domain,
                                     "source": str(merged_dir),
                                     "anchor_fingerprint": read_manifest(merged_dir).get("anchor_fingerprint")},
                        shard_bytes)


def model_soup(dense_dirs: list, out_dir, weights: list[float] | None = None,
               shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Average the FFNs of dense experts; every other tensor must be bit-identical across them. Streamed: one
    tensor of each model at a time (the average accumulates in fp32 and is stored in the models' dtype)."""
    weights = weights or [1.0 / len(dense_dirs)] * len(dense_dirs)
    getters = [checkpoint_getter(d)[1] for d in dense_dirs]
    meta = checkpoint_meta(dense_dirs[0])
    for d in dense_dirs[1:]:
        if checkpoint_meta(d) != meta:
            raise InputError(f"model soup: {d} has other tensors (names, shapes or dtypes) than {dense_dirs[0]}")

    def average(name):
        total = sum(w * get(name, None).float() for w, get in zip(weights, getters))
        return total.to(meta[name][0])

    def identical(name):
        first = getters[0](name, None)
        for d, get in zip(dense_dirs[1:], getters[1:]):
            if not torch.equal(get(name, None), first):
                raise InputError(f"model soup: shared tensor {name} differs between {dense_dirs[0]} and {d}")
        return first

    specs = [(n, *meta[n], (lambda n=n: average(n)) if ".mlp." in n else (lambda n=n: identical(n))) for n in meta]
    return _write_dense(out_dir, specs, _config(dense_dirs[0]), dense_dirs[0],
                        {"baseline": "model_soup", "sources": [str(d) for d in dense_dirs], "weights": weights,
                         "anchor_fingerprint": read_manifest(dense_dirs[0]).get("anchor_fingerprint")}, shard_bytes)


# ---- prompt-based routing -------------------------------------------------------------------------------------

def domain_embeddings(merged_model) -> torch.Tensor:
    """[E, d] router rows of layer 0 (stand-in for encoder domain embeddings until training provides them)."""
    return merged_model.model.layers[0].mlp.gate.weight.detach().float()


@torch.no_grad()
def prompt_embedding(merged_model, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of the hidden state entering layer 0's MoE: the same space as the router rows."""
    captured = {}
    block = merged_model.model.layers[0].mlp
    handle = block.register_forward_pre_hook(lambda mod, args: captured.setdefault("h", args[0]))
    try:
        # Only layer 0 is needed; run the full model for simplicity (small models, one call per input).
        merged_model(input_ids)
    finally:
        handle.remove()
    return captured["h"].float().mean(dim=1)  # [B, d]


@torch.no_grad()
def prompt_route(merged_model, input_ids: torch.Tensor, embeddings: torch.Tensor | None = None) -> list[int]:
    """Expert index per row of input_ids: argmax cosine(prompt embedding, domain embedding)."""
    emb = embeddings if embeddings is not None else domain_embeddings(merged_model)
    h = prompt_embedding(merged_model, input_ids)
    sims = torch.nn.functional.cosine_similarity(h[:, None, :], emb[None, :, :], dim=-1)
    return sims.argmax(dim=-1).tolist()
