"""The `tokenizer` stage: train the anchor tokenizer on the public train split, then pack every domain split.

Packing lives here, not in `prepare`, because token ids depend on the tokenizer; it does not depend on the
model's context length (the loader cuts samples), so one packing serves every preset."""
from __future__ import annotations

import time
from pathlib import Path

from tokenizers import Tokenizer

from flexolmo_core.anchor.importing import locate, write_tokenizer
from flexolmo_core.data.config import TokenizerConfig, check_domain_name
from flexolmo_core.data.packing import tokenize_documents, write_packed
from flexolmo_core.data.prepare import SPLITS, load_split
from flexolmo_core.data.tokenizer import tokenizer_sha256, train_tokenizer
from flexolmo_core.errors import InputError
from flexolmo_core.io.atomic import atomic_dir, atomic_file, write_json


def build_tokenizer_and_pack(config: TokenizerConfig, prepare_dir: str | Path, domains: list[str],
                             out_dir: str | Path, anchor_source: tuple[str, str | None] | None = None,
                             progress=None) -> dict:
    """out_dir/tokenizer (HF tokenizer), out_dir/<domain>/<split>/ (shards + index.json), card.json/.md.

    The tokenizer is trained on `config.train_domain`'s train split, or, with `anchor_source` = (source,
    gguf_file) of an imported anchor, is that checkpoint's own. Each domain's packed data sits in its own
    folder so an expert stage can depend on that folder alone."""
    from transformers import AutoTokenizer

    for d in domains:
        check_domain_name(d)
        if d == "tokenizer":
            raise InputError("'tokenizer' cannot be a domain name: outputs/tokenizer/tokenizer holds the tokenizer")
    if config.train_domain not in domains:
        raise InputError(f"tokenizer.train_domain {config.train_domain!r} is not in domains {domains}")
    prepare_dir = Path(prepare_dir)
    texts = {(d, s): load_split(prepare_dir, d, s)["text"] for d in domains for s in SPLITS}  # fail before writing
    with atomic_dir(out_dir) as tmp:
        t0 = time.perf_counter()
        if anchor_source is None:
            train_tokenizer(texts[(config.train_domain, "train")], config.vocab_size, tmp / "tokenizer",
                            config.min_frequency, config.eos_token, config.pad_token)
            origin = f"byte-level BPE trained on `{config.train_domain}/train` only"
        else:
            (tmp / "tokenizer").mkdir()
            write_tokenizer(*locate(*anchor_source), tmp / "tokenizer")
            origin = f"the imported anchor's own tokenizer ({anchor_source[0]})"
        train_seconds = time.perf_counter() - t0
        say = progress or (lambda message: None)
        say(f"tokenizer: {origin} ({train_seconds:.1f} s)")
        tok = Tokenizer.from_file(str(tmp / "tokenizer" / "tokenizer.json"))
        eos_id = AutoTokenizer.from_pretrained(tmp / "tokenizer").eos_token_id
        if eos_id is None:
            raise InputError(f"{tmp / 'tokenizer'}: the tokenizer has no EOS token; documents are separated by EOS")
        meta = {"tokenizer_sha256": tokenizer_sha256(tmp / "tokenizer"), "eos_token_id": eos_id,
                "vocab_size": tok.get_vocab_size()}
        rows, total_tokens, t0 = {}, 0, time.perf_counter()
        for k, ((domain, split), docs) in enumerate(texts.items(), 1):
            stream = tokenize_documents(docs, tok, eos_id)
            say(f"tokenizer: [{k}/{len(texts)}] packed {domain}/{split}: {len(stream):,} tokens "
                f"({time.perf_counter() - t0:.1f} s so far)")
            index = write_packed(stream, tmp / domain / split, config.seq_len, config.shard_tokens,
                                 {**meta, "domain": domain, "split": split, "num_documents": len(docs)})
            rows.setdefault(domain, {})[split] = {"documents": len(docs), "tokens": index["num_tokens"],
                                                  "samples": index["num_samples"]}
            total_tokens += len(stream)
        pack_seconds = time.perf_counter() - t0
        card = {**meta, "seq_len": config.seq_len, "origin": origin,
                "train_seconds": round(train_seconds, 2), "pack_seconds": round(pack_seconds, 2),
                "pack_tokens_per_second": round(total_tokens / max(pack_seconds, 1e-9)), "domains": rows}
        write_json(tmp / "card.json", card)
        lines = ["# Anchor tokenizer and packed data", "",
                 f"{origin[0].upper() + origin[1:]}, vocab {meta['vocab_size']:,} "
                 f"(sha256 `{meta['tokenizer_sha256'][:16]}`). Packed at {card['pack_tokens_per_second']:,} tokens/s.",
                 "", "| domain | train tokens | validation tokens | test tokens |", "|---|---|---|---|"]
        lines += [f"| {d} | " + " | ".join(f"{r[s]['tokens']:,}" for s in SPLITS) + " |" for d, r in rows.items()]
        with atomic_file(tmp / "card.md") as f:
            f.write("\n".join(lines) + "\n")
    return card
