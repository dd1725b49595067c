"""Training commands beyond `anchor train` / `expert train`: router embeddings, router tuning, and the
unrestricted-MoE baseline."""
from __future__ import annotations

import json


def register(subparsers) -> None:
    from ..training.cli_args import add_loop_args

    emb = subparsers.add_parser("embedding", help="router embeddings for a domain (the domain_embedding stage)")
    emb_sub = emb.add_subparsers(dest="embedding_command", required=True, metavar="ACTION")
    p = emb_sub.add_parser("compute", help="a domain's router embedding from its documents")
    p.add_argument("--anchor", required=True)
    p.add_argument("--domain", required=True, help="a domain name, or 'public' for the public row")
    p.add_argument("--data", nargs="+", required=True, help=".parquet split or .txt/.jsonl files/folders")
    p.add_argument("--out", required=True)
    p.add_argument("--mode", default="encoder", choices=["encoder", "anchor-hidden", "random"])
    p.add_argument("--encoder", default="all-MiniLM-L6-v2")
    p.add_argument("--documents", type=int, default=1000)
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--unit-norm", action="store_true", help="L2-normalise each row before --scale")
    p.add_argument("--center", nargs="?", const="", default=None, metavar="PUBLIC_EMBEDDING",
                   help="subtract the public mean: for the public row give no value; for a domain give the "
                        "public embedding folder (its saved reference mean)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_embedding)

    router = subparsers.add_parser("router", help="router tuning of a merged model")
    router_sub = router.add_subparsers(dest="router_command", required=True, metavar="ACTION")
    p = router_sub.add_parser("tune", help="train only router rows, all experts active, on proxy data")
    p.add_argument("--model", required=True, help="merged model directory")
    p.add_argument("--public-data", nargs="+", required=True)
    p.add_argument("--proxy-data", action="append", default=[], metavar="PATH", help="an owner's shared proxy set")
    p.add_argument("--val-data", nargs="+", default=None)
    p.add_argument("--out", required=True, help="stage folder: writes model/, run/, summary.json")
    p.add_argument("--public-windows", type=int, default=64)
    p.add_argument("--proxy-windows", type=int, default=64)
    p.add_argument("--top-k", type=int, default=None, help="experts per token while tuning (default: all)")
    add_loop_args(p)
    p.set_defaults(func=cmd_router_tune)

    base = subparsers.add_parser("baseline", help="train baselines")
    base_sub = base.add_subparsers(dest="baseline_command", required=True, metavar="ACTION")
    p = base_sub.add_parser("unrestricted", help="the MoE trained jointly on all data with the FlexOlmo FLOPs")
    p.add_argument("--preset", required=True)
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--data", action="append", required=True, metavar="PATH", help="one per domain, public included")
    p.add_argument("--val-data", nargs="+", default=None)
    p.add_argument("--out", required=True)
    p.add_argument("--experts", type=int, required=True)
    p.add_argument("--top-k", type=int, required=True)
    p.add_argument("--budget-from", nargs="*", default=[], metavar="SUMMARY",
                   help="summary.json files of the anchor and experts: match their total training FLOPs")
    add_loop_args(p)
    p.set_defaults(func=cmd_unrestricted)


def cmd_embedding(args) -> None:
    from ..training.config import DomainEmbeddingConfig
    from ..training.embeddings import write_domain_embedding
    from ..training.stages import read_documents

    cfg = DomainEmbeddingConfig(mode=args.mode, encoder=args.encoder, documents=args.documents, scale=args.scale,
                                seed=args.seed, center=args.center is not None, unit_norm=args.unit_norm)
    meta = {"domain": args.domain, "mode": cfg.mode, "encoder": cfg.encoder, "documents": cfg.documents,
            "scale": cfg.scale, "seed": cfg.seed, "center": cfg.center, "unit_norm": cfg.unit_norm}
    rows = write_domain_embedding(args.out, args.domain, read_documents(args.data), args.anchor, cfg, meta,
                                  args.center or None)
    print(json.dumps({"embedding": args.out, "shape": list(rows.shape)}))


def cmd_router_tune(args) -> None:
    from ..training.cli_args import loop_from_args
    from ..training.config import RouterTuneConfig
    from ..training.stages import tune_router

    _, loop = loop_from_args(args, RouterTuneConfig, "router_tune")
    summary = tune_router(args.model, args.public_data, args.proxy_data, args.out, loop, args.public_windows,
                          args.proxy_windows, val_data=args.val_data, top_k=args.top_k)
    print(json.dumps({k: summary[k] for k in ("steps", "train_loss", "val_loss", "experts")}))


def cmd_unrestricted(args) -> None:
    from pathlib import Path

    from ..training.cli_args import loop_from_args
    from ..training.config import UnrestrictedConfig
    from ..training.stages import flops_budget, train_unrestricted

    _, loop = loop_from_args(args, UnrestrictedConfig, "unrestricted_moe")
    budget = flops_budget([json.loads(Path(s).read_text()) for s in args.budget_from]) if args.budget_from else None
    summary = train_unrestricted(args.tokenizer, args.data, args.out, args.preset, args.experts, args.top_k, loop,
                                 budget, val_data=args.val_data)
    print(json.dumps({k: summary[k] for k in ("steps", "train_loss", "val_loss", "budget_flops")}))
