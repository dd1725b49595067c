"""Quality check at the `tiny` preset (issue 4, item 9): validation loss per domain for the anchor, each
owner's 2-expert model and the merged all-experts model. Runs the stages that are missing first.

    python benchmarks/train_quality.py [--top-k K] [--domains a,b]   (from the repo root, after prepare/tokenizer)"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]


def run(*args):
    print("+", " ".join(args), flush=True)
    subprocess.run([sys.executable, *args], cwd=ROOT, check=True)


def train_anchor_into(out: Path, data: Path, anchor_steps=None, preset=None, params=ROOT / "params.yaml",
                      loop_overrides=None) -> None:
    """out/anchor: pretrained with params.yaml's anchor section (steps overridable); skipped when present."""
    import dataclasses

    from flexolmo_core.training.config import AnchorConfig, load_stage
    from flexolmo_core.training.stages import train_anchor

    if (out / "anchor/model/config.json").exists():
        return
    preset, cfg, loop = load_stage(AnchorConfig, "anchor", params, preset=preset)
    loop = dataclasses.replace(loop, steps=anchor_steps or loop.steps, **(loop_overrides or {}))
    train_anchor(data / "tokenizer", data / "public/train", out / "anchor", preset, loop,
                 val_data=data / "public/validation", init_seed=cfg.init_seed, projection_dim=cfg.projection_dim,
                 replay_tokens=cfg.replay_tokens)


def embed_domains(out: Path, domains: list[str], embedding=None, prepare=ROOT / "outputs/prepare", preset=None,
                  params=ROOT / "params.yaml") -> None:
    """out/domain_embedding/<d> for public and `domains` against out/anchor (skips finished ones)."""
    import dataclasses

    from flexolmo_core.data.readers import read_texts
    from flexolmo_core.training.config import DomainEmbeddingConfig, load_stage
    from flexolmo_core.training.embeddings import write_domain_embedding

    for d in ["public", *domains]:
        if not (out / f"domain_embedding/{d}/embedding.safetensors").exists():
            _, cfg, _ = load_stage(DomainEmbeddingConfig, "domain_embedding", params, domain=d, preset=preset)
            cfg = dataclasses.replace(cfg, **(embedding or {}))
            write_domain_embedding(out / f"domain_embedding/{d}", d, read_texts([Path(prepare) / d / "train"]),
                                   out / "anchor/model", cfg, {"domain": d, "mode": cfg.mode, "scale": cfg.scale,
                                                               "unit_norm": cfg.unit_norm, "center": cfg.center},
                                   out / "domain_embedding/public")


def train_experts(out: Path, data: Path, domains: list[str], expert_steps=None, expert=None, expert_loop=None,
                  preset=None, params=ROOT / "params.yaml") -> None:
    """out/expert/<d>/package against out/anchor with params.yaml's expert section plus overrides (skips
    finished ones). The public replay sample is added to the anchor folder first when public_mix needs it."""
    import dataclasses

    from flexolmo_core.training.config import AnchorConfig, ExpertConfig, load_stage
    from flexolmo_core.training.embeddings import load_embedding
    from flexolmo_core.training.stages import train_expert

    for d in domains:
        if not (out / f"expert/{d}/package/manifest.json").exists():
            _, cfg, loop = load_stage(ExpertConfig, "expert", params, domain=d, preset=preset)
            cfg = dataclasses.replace(cfg, **(expert or {}))
            loop = dataclasses.replace(loop, steps=expert_steps or loop.steps, **(expert_loop or {}))
            if cfg.public_mix > 0 and not (out / "anchor/model/public_replay").exists():
                from flexolmo_core.training.data import open_windows
                from flexolmo_core.training.replay import write_public_replay

                _, acfg, aloop = load_stage(AnchorConfig, "anchor", params, preset=preset)
                write_public_replay(out / "anchor/model", open_windows(data / "public/train", aloop.seq_len),
                                    acfg.replay_tokens or 1_000_000, acfg.projection_seed)
            train_expert(out / "anchor/model", d, data / f"{d}/train", out / f"expert/{d}", loop,
                         val_data=data / f"{d}/validation", public_rows=load_embedding(out / "domain_embedding/public"),
                         domain_rows=load_embedding(out / f"domain_embedding/{d}"), use_bias=cfg.use_bias,
                         public_mix=cfg.public_mix, top_k=cfg.top_k)


