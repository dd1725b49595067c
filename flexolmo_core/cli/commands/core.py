"""Core commands: params, anchor init, expert train, merge, generate, inspect."""
from __future__ import annotations

import json
from pathlib import Path

from flexolmo_core.anchor.importing import import_anchor
from flexolmo_core.anchor.model import init_anchor
from flexolmo_core.anchor.presets import get_preset
from flexolmo_core.cli.config import add_out, add_stage_args
from flexolmo_core.cli.inspect import describe
from flexolmo_core.errors import InputError
from flexolmo_core.inference.model import generate, load_flexolmo
from flexolmo_core.io.params import read_params
from flexolmo_core.io.stream_safetensors import parse_size
from flexolmo_core.merge.merging import merge
from flexolmo_core.training.config import AnchorConfig, ExpertConfig
from flexolmo_core.training.jobs import ExpertJob, train_expert_job
from flexolmo_core.training.stages import train_anchor


def register(subparsers) -> None:
    p = subparsers.add_parser("params", help="parameter and FLOP counts of a preset, without allocating weights")
    p.add_argument("--preset", required=True, help="smoke | tiny | small | olmo2-7b")
    p.add_argument("--experts", type=int, default=1, help="number of experts (1 = the dense anchor)")
    p.add_argument("--top-k", type=int, default=None, help="active experts per token (default: all)")
    p.add_argument("--seq-len", type=int, default=None, help="sequence length for attention FLOPs")
    p.set_defaults(func=cmd_params)

    anchor = subparsers.add_parser("anchor", help="make or inspect the anchor (dense public model)")
    anchor_sub = anchor.add_subparsers(dest="anchor_command", required=True, metavar="ACTION")
    p = anchor_sub.add_parser("init", help="a randomly initialised anchor checkpoint with its tokenizer")
    p.add_argument("--preset", required=True, help="model scale: a preset of flexolmo_core/anchor/presets.py (tiny, small, ...)")
    p.add_argument("--tokenizer", required=True, help="Hugging Face tokenizer directory")
    add_out(p, "the anchor folder to write")
    p.add_argument("--seed", type=int, default=0, help="initialisation seed")
    p.set_defaults(func=cmd_anchor_init)
    p = anchor_sub.add_parser("train", help="pretrain the dense anchor on public data (resumes from its run dir)")
    p.add_argument("--preset", default=None, help="model scale (default: --params' top-level preset)")
    p.add_argument("--tokenizer", required=True, help="Hugging Face tokenizer directory")
    p.add_argument("--data", nargs="+", required=True, help="a packed split directory, or .txt/.jsonl files/folders")
    p.add_argument("--val-data", nargs="+", default=None, help="public validation data (same forms as --data)")
    add_out(p, "stage folder: writes model/, run/, summary.json")
    add_stage_args(p, ("anchor", "train"), AnchorConfig, "anchor", loop=True)
    p.set_defaults(func=cmd_anchor_train)

    p = anchor_sub.add_parser("import", help="a published OLMo-2 or Llama-family checkpoint (safetensors or GGUF) "
                                             "as the anchor folder owners receive")
    p.add_argument("--from", dest="source", default=None, metavar="PATH_OR_HUB_ID",
                   help="a checkpoint folder (safetensors, one file or sharded), a .gguf file, "
                        "pkg:<package>/<file> or a hub id (needs network); default: --source (anchor.source)")
    add_out(p, "the anchor folder to write (replaced atomically)")
    p.add_argument("--replay-data", nargs="+", default=None,
                   help="public text for the replay sample owners mix in (anchor.replay_tokens of it)")
    p.add_argument("--seq-len", type=int, default=256, help="window length of the replay sample")
    add_stage_args(p, ("anchor", "import"), AnchorConfig, "anchor")
    p.set_defaults(func=cmd_anchor_import)

    expert = subparsers.add_parser("expert", help="train an owner's expert against the anchor")
    expert_sub = expert.add_subparsers(dest="expert_command", required=True, metavar="ACTION")
    p = expert_sub.add_parser("train", help="train expert 1 of a 2-expert model; write an expert package")
    add_expert_train_args(p)
    p.set_defaults(func=cmd_expert_train)

    p = subparsers.add_parser("merge", help="merge the anchor and expert packages (no training)")
    p.add_argument("--anchor", required=True, help="the anchor every package was trained against")
    p.add_argument("--expert", action="append", required=True, metavar="PKG", help="an expert package (repeatable)")
    add_out(p, "the merged checkpoint folder to write")
    p.add_argument("--top-k", type=int, default=None, help="experts per token (default: half, rounded up)")
    p.add_argument("--exclude", action="append", default=[], metavar="NAME", help="leave this domain out")
    p.add_argument("--shard-size", default="5GB", help="split the weights into shards of at most this size, with an "
                   "index (transformers' layout: 5GB, 500MB, bytes)")
    p.add_argument("--router-scale", type=float, default=1.0, help="multiply every router row by this "
                   "(1/temperature of the router softmax; default 1, the paper)")
    p.set_defaults(func=cmd_merge)

    p = subparsers.add_parser("generate", help="generate with a merged model, choosing experts; prints attribution")
    p.add_argument("--model", required=True, help="a merged FlexOlmo checkpoint folder")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--exclude", default="", help="comma-separated experts to switch off")
    group.add_argument("--only", default=None, help="comma-separated experts to keep (public must be named to keep it)")
    p.add_argument("--top-k", type=int, default=None, help="experts per token (default: the checkpoint's)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (greedy)")
    p.add_argument("--strict", action="store_true", help="load only the kept experts' weights")
    p.add_argument("--use-bias", action="store_true", help="re-apply learned router biases dropped at merge")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where the model runs: auto is the GPU when torch sees one (fp32 on the CPU, own dtype on a GPU)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("prompt", help="the text to continue")
    p.set_defaults(func=cmd_generate)

    p = subparsers.add_parser("inspect", help="describe an anchor, an expert package or a merged model")
    p.add_argument("path", help="a checkpoint or package folder")
    p.set_defaults(func=cmd_inspect)


