"""Use a merged model: choose experts per request (opt-in / opt-out) and see which experts answered.

Opt-out masks the excluded experts' router logits to -inf before the softmax, so the softmax over the
kept experts is exactly that of a model merged without them. `strict=True` goes further and loads only
the kept experts' weights (excluded ones may be absent or corrupt on disk)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from flexolmo_core.anchor.families import expert_count, load_weights, renormalizes, set_expert_count
from flexolmo_core.errors import InputError
from flexolmo_core.inference.moe import FlexRouter, routers
from flexolmo_core.io.checkpoint import read_kept_experts
from flexolmo_core.io.dtypes import inference_dtype, resolve_device
from flexolmo_core.merge.merging import read_manifest


@dataclass
class LoadedModel:
    model: object
    tokenizer: object
    manifest: dict
    kept: list[str]  # domains whose experts may be used, in the model's expert order


def resolve_experts(domains: list[str], exclude=(), only=None) -> list[str]:
    """The kept domains, in model order; errors name unknown domains. `only` None = not given; an `only` that
    names nothing is refused (opt-in must fail closed, not keep everything)."""
    exclude = list(exclude or ())
    if only is not None and not list(only):
        raise InputError("--only names no expert; list the experts to keep (e.g. --only public,code)")
    only = list(only or ())
    if exclude and only:
        raise InputError("use either exclude or only, not both")
    unknown = sorted(set(exclude + only) - set(domains))
    if unknown:
        raise InputError(f"unknown expert(s) {unknown}; this model has {domains}")
    kept = [d for d in domains if (d in only if only else d not in exclude)]
    if not kept:
        raise InputError("no expert left to route to")
    return kept


def _install_inference_routers(model, top_k: int, masked: list[int], bias: list[list[float] | None] | None) -> None:
    num_experts, renormalize = expert_count(model.config), renormalizes(model.config)
    for i, layer in enumerate(model.model.layers):
        weight = layer.mlp.gate.weight.detach()
        router = FlexRouter(weight, weight.new_zeros(0, weight.shape[1]), top_k, renormalize)
        offset = torch.zeros(num_experts)
        if bias is not None:
            offset += torch.tensor([0.0 if b is None else min(b[i], 0.0) for b in bias])
        offset[masked] = float("-inf")
        router.logit_offset = offset
        layer.mlp.gate = router


def install_prefix_pool(model, weight: float) -> None:
    """Prefix-pooled routing (FlexRouter.pool) on every router, with a hook that tells them, per forward, which
    tokens are real (the attention mask's last columns) and whether the forward starts new sequences (no KV
    cache yet) or continues them (a cached decode step: the running mean carries on)."""
    if not 0.0 <= weight <= 1.0:
        raise InputError(f"prefix_pool must be in [0, 1], got {weight}")
    layers = routers(model)
    for router in layers:
        router.prefix_pool = weight

    def tell_batch(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        shape = (ids if ids is not None else kwargs["inputs_embeds"]).shape[:2]
        mask = kwargs.get("attention_mask")
        valid = mask[:, -shape[1]:] if mask is not None and mask.dim() == 2 else torch.ones(shape, device=model.device)
        cache = kwargs.get("past_key_values")
        fresh = cache is None or cache.get_seq_length() == 0
        for router in layers:
            router.pool_valid, router.pool_fresh = valid, fresh

    if weight:
        model.model.register_forward_pre_hook(tell_batch, with_kwargs=True)


def load_flexolmo(model_dir: str | os.PathLike, exclude=(), only=None, top_k: int | None = None,
                  strict: bool = False, use_bias: bool = False, dtype=None, device: str = "auto",
                  prefix_pool: float = 0.0) -> LoadedModel:
    """Load a merged model with some experts switched off, on `device` (auto | cpu | cuda).

    top_k defaults to the merged model's k, capped at the number of kept experts.
    use_bias re-applies learned router biases that the HF checkpoint cannot hold.
    prefix_pool > 0 pools each token's router logits with the running mean over its sequence (moe.pool_prefix).
    dtype None: the checkpoint's own on a GPU, fp32 on the CPU (flexolmo_core/io/dtypes.py)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    where = resolve_device(device)
    dtype = dtype or inference_dtype(where, model_dir)

    model_dir = Path(model_dir)
    manifest = read_manifest(model_dir)
    domains = [e["domain"] for e in manifest["experts"]]
    kept = resolve_experts(domains, exclude, only)
    if top_k is not None and top_k < 1:  # checked before use: `0 or default` would hide it
        raise InputError(f"top_k must be >= 1, got {top_k}")
    k = min(top_k if top_k is not None else manifest["top_k"], len(kept))
    bias = [e.get("logit_bias") for e in manifest["experts"]] if use_bias else None
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if strict:
        keep_idx = [domains.index(d) for d in kept]
        config = AutoConfig.from_pretrained(model_dir)
        set_expert_count(config, len(kept), k)
        model = AutoModelForCausalLM.from_config(config)
        load_weights(model, read_kept_experts(model_dir, keep_idx), model_dir)
        model = model.to(dtype)
        _install_inference_routers(model, k, [], [bias[j] for j in keep_idx] if bias else None)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, use_safetensors=True, dtype=dtype)
        masked = [j for j, d in enumerate(domains) if d not in kept]
        _install_inference_routers(model, k, masked, bias)
    install_prefix_pool(model, prefix_pool)
    model.to(where).eval()
    return LoadedModel(model=model, tokenizer=tokenizer, manifest=manifest, kept=kept)


