"""Data commands: `flexolmo prepare` (the FlexMix corpus) and `flexolmo tokenizer train|pack`."""
from __future__ import annotations

import json


def register(subparsers) -> None:
    p = subparsers.add_parser("prepare", help="build the FlexMix corpus: splits, dedup, decontamination, data card")
    p.add_argument("--params", default="params.yaml", help="params file with `prepare` and `domains` (default params.yaml)")
    p.add_argument("--tier", help="override prepare.tier (dev | full | any tier in params)")
    p.add_argument("--out", default="outputs/prepare", help="output folder (replaced atomically)")
    p.set_defaults(func=cmd_prepare)

    tok = subparsers.add_parser("tokenizer", help="train the anchor tokenizer or pack data with it")
    sub = tok.add_subparsers(dest="tokenizer_command", required=True, metavar="ACTION")
    p = sub.add_parser("train", help="train a byte-level BPE tokenizer (HF format) on the given text")
    p.add_argument("--data", nargs="+", required=True, metavar="PATH",
                   help="parquet/jsonl/txt files or folders (a prepare split folder works: .../public/train)")
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--min-frequency", type=int, default=2)
    p.add_argument("--out", required=True, help="tokenizer folder (AutoTokenizer.from_pretrained loads it)")
    p.set_defaults(func=cmd_tokenizer_train)
    p = sub.add_parser("pack", help="tokenizer stage by hand: train on public/train and pack every domain split")
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--prepared", default="outputs/prepare", help="the prepare stage's output folder")
    p.add_argument("--out", default="outputs/tokenizer")
    p.set_defaults(func=cmd_tokenizer_pack)


def cmd_prepare(args) -> None:
    from ..data.config import PrepareConfig, flexmix_domains
    from ..data.prepare import build_flexmix
    from ..params import load_section, read_params

    config = load_section(PrepareConfig, "prepare", args.params)
    if args.tier:
        config.tier = args.tier
    card = build_flexmix(config, flexmix_domains(read_params(args.params).get("domains")), args.out)
    print(json.dumps(card["domains"], indent=2))


def cmd_tokenizer_train(args) -> None:
    from ..data.tokenizer import train_tokenizer

    texts = []
    for path in args.data:  # a `datasets` save_to_disk folder: read its arrow text column
        texts += _texts_from(path)
    out = train_tokenizer(texts, args.vocab_size, args.out, args.min_frequency)
    print(f"tokenizer ({args.vocab_size} tokens, {len(texts)} documents) -> {out}")


def _texts_from(path: str) -> list[str]:
    from pathlib import Path

    from ..data.tokenizer import read_training_texts

    if (Path(path) / "state.json").exists():
        import datasets

        return list(datasets.load_from_disk(path)["text"])
    return read_training_texts([path])


def cmd_tokenizer_pack(args) -> None:
    from ..data.config import TokenizerConfig, flexmix_domains
    from ..data.tokenize_stage import build_tokenizer_and_pack
    from ..params import load_section, read_params

    config = load_section(TokenizerConfig, "tokenizer", args.params)
    card = build_tokenizer_and_pack(config, args.prepared, flexmix_domains(read_params(args.params).get("domains")), args.out)
    print(json.dumps(card["domains"], indent=2))
