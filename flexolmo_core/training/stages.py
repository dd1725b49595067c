"""The training stages as plain functions (what tasks/*.py and the CLI call). Each builds a FastOlmo whose
trainable tensors are exactly the stage's contract, runs the one loop, and writes an HF-native artifact.

Layout of a stage's output folder `out`: the artifact (model/ or package/), run/ (checkpoints, dvclive
metrics), summary.json (everything) and metrics.json (the results `dvc metrics show` lists)."""
from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

import flexolmo_core.training.distributed as D
from flexolmo_core.anchor.families import RENORMALIZES, moe_config
from flexolmo_core.anchor.model import (
    check_anchor,
    fingerprint_from,
    model_config_from_hf,
    olmo2_config,
    read_fingerprint,
    save_anchor,
    tokenizer_hash,
)
from flexolmo_core.anchor.presets import ModelConfig, get_preset
from flexolmo_core.data.config import check_domain_name
from flexolmo_core.errors import InputError, read_json
from flexolmo_core.expert.package import PACKAGE_SIGNATURE, save_package
from flexolmo_core.inference.moe import rows_per_layer
from flexolmo_core.io.atomic import check_replaceable, refuse_overwriting_inputs, write_json
from flexolmo_core.io.checkpoint import checkpoint_dtype, checkpoint_getter
from flexolmo_core.io.dtypes import storage_tensors
from flexolmo_core.io.layout import from_hf_dense, from_hf_moe, state_getter, to_hf_dense, to_hf_moe, to_package
from flexolmo_core.merge.merging import read_manifest, write_merged
from flexolmo_core.training.config import LoopConfig
from flexolmo_core.training.data import Mixture, is_packed, open_windows
from flexolmo_core.training.embeddings import write_projection
from flexolmo_core.training.loop import train
from flexolmo_core.training.model import MoEShape, build, count_matmul_flops, init_tensors, upcycle_tensors
from flexolmo_core.training.privacy import DPConfig, PrivateGradients
from flexolmo_core.training.replay import read_public_replay, with_public_mix, write_public_replay
from flexolmo_core.training.ridge_router import fit_ridge_router


def _finish(out: Path, summary: dict) -> None:
    if D.setup().main:
        write_json(out / "summary.json", summary)
        write_json(out / "metrics.json", training_metrics(summary))


RESULT_DIGITS = {"train_loss": 4, "val_loss": 4, "tokens_per_s": 0, "mfu": 3, "wall_seconds": 1}


def training_metrics(summary: dict) -> dict[str, float]:
    """The few results `dvc metrics show` lists per training stage (summary.json keeps the settings and the rest)."""
    return {k: round(summary[k], d) for k, d in RESULT_DIGITS.items() if isinstance(summary.get(k), (int, float))}


# ---- anchor ----------------------------------------------------------------------------------------------
def train_anchor(tokenizer_dir, train_data, out, preset: str | ModelConfig, loop: LoopConfig, val_data=None,
                 init_seed: int = 0, projection_dim: int = 384, projection_seed: int = 0,
                 replay_tokens: int = 0) -> dict:
    """Pretrain the dense anchor on public data; writes out/model (Olmo2 + tokenizer + router projection
    + `replay_tokens` of public text for the owners' public mix)."""
    from transformers import AutoTokenizer, Olmo2ForCausalLM

    out = Path(out)
    cfg = get_preset(preset) if isinstance(preset, str) else preset
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    hf_config = olmo2_config(cfg, tokenizer)
    torch.manual_seed(init_seed)  # the same init as `flexolmo anchor init`
    hf = Olmo2ForCausalLM(hf_config)
    model = build(cfg, MoEShape(), from_hf_dense(hf.state_dict(), cfg.n_layers), lambda n: True, torch.float32)
    windows = open_windows(train_data, loop.seq_len, tokenizer_dir)
    val = open_windows(val_data, loop.seq_len, tokenizer_dir) if val_data else None
    inputs = {"data_sha256": _data_hash(train_data), "tokenizer_sha256": tokenizer_hash(tokenizer_dir),
              "model": dataclasses.asdict(cfg), "init_seed": init_seed}
    summary = train(model, windows, loop, out / "run", val, label="anchor", inputs=inputs)
    summary.update(preset=preset if isinstance(preset, str) else None, init_seed=init_seed)
    trained = D.full_tensors(model)
    if D.setup().main:
        hf.load_state_dict(to_hf_dense(trained, cfg.n_layers))
        fingerprint = save_anchor(hf, tokenizer_dir, out / "model", preset=summary["preset"],
                                  extra={"seed": init_seed, "training": summary})
        summary["projection_sha256"] = write_projection(out / "model", projection_dim, cfg.d_model, projection_seed)
        if replay_tokens > 0:
            summary["public_replay"] = write_public_replay(out / "model", windows, replay_tokens, projection_seed)
        summary["fingerprint"] = fingerprint
    _finish(out, summary)
    return summary