def stages(out: Path, data: Path, domains: list[str], anchor_steps=None, expert_steps=None, embedding=None,
           expert=None, expert_loop=None) -> None:
    """anchor, domain_embedding@*, expert@* with params.yaml's values, into `out` (skips finished ones)."""
    train_anchor_into(out, data, anchor_steps)
    embed_domains(out, domains, embedding)
    train_experts(out, data, domains, expert_steps, expert, expert_loop)


def main() -> None:
    from flexolmo_core.anchor.families import RENORMALIZES
    from flexolmo_core.anchor.model import load_anchor, model_config_from_hf
    from flexolmo_core.io.layout import from_hf_dense, from_hf_moe
    from flexolmo_core.merge.merging import merge
    from flexolmo_core.training.config import LoopConfig
    from flexolmo_core.training.data import open_windows
    from flexolmo_core.training.loop import evaluate
    from flexolmo_core.training.model import MoEShape, build
    from flexolmo_core.training.stages import read_merged

    ap = argparse.ArgumentParser()
    ap.add_argument("--top-k", type=int, default=None, help="merged model's k (default: half, rounded up)")
    ap.add_argument("--domains", default=None, help="comma-separated (default: params.yaml's domains, in order)")
    ap.add_argument("--eval-batches", type=int, default=8)
    ap.add_argument("--work", default="/tmp/flexolmo_quality", help="where this run's stage outputs go")
    ap.add_argument("--anchor-steps", type=int, default=None, help="override params.yaml (a shorter run)")
    ap.add_argument("--expert-steps", type=int, default=None)
    ap.add_argument("--anchor-from", default=None, help="reuse this work dir's trained anchor (a variant run)")
    ap.add_argument("--expert", default=None, help='expert overrides as JSON, e.g. \'{"public_mix": 0.25}\'')
    ap.add_argument("--expert-loop", default=None, help='expert loop overrides as JSON, e.g. \'{"router_lr_scale": 10}\'')
    ap.add_argument("--embedding", default=None, help="domain_embedding overrides as JSON, e.g. "
                    '\'{"mode": "anchor-hidden", "unit_norm": true, "scale": 4}\'')
    ap.add_argument("--router-tune", action="store_true", help="also router-tune the merge (params' router_tune "
                    "section; proxy = a sample of each domain's train split) and report it")
    ap.add_argument("--rt", default=None, help='router_tune overrides as JSON, e.g. \'{"top_k": 4}\'')
    ap.add_argument("--rt-loop", default=None, help='router-tuning loop overrides as JSON, e.g. \'{"steps": 60}\'')
    args = ap.parse_args()
    from flexolmo_core.io.params import read_params

    domains = args.domains.split(",") if args.domains else list(read_params(ROOT / "params.yaml")["domains"])
    out = Path(args.work)
    data = ROOT / "outputs/tokenizer"  # the tokenizer stage's packed splits (read only)
    if args.anchor_from and not (out / "anchor").exists():
        out.mkdir(parents=True, exist_ok=True)
        (out / "anchor").symlink_to(Path(args.anchor_from).resolve() / "anchor")
    stages(out, data, domains, args.anchor_steps, args.expert_steps, json.loads(args.embedding or "{}"),
           json.loads(args.expert or "{}"), json.loads(args.expert_loop or "{}"))
    merged = out / f"merged_k{args.top_k}"
    merge(out / "anchor/model", [out / f"expert/{d}/package" for d in domains], merged, top_k=args.top_k)

    anchor = load_anchor(out / "anchor/model")
    cfg = model_config_from_hf(anchor.config)
    loop = LoopConfig(micro_batch=8, seq_len=256, eval_batches=args.eval_batches)
    models = {"anchor": build(cfg, MoEShape(), from_hf_dense(anchor.state_dict(), cfg.n_layers, tied=cfg.tie_embeddings), lambda n: False,
                              torch.float32)}
    mcfg, state, manifest = read_merged(merged)
    E = manifest["num_experts"]
    models["merged"] = build(mcfg, MoEShape(E, manifest["top_k"], renormalize=RENORMALIZES[mcfg.family]), from_hf_moe(state, cfg.n_layers), lambda n: False,
                             torch.float32)
    if args.router_tune:
        import dataclasses
        import hashlib

        from flexolmo_core.training.config import RouterTuneConfig, load_stage
        from flexolmo_core.training.stages import tune_router

        overrides = (args.rt_loop or "") + (args.rt or "")
        suffix = f"_{hashlib.sha256(overrides.encode()).hexdigest()[:8]}" if overrides else ""
        tuned = out / f"router_tune_k{args.top_k}{suffix}"  # one folder per override set, reused across runs
        if not (tuned / "model/config.json").exists():
            _, rt, rt_loop = load_stage(RouterTuneConfig, "router_tune", ROOT / "params.yaml")
            rt_loop = dataclasses.replace(rt_loop, **json.loads(args.rt_loop or "{}"))
            rt = dataclasses.replace(rt, **json.loads(args.rt or "{}"))
            tune_router(merged, data / "public/train", [data / d / "train" for d in domains], tuned, rt_loop,
                        rt.public_windows, rt.proxy_windows, top_k=rt.top_k)
        _, rt_state, _ = read_merged(tuned / "model")
        models["merged_rt"] = build(mcfg, MoEShape(E, manifest["top_k"], renormalize=RENORMALIZES[mcfg.family]), from_hf_moe(rt_state, cfg.n_layers),
                                    lambda n: False, torch.float32)
    rows = []
    for d in ["public", *domains]:
        val = open_windows(data / f"{d}/validation", loop.seq_len)
        row = {"domain": d, "anchor": evaluate(models["anchor"], val, loop), "merged": evaluate(models["merged"], val, loop)}
        if "merged_rt" in models:
            row["merged_rt"] = evaluate(models["merged_rt"], val, loop)
        if d != "public":
            from flexolmo_core.expert.package import load_package
            from flexolmo_core.training.stages import owner_fast_model

            pkg = load_package(out / f"expert/{d}/package")
            L = cfg.n_layers
            pub = torch.stack([pkg.tensor(f"layers.{i}.public_router") for i in range(L)])
            dom = torch.stack([pkg.tensor(f"layers.{i}.router") for i in range(L)])
            owner, tensors = owner_fast_model(anchor, pub, dom, False)
            for i in range(L):
                for name, key in (("gate_up_1", "gate_up_proj"), ("down_1", "down_proj")):
                    getattr(owner.layers[i].w, name).data.copy_(pkg.tensor(f"layers.{i}.{key}"))
            row["owner"] = evaluate(owner, val, loop)
            row["merged_vs_owner"] = row["merged"] / row["owner"] - 1
            if "merged_rt" in row:
                row["rt_vs_owner"] = row["merged_rt"] / row["owner"] - 1
        rows.append(row)
        print(json.dumps(row), flush=True)
    rt = "merged_rt" in models
    print(f"\n| domain | anchor | owner model | merged (top-{manifest['top_k']} of {E}) | merged vs owner |"
          + (" merged-RT | RT vs owner |" if rt else ""))
    print("|---|---|---|---|---|" + ("---|---|" if rt else ""))
    nan = float("nan")
    for r in rows:
        print(f"| {r['domain']} | {r['anchor']:.3f} | {r.get('owner', nan):.3f} | {r['merged']:.3f} | "
              f"{100 * r.get('merged_vs_owner', nan):+.1f}% |"
              + (f" {r['merged_rt']:.3f} | {100 * r.get('rt_vs_owner', nan):+.1f}% |" if rt else ""))


if __name__ == "__main__":
    main()