class RoutingRecorder:
    """Context manager: collect per-token routing weights of every layer while the model runs."""

    def __init__(self, model):
        self.routers = routers(model)

    def __enter__(self):
        for r in self.routers:
            r.record = []
        return self

    def __exit__(self, *exc):
        self.records = [r.record for r in self.routers]
        for r in self.routers:
            r.record = None

    def shares(self, call_slice: slice = slice(None), last_token_of_first: bool = False) -> torch.Tensor:
        """Mean routing weight per expert over the recorded tokens (and layers), normalised to sum to 1."""
        per_layer = []
        for calls in self.records:
            calls = list(calls)
            if last_token_of_first and calls:
                calls[0] = calls[0][-1:]
            chosen = calls[call_slice]
            if chosen:
                per_layer.append(torch.cat(chosen).sum(0))
        total = torch.stack(per_layer).sum(0)
        return total / total.sum()


def attribution(loaded: LoadedModel, shares: torch.Tensor) -> dict[str, float]:
    """Share of routing weight per kept expert, by domain name (excluded experts get 0)."""
    domains = [e["domain"] for e in loaded.manifest["experts"]]
    names = loaded.kept if shares.numel() == len(loaded.kept) else domains
    return {name: round(float(s), 4) for name, s in zip(names, shares)}


@torch.no_grad()
def generate(loaded: LoadedModel, prompt: str, max_new_tokens: int = 32, do_sample: bool = False,
             seed: int = 0) -> dict:
    """Generate text; attribution is the routing share of each expert over the forward passes that
    produced the generated tokens (the prompt's last position, then each new token)."""
    tok, model = loaded.tokenizer, loaded.model
    inputs = tok(prompt, return_tensors="pt").to(model.device)
    if inputs["input_ids"].shape[1] == 0:
        raise InputError("empty prompt")
    torch.manual_seed(seed)
    with RoutingRecorder(model) as rec:
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=do_sample,
                             pad_token_id=tok.pad_token_id or tok.eos_token_id)
    new_tokens = out[0, inputs["input_ids"].shape[1]:]
    shares = rec.shares(last_token_of_first=True).cpu()
    domains = [e["domain"] for e in loaded.manifest["experts"]]
    return {"text": tok.decode(new_tokens, skip_special_tokens=True), "token_ids": new_tokens.tolist(),
            "attribution": attribution(loaded, shares), "kept": loaded.kept,
            "off": [d for d in domains if d not in loaded.kept]}