# ---- owner expert ----------------------------------------------------------------------------------------
def anchor_state(anchor) -> tuple[object, dict]:
    """(HF config, state dict in the checkpoint's dtype) of an anchor given as its folder (read from the files:
    no transformers model is built, so the weights are held once) or as a loaded model."""
    if isinstance(anchor, (str, os.PathLike)):
        from transformers import AutoConfig

        check_anchor(anchor)
        names, get = checkpoint_getter(anchor)
        return AutoConfig.from_pretrained(anchor), {n: get(n, None) for n in names}
    return anchor.config, anchor.state_dict()


def owner_fast_model(anchor, public_rows, domain_rows, use_bias: bool, top_k: int = 2):
    """The owner's 2-expert model as a FastOlmo: only expert 1, router row 1 and bias 1 are Parameters (fp32
    masters); the frozen anchor weights stay in the anchor's dtype. `anchor`: its folder or a loaded model.
    top_k 2 is the paper's soft mixture; 1 is the expert-training top-k lever."""
    hf_config, state = anchor_state(anchor)
    cfg = model_config_from_hf(hf_config)
    L, d = cfg.n_layers, cfg.d_model
    pub = torch.stack([r[0] for r in rows_per_layer(public_rows, L, d)])
    dom = torch.stack([r[0] for r in rows_per_layer(domain_rows, L, d)])
    tensors = upcycle_tensors(from_hf_dense(state, L, tied=cfg.tie_embeddings), L, pub, dom, use_bias)
    del state
    trainable = lambda name: name.endswith(("gate_up_1", "down_1", "router_1", "bias_1"))  # noqa: E731
    moe = MoEShape(2, top_k, use_bias, renormalize=RENORMALIZES[cfg.family])
    return build(cfg, moe, tensors, trainable, torch.float32), tensors


