"""Stage `domain_embedding@<domain>`: a router embedding from the domain's documents (`public` too).
`python -m tasks.domain_embedding <domain>`

in:  outputs/anchor/model, outputs/prepare/<domain>/train
out: outputs/domain_embedding/<domain>/ (embedding.safetensors, embedding.json)"""
from __future__ import annotations

import dataclasses
import sys

from flexolmo_core.training.config import DomainEmbeddingConfig, load_stage
from flexolmo_core.training.embeddings import compute_embedding, save_embedding
from flexolmo_core.training.stages import read_documents

ANCHOR = "outputs/anchor/model"


def main(domain: str, params: str = "params.yaml"):
    _, cfg, _ = load_stage(DomainEmbeddingConfig, "domain_embedding", params, domain=domain)
    rows = compute_embedding(cfg.mode, domain, read_documents([f"outputs/prepare/{domain}/train"]), ANCHOR, cfg)
    meta = {"domain": domain, **{k: v for k, v in dataclasses.asdict(cfg).items() if k != "presets"}}
    save_embedding(f"outputs/domain_embedding/{domain}", rows, meta)
    return rows


if __name__ == "__main__":
    main(*sys.argv[1:])
