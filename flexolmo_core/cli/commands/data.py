"""Data commands: `flexolmo prepare` (the FlexMix corpus) and `flexolmo tokenizer train|pack`."""
from __future__ import annotations

import dataclasses
import json

from flexolmo_core.cli.config import add_out, add_stage_args
from flexolmo_core.data.config import PrepareConfig, TokenizerConfig, flexmix_domains, tokenizer_vocab
from flexolmo_core.data.prepare import build_flexmix
from flexolmo_core.data.readers import read_texts
from flexolmo_core.data.tokenize_stage import build_tokenizer_and_pack
from flexolmo_core.data.tokenizer import train_tokenizer
from flexolmo_core.io.params import read_params


def register(subparsers) -> None:
    p = subparsers.add_parser("prepare", help="build the FlexMix corpus: splits, dedup, decontamination, data card")
    add_out(p, "output folder (replaced atomically)", default="outputs/prepare")
    add_stage_args(p, ("prepare",), PrepareConfig, "prepare", params_default="params.yaml")
    p.set_defaults(func=cmd_prepare)

    tok = subparsers.add_parser("tokenizer", help="train the anchor tokenizer or pack data with it")
    sub = tok.add_subparsers(dest="tokenizer_command", required=True, metavar="ACTION")
    p = sub.add_parser("train", help="train a byte-level BPE tokenizer (HF format) on the given text")
    p.add_argument("--data", nargs="+", required=True, metavar="PATH",
                   help="parquet/jsonl/txt files or folders (a prepare split folder works: .../public/train)")
    add_out(p, "tokenizer folder (AutoTokenizer.from_pretrained loads it)")
    add_stage_args(p, ("tokenizer", "train"), TokenizerConfig, "tokenizer")
    p.set_defaults(func=cmd_tokenizer_train)
    p = sub.add_parser("pack", help="tokenizer stage by hand: train on public/train and pack every domain split")
    p.add_argument("--prepared", default="outputs/prepare", help="the prepare stage's output folder")
    add_out(p, "the tokenizer stage's output folder", default="outputs/tokenizer")
    add_stage_args(p, ("tokenizer", "pack"), TokenizerConfig, "tokenizer", params_default="params.yaml")
    p.set_defaults(func=cmd_tokenizer_pack)


def cmd_prepare(args) -> None:
    card = build_flexmix(args.stage, flexmix_domains(read_params(args.params).get("domains")), args.out)
    print(json.dumps(card["domains"], indent=2))


def cmd_tokenizer_train(args) -> None:
    cfg = args.stage
    vocab = tokenizer_vocab(cfg, _preset(args))
    texts = read_texts(args.data)
    out = train_tokenizer(texts, vocab, args.out, cfg.min_frequency, cfg.eos_token, cfg.pad_token)
    print(f"tokenizer ({vocab} tokens, {len(texts)} documents) -> {out}")


def _preset(args) -> str | None:
    return read_params(args.params).get("preset") if args.params else None


def cmd_tokenizer_pack(args) -> None:
    stage = dataclasses.replace(args.stage, vocab_size=tokenizer_vocab(args.stage, _preset(args)))
    card = build_tokenizer_and_pack(stage, args.prepared, flexmix_domains(read_params(args.params).get("domains")), args.out)
    print(json.dumps(card["domains"], indent=2))