def train_expert(anchor_dir, domain: str, train_data, out, loop: LoopConfig, val_data=None,
                 public_rows=None, domain_rows=None, use_bias: bool = False, embedding_meta: dict | None = None,
                 package_dir=None, public_mix: float = 0.0, top_k: int = 2, dp: DPConfig | None = None) -> dict:
    """Train one owner's expert against the frozen anchor (either family); writes out/package (or `package_dir`).

    Receives only the anchor and this domain's data (paths), nothing else. With `public_mix` > 0 that
    fraction of the training windows comes from the public replay sample inside the anchor folder. With
    `dp.enabled`, DP-SGD (training/privacy.py); the package records the epsilon spent."""
    from transformers import AutoConfig

    check_domain_name(domain, expert=True)
    out = Path(out)
    package_dir = Path(package_dir or out / "package")
    inputs = [anchor_dir, *([train_data] if isinstance(train_data, (str, os.PathLike)) else train_data)]
    refuse_overwriting_inputs(package_dir, *inputs)  # before hours of training, not after
    refuse_overwriting_inputs(out / "run", *inputs)
    check_replaceable(package_dir, PACKAGE_SIGNATURE)
    model, initial = owner_fast_model(anchor_dir, public_rows, domain_rows, use_bias, top_k)
    eos = AutoConfig.from_pretrained(anchor_dir).eos_token_id
    anchor_dtype = checkpoint_dtype(anchor_dir)
    public_rows_before = {n: t.clone() for n, t in initial.items() if ".router_0" in n or ".bias_0" in n}
    rows_sha256 = _rows_hash(initial)
    del initial  # the model holds the tensors; nothing else keeps a second copy
    windows = open_windows(train_data, loop.seq_len, anchor_dir)
    val = open_windows(val_data, loop.seq_len, anchor_dir) if val_data else None
    stream = windows
    if public_mix > 0:
        stream = with_public_mix(windows, read_public_replay(anchor_dir, loop.seq_len), public_mix)
    data_sha256 = _data_hash(train_data)
    inputs = {"domain": domain, "data_sha256": data_sha256, "anchor_fingerprint": read_fingerprint(anchor_dir),
              "use_bias": use_bias, "public_mix": public_mix, "router_rows_sha256": rows_sha256,
              **({"top_k": top_k} if top_k != 2 else {})}  # absent at the default: older runs still resume
    private = None
    if dp is not None and dp.enabled:
        private = PrivateGradients(dp, len(windows), loop.global_batch, loop.steps)
        # a resume must match (the path that computes the same gradients may change)
        inputs["dp"] = {**dataclasses.asdict(dp), "noise_multiplier": private.noise_multiplier, "vectorized": None}
    summary = train(model, stream, loop, out / "run", val, label=f"expert_{domain}", inputs=inputs, private=private)
    summary.update(domain=domain, use_bias=use_bias, public_mix=public_mix, top_k=top_k,
                   router_embedding=embedding_meta or {})
    trained = D.full_tensors(model)
    if D.setup().main:
        check_contract(trained, public_rows_before, anchor_dir)
        tensors = storage_tensors(to_package(trained), anchor_dtype)
        data = {"documents": _count_documents(windows, eos), "windows": len(windows),
                "seq_len": loop.seq_len, "sha256": data_sha256}
        save_package(tensors, package_dir, domain, read_fingerprint(anchor_dir), anchor_dir=anchor_dir, training=summary,
                     data=data)
    _finish(out, summary)
    return summary


def check_contract(trained: dict, public_before: dict, anchor_dir) -> None:
    """The owner's contract after training: the shared weights and the public FFN still hash to the anchor's
    fingerprint, and the public router row (and bias) did not move. Structurally impossible to break (they are
    buffers); this guards against regressions, one tensor at a time (no second copy of the model)."""
    if fingerprint_from(*state_getter(to_hf_dense(trained)), tokenizer_hash(anchor_dir)) != read_fingerprint(anchor_dir):
        raise RuntimeError("training changed frozen tensors: the shared weights no longer match the anchor's fingerprint")
    moved = [n for n, t in public_before.items() if not torch.equal(trained[n].cpu(), t.cpu())]
    if moved:
        raise RuntimeError(f"training changed frozen tensors: {moved[:5]}")


def _rows_hash(tensors: dict) -> str:
    """The router rows an owner starts from (public and own), so a resume with other embeddings is refused."""
    h = hashlib.sha256()
    for name in sorted(n for n in tensors if ".router_" in n):
        h.update(name.encode() + tensors[name].float().numpy().tobytes())
    return h.hexdigest()


def _count_documents(windows, eos: int) -> int:
    """Documents = EOS tokens in the stream (packed shards or tokenized files)."""
    if hasattr(windows, "shards"):
        return int(sum(int((s == eos).sum()) for s in windows.shards))
    return int((windows.tokens == eos).sum())


