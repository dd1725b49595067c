"""Training commands beyond `anchor train` / `expert train`: router embeddings, router tuning, and the
unrestricted-MoE baseline. Each takes its flags from its stage's config (flexolmo_core/cli/config.py)."""
from __future__ import annotations

import json
from pathlib import Path

from flexolmo_core.cli.commands.core import model_preset
from flexolmo_core.cli.config import add_out, add_stage_args
from flexolmo_core.merge.merging import default_top_k
from flexolmo_core.training.config import DomainEmbeddingConfig, RouterTuneConfig, UnrestrictedConfig
from flexolmo_core.training.jobs import EmbeddingJob, embed_domain_job
from flexolmo_core.training.stages import flops_budget, train_unrestricted, tune_router


def register(subparsers) -> None:
    emb = subparsers.add_parser("embedding", help="router embeddings for a domain (the domain_embedding stage)")
    emb_sub = emb.add_subparsers(dest="embedding_command", required=True, metavar="ACTION")
    p = emb_sub.add_parser("compute", help="a domain's router embedding from its documents")
    p.add_argument("--anchor", required=True, help="the anchor folder (its router projection and encoder settings)")
    p.add_argument("--domain", required=True, help="a domain name, or 'public' for the public row")
    p.add_argument("--data", nargs="+", required=True, help="a `datasets` split, .parquet, .jsonl or .txt files/folders")
    add_out(p, "the embedding folder to write")
    p.add_argument("--public-embedding", default=None, metavar="DIR",
                   help="with --center, a domain row subtracts this public embedding's saved reference mean")
    add_stage_args(p, ("embedding", "compute"), DomainEmbeddingConfig, "domain_embedding", per_domain=True)
    p.set_defaults(func=cmd_embedding)

    router = subparsers.add_parser("router", help="router tuning of a merged model")
    router_sub = router.add_subparsers(dest="router_command", required=True, metavar="ACTION")
    p = router_sub.add_parser("tune", help="train only router rows, all experts active, on proxy data")
    p.add_argument("--model", required=True, help="merged model directory")
    p.add_argument("--public-data", nargs="+", required=True, help="public text the tuned router also sees")
    p.add_argument("--proxy-data", action="append", default=[], metavar="PATH", help="an owner's shared proxy set")
    p.add_argument("--val-data", nargs="+", default=None, help="validation text (default: none; no val loss)")
    add_out(p, "stage folder: writes model/, run/, summary.json")
    add_stage_args(p, ("router", "tune"), RouterTuneConfig, "router_tune", loop=True)
    p.set_defaults(func=cmd_router_tune)

    base = subparsers.add_parser("baseline", help="train baselines")
    base_sub = base.add_subparsers(dest="baseline_command", required=True, metavar="ACTION")
    p = base_sub.add_parser("unrestricted", help="the MoE trained jointly on all data with the FlexOlmo FLOPs")
    p.add_argument("--preset", default=None, help="model scale (default: --params' top-level preset)")
    p.add_argument("--tokenizer", required=True, help="Hugging Face tokenizer directory")
    p.add_argument("--data", action="append", required=True, metavar="PATH", help="one per domain, public included")
    p.add_argument("--val-data", nargs="+", default=None, help="validation text (default: none; no val loss)")
    add_out(p, "stage folder: writes model/, run/, summary.json")
    p.add_argument("--experts", type=int, required=True, help="experts in the MoE (FlexOlmo's: public + one per domain)")
    p.add_argument("--budget-from", nargs="*", default=[], metavar="SUMMARY",
                   help="summary.json files of the anchor and experts: match their total training FLOPs")
    add_stage_args(p, ("baseline", "unrestricted"), UnrestrictedConfig, "unrestricted_moe", loop=True)
    p.set_defaults(func=cmd_unrestricted)


def cmd_embedding(args) -> None:
    rows = embed_domain_job(EmbeddingJob(args.anchor, args.domain, args.data, args.out, args.stage,
                                         args.public_embedding))
    print(json.dumps({"embedding": args.out, "shape": list(rows.shape)}))


def cmd_router_tune(args) -> None:
    cfg = args.stage
    summary = tune_router(args.model, args.public_data, args.proxy_data, args.out, args.loop, cfg.public_windows,
                          cfg.proxy_windows, val_data=args.val_data, top_k=cfg.top_k)
    print(json.dumps({k: summary[k] for k in ("steps", "train_loss", "val_loss", "experts")}))


def cmd_unrestricted(args) -> None:
    top_k = args.stage.top_k or default_top_k(args.experts)
    budget = flops_budget([json.loads(Path(s).read_text()) for s in args.budget_from]) if args.budget_from else None
    summary = train_unrestricted(args.tokenizer, args.data, args.out, model_preset(args), args.experts, top_k,
                                 args.loop, budget, val_data=args.val_data, init_seed=args.stage.init_seed)
    print(json.dumps({k: summary[k] for k in ("steps", "train_loss", "val_loss", "budget_flops")}))
