"""DVC stage `tokenizer`: outputs/prepare -> outputs/tokenizer/tokenizer (the anchor's HF tokenizer: trained on
public/train only, or the imported anchor's own when `anchor.source` is a checkpoint) and
outputs/tokenizer/<domain>/<split>/ (packed token shards + index.json) + card."""
from __future__ import annotations

import dataclasses
import json

from flexolmo_core.data.config import TokenizerConfig, flexmix_domains, tokenizer_vocab
from flexolmo_core.data.tokenize_stage import build_tokenizer_and_pack
from flexolmo_core.io.params import load_section, read_params
from flexolmo_core.training.config import AnchorConfig, load_stage
from tasks import run, say

PREPARED = "outputs/prepare"
OUT = "outputs/tokenizer"


def main(params: str = "params.yaml") -> None:
    config = load_section(TokenizerConfig, "tokenizer", params)
    _, anchor, _ = load_stage(AnchorConfig, "anchor", params)  # with the preset's overrides
    source = None if anchor.source == "train" else (anchor.source, anchor.gguf_file)
    if source is None:  # trained here, to the model preset's vocabulary; an imported anchor brings its tokenizer
        config = dataclasses.replace(config, vocab_size=tokenizer_vocab(config, read_params(params).get("preset")))
    card = build_tokenizer_and_pack(config, PREPARED, flexmix_domains(read_params(params).get("domains")), OUT,
                                    anchor_source=source, progress=say)
    print(json.dumps({"tokenizer_sha256": card["tokenizer_sha256"], "pack_tokens_per_second": card["pack_tokens_per_second"],
                      "tokens": {d: r["train"]["tokens"] for d, r in card["domains"].items()}}, indent=2))


if __name__ == "__main__":
    run(main)