def add_expert_train_args(p) -> None:
    p.add_argument("--anchor", required=True, help="the anchor folder (frozen; its fingerprint goes into the package)")
    p.add_argument("--domain", required=True, help="the expert's domain name (lower-case letters, digits and _, starting with a letter)")
    p.add_argument("--data", nargs="+", required=True, help="the owner's data: a `datasets` split, .parquet, .jsonl or .txt")
    add_out(p, "expert package directory to write")
    p.add_argument("--val-data", nargs="+", default=None, help="the owner's validation data")
    p.add_argument("--public-embedding", default=None, help="router embedding dir for the public row (omitted: zeros)")
    p.add_argument("--domain-embedding", default=None, help="router embedding dir for this domain's row")
    p.add_argument("--run-dir", default=None, help="checkpoints + dvclive (default: <out>.run); resumes from it")
    add_stage_args(p, ("expert", "train"), ExpertConfig, "expert", loop=True, per_domain=True)


def cmd_params(args) -> None:
    cfg = get_preset(args.preset)
    top_k = args.top_k or args.experts
    out = {"preset": args.preset, "experts": args.experts, "top_k": top_k, **cfg.counts(args.experts, top_k),
           "flops_per_token": cfg.flops_per_token(args.experts, top_k, args.seq_len)}
    print(json.dumps(out, indent=2))


def cmd_anchor_init(args) -> None:
    fingerprint = init_anchor(args.preset, args.tokenizer, args.out, seed=args.seed)
    print(json.dumps({"anchor": args.out, "fingerprint": fingerprint}))


def model_preset(args) -> str:
    """--preset, else the top-level `preset` of --params."""
    if args.preset:
        return args.preset
    if not args.params:
        raise InputError("give --preset (smoke | tiny | small | olmo2-7b) or --params with a top-level `preset`")
    return read_params(args.params).get("preset", "tiny")


def cmd_anchor_train(args) -> None:
    stage = args.stage
    if stage.source != "train":
        raise InputError(f"anchor.source is {stage.source!r}: that anchor is imported, not trained "
                         "(flexolmo anchor import)")
    summary = train_anchor(args.tokenizer, args.data, args.out, model_preset(args), args.loop, val_data=args.val_data,
                           init_seed=stage.init_seed, projection_dim=stage.projection_dim,
                           projection_seed=stage.projection_seed, replay_tokens=stage.replay_tokens)
    if summary.get("fingerprint") is None:  # not rank 0 of a torchrun job: rank 0 reports
        return
    print(json.dumps({"anchor": str(Path(args.out) / "model"), "fingerprint": summary.get("fingerprint"),
                      "train_loss": summary["train_loss"], "val_loss": summary["val_loss"]}))


def cmd_anchor_import(args) -> None:
    stage = args.stage
    source = args.source or (stage.source if stage.source != "train" else None)
    if source is None:
        raise InputError("give --from (or --params with an anchor.source that names a checkpoint)")
    manifest = import_anchor(source, args.out, gguf_file=stage.gguf_file, projection_dim=stage.projection_dim,
                             projection_seed=stage.projection_seed, replay_data=args.replay_data,
                             replay_tokens=stage.replay_tokens, seq_len=args.seq_len)
    print(json.dumps({"anchor": args.out, **{k: manifest[k] for k in ("fingerprint", "family", "model_type", "dtype")}}))


def cmd_expert_train(args) -> None:
    summary = train_expert_job(ExpertJob(
        args.anchor, args.domain, args.data, Path(args.run_dir or f"{args.out}.run"), args.stage, args.loop,
        val_data=args.val_data, public_embedding=args.public_embedding, domain_embedding=args.domain_embedding,
        package_dir=args.out))
    print(json.dumps({"package": args.out, "domain": args.domain, "training": {
        k: summary[k] for k in ("steps", "train_loss", "val_loss", "tokens_per_s", "mfu")}}))


def cmd_merge(args) -> None:
    manifest = merge(args.anchor, args.expert, args.out, top_k=args.top_k, exclude=args.exclude,
                     shard_bytes=parse_size(args.shard_size), router_scale=args.router_scale)
    print(json.dumps({"model": args.out, "experts": [e["domain"] for e in manifest["experts"]],
                      "top_k": manifest["top_k"]}))


def _names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


def cmd_generate(args) -> None:
    loaded = load_flexolmo(args.model, exclude=_names(args.exclude), only=None if args.only is None else _names(args.only), top_k=args.top_k,
                           strict=args.strict, use_bias=args.use_bias, device=args.device)
    result = generate(loaded, args.prompt, max_new_tokens=args.max_new_tokens)
    if args.json:
        print(json.dumps(result))
        return
    print(args.prompt + result["text"])
    print("\n-- attribution (share of routing weight over the generated tokens) --")
    for name, share in sorted(result["attribution"].items(), key=lambda kv: -kv[1]):
        if name not in result["off"]:
            print(f"{name:>14}  {share:6.1%}  {'#' * round(share * 40)}")
    for name in result["off"]:  # switched off for this request: not the same as an expert that got no tokens
        print(f"{name:>14}     off")


def cmd_inspect(args) -> None:
    print(json.dumps(describe(Path(args.path)), indent=2))