def _data_hash(paths) -> str:
    """A hash of the training data files (the package and the run record keep it; never the data). A packed
    split is hashed by its index.json, which holds every shard's sha256: the shards are not read again."""
    h = hashlib.sha256()
    paths = [Path(p) for p in ([paths] if isinstance(paths, (str, Path)) else paths)]
    for p in paths:
        if is_packed(p):
            files = [p / "index.json"]
        else:
            files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        for f in files:
            h.update(f.name.encode() + hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


# ---- router tuning ---------------------------------------------------------------------------------------
class Take:
    """The first n windows of a seeded permutation: a fixed proxy sample."""

    def __init__(self, windows, n: int | None, seed: int):
        """n None: every window (in the seeded order)."""
        self.windows = windows
        self.index = np.random.Generator(np.random.PCG64(seed)).permutation(len(windows))[:n]

    def __len__(self):
        return len(self.index)

    def __getitem__(self, i):
        return self.windows[int(self.index[i])]


def read_merged(model_dir) -> tuple[ModelConfig, dict, dict]:
    from transformers import AutoConfig

    model_dir = Path(model_dir)
    hf = AutoConfig.from_pretrained(model_dir)
    manifest = read_manifest(model_dir)  # checks the files and that the manifest matches the weights
    names, get = checkpoint_getter(model_dir)
    return model_config_from_hf(hf), {n: get(n, None) for n in names}, manifest


def tune_router(merged_dir, public_data, proxy_data: list, out, loop: LoopConfig, public_windows: int | None = 64,
                proxy_windows: int | None = 64, val_data=None, top_k: int | None = None,
                router_init: str = "merged", init_std: float = 0.02, init_seed: int = 0,
                label: str = "router_tune") -> dict:
    """Router tuning (METHOD.md 6): only the router rows (public included) move, all experts active
    (or the top `top_k`). Writes out/model: the merged checkpoint with tuned rows, flexolmo.json noting it.

    router_init "merged" starts from the merged rows (the domain embeddings: FlexOlmo-RT); "random" draws
    every row from normal(0, init_std) first, which with all the training data as `proxy_data` (windows None)
    is the BTX baseline (`train_btx`)."""
    if router_init not in ("merged", "random"):
        raise InputError(f"router_init must be merged or random, got {router_init!r}")
    merged_dir, out = Path(merged_dir), Path(out)
    cfg, state, manifest = read_merged(merged_dir)
    E = manifest["num_experts"]
    tensors = from_hf_moe(state, cfg.n_layers)
    if router_init == "random":
        g = torch.Generator().manual_seed(init_seed)
        for name in [n for n in tensors if ".router_" in n]:
            tensors[name] = torch.randn(tensors[name].shape, generator=g) * init_std
    moe = MoEShape(E, top_k or E, renormalize=RENORMALIZES[cfg.family])
    model = build(cfg, moe, tensors, lambda n: ".router_" in n, torch.float32)
    parts = [Take(open_windows(public_data, loop.seq_len, merged_dir), public_windows, loop.seed)]
    parts += [Take(open_windows(p, loop.seq_len, merged_dir), proxy_windows, loop.seed) for p in proxy_data]
    val = open_windows(val_data, loop.seq_len, merged_dir) if val_data else None
    inputs = {"merged": [(e["domain"], e.get("package_sha256")) for e in manifest["experts"]], "top_k": top_k,
              "public_windows": public_windows, "proxy_windows": proxy_windows,
              "data_sha256": [_data_hash(public_data), *(_data_hash(p) for p in proxy_data)],
              **({"router_init": [router_init, init_std, init_seed]} if router_init != "merged" else {})}
    summary = train(model, Mixture(parts), loop, out / "run", val, label=label, inputs=inputs)
    summary.update(proxy_sets=len(proxy_data), experts=[e["domain"] for e in manifest["experts"]], top_k=top_k or E,
                   router_init=router_init)
    trained = D.full_tensors(model)
    if D.setup().main:
        extra = {"router_tuned": summary} if router_init == "merged" else {"baseline": label, "router_trained": summary}
        _write_moe(merged_dir, out / "model", _with_routers(state, trained, cfg.n_layers), {**manifest, **extra})
    _finish(out, summary)
    return summary


def fit_router(merged_dir, public_data, proxy_data: list, out, seq_len: int, public_windows: int | None = 64,
               proxy_windows: int | None = 64, alpha: float = 1e-2, public_target: float = 1.0, scale: float = 1.0,
               seed: int = 0) -> dict:
    """The closed-form router (ridge_router.py) on router tuning's proxy sets: writes out/model, the merged
    checkpoint with fitted rows, flexolmo.json noting it (`router_tuned.method: ridge`). The model routes at
    its merged top-k while fitting: the inputs each layer sees are the ones it will see at inference."""
    start = time.perf_counter()
    merged_dir, out = Path(merged_dir), Path(out)
    cfg, state, manifest = read_merged(merged_dir)
    E = manifest["num_experts"]
    moe = MoEShape(E, manifest["top_k"], renormalize=RENORMALIZES[cfg.family])
    model = build(cfg, moe, from_hf_moe(state, cfg.n_layers), lambda n: ".router_" in n, torch.float32)
    parts = [Take(open_windows(public_data, seq_len, merged_dir), public_windows, seed)]
    parts += [Take(open_windows(p, seq_len, merged_dir), proxy_windows, seed) for p in proxy_data]
    if len(parts) != E:
        raise InputError(f"{merged_dir}: {E} experts, but {len(parts)} proxy sets (public + {len(proxy_data)})")
    ids = torch.stack([torch.as_tensor(np.asarray(w[i]), dtype=torch.long)[:seq_len] for w in parts
                       for i in range(len(w))])
    labels = torch.tensor([e for e, w in enumerate(parts) for _ in range(len(w))])
    print(f"fit_router: {len(ids)} windows x {seq_len} tokens, {cfg.n_layers} layers", flush=True)
    _, own_top1 = fit_ridge_router(model, ids, labels, alpha=alpha, public_target=public_target, scale=scale,
                                   progress=lambda i, n: print(f"fit_router: layer {i}/{n}", flush=True)
                                   if i % 5 == 0 or i == n else None)
    summary = {"method": "ridge", "alpha": alpha, "public_target": public_target, "scale": scale, "seq_len": seq_len,
               "windows": [len(w) for w in parts], "experts": [e["domain"] for e in manifest["experts"]],
               "data_sha256": [_data_hash(public_data), *(_data_hash(p) for p in proxy_data)], "seed": seed,
               "fit_own_top1_per_layer": own_top1, "wall_seconds": round(time.perf_counter() - start, 1)}
    _write_moe(merged_dir, out / "model", _with_routers(state, D.full_tensors(model), cfg.n_layers),
               {**manifest, "router_tuned": summary})
    write_json(out / "run/fit_router.json", summary)  # the stage's run record (the gradient method's run/ holds
    write_json(out / "summary.json", summary)       # checkpoints and dvclive metrics)
    write_json(out / "metrics.json", {"wall_seconds": summary["wall_seconds"],
                                      "fit_own_top1": round(sum(own_top1) / len(own_top1), 4)})
    return summary


def train_btx(merged_dir, data: list, out, loop: LoopConfig, val_data=None, init_std: float = 0.02,
              init_seed: int = 0, top_k: int | None = None) -> dict:
    """The BTX baseline (Branch-Train-MiX, as the FlexOlmo paper runs it): the experts trained apart become one
    MoE whose router is learned from scratch on the union of every domain's training data (public first in
    `data`; this baseline may see all data), with router tuning's budget (`loop`), so it and FlexOlmo-RT
    compare at equal cost. Differs from the original BTX in one way, for that comparison: only the router
    trains (BTX also fine-tunes the whole MoE afterwards)."""
    return tune_router(merged_dir, data[0], list(data[1:]), out, loop, public_windows=None, proxy_windows=None,
                       val_data=val_data, top_k=top_k, router_init="random", init_std=init_std, init_seed=init_seed,
                       label="btx")


def _with_routers(state: dict, trained: dict, n_layers: int) -> dict:
    """A merged model's weights (either MoE form) with the router rows of `trained` (internal names), in the
    released layout and the weights' own dtype."""
    tensors = from_hf_moe(state, n_layers)
    tensors.update({k: v.to(tensors[k].dtype) for k, v in trained.items() if ".router_" in k})
    return to_hf_moe(tensors, n_layers)


def _write_moe(source_dir: Path, out: Path, tensors: dict, manifest: dict, config=None) -> None:
    """A model folder from in-memory tensors, with `source_dir`'s tokenizer and (when `config` is None) config."""
    config = read_json(source_dir / "config.json", what="model config") if config is None else config
    write_merged(out, [(k, v.dtype, tuple(v.shape), lambda v=v: v) for k, v in tensors.items()], config, source_dir,
                 manifest)


# ---- unrestricted MoE baseline ---------------------------------------------------------------------------
def flops_budget(summaries: list[dict]) -> float:
    """Training FLOPs actually spent by anchor + experts (tokens x per-token step FLOPs)."""
    return float(sum(s["tokens"] * s["train_flops_per_token"] for s in summaries))


def train_unrestricted(tokenizer_dir, data: list, out, preset: str | ModelConfig, num_experts: int, top_k: int,
                       loop: LoopConfig, budget_flops: float | None = None, val_data=None, init_seed: int = 0) -> dict:
    """The same MoE shape as the merged model, trained jointly from scratch on public + every domain.
    With `budget_flops`, the step count is set so that training FLOPs match anchor + all experts."""
    from transformers import AutoTokenizer

    out = Path(out)
    cfg = get_preset(preset) if isinstance(preset, str) else preset
    moe = MoEShape(num_experts, top_k)
    if budget_flops is not None:
        per_token = count_matmul_flops(cfg, moe, loop.seq_len, lambda n: True)["train_step"]
        loop = replace(loop, steps=max(1, round(budget_flops / (per_token * loop.global_batch * loop.seq_len))))
    model = build(cfg, moe, init_tensors(cfg, moe, init_seed), lambda n: True, torch.float32)
    windows = Mixture([open_windows(p, loop.seq_len, tokenizer_dir) for p in data])
    val = open_windows(val_data, loop.seq_len, tokenizer_dir) if val_data else None
    inputs = {"data_sha256": [_data_hash(p) for p in data], "model": dataclasses.asdict(cfg),
              "experts": [num_experts, top_k], "init_seed": init_seed}
    summary = train(model, windows, loop, out / "run", val, label="unrestricted_moe", inputs=inputs)
    summary.update(budget_flops=budget_flops, num_experts=num_experts, top_k=top_k)
    trained = D.full_tensors(model)
    if D.setup().main:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        config = moe_config(olmo2_config(cfg, tokenizer), num_experts, top_k)
        names = ["public"] + [f"joint_{e}" for e in range(1, num_experts)]
        manifest = {"format_version": 1, "anchor_fingerprint": None, "num_experts": num_experts, "top_k": top_k,
                    "router_bias": "none", "baseline": "unrestricted_moe", "excluded_at_merge": [],
                    "experts": [{"index": e, "domain": n, "package_sha256": None, "logit_bias": None}
                                for e, n in enumerate(names)], "training": summary}
        tok_dir = Path(tokenizer_dir)
        _write_moe(tok_dir, out / "model", to_hf_moe(trained, cfg.n_layers), manifest, config)
    _finish(out, summary)
    return summary
