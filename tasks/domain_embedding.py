"""Stage `domain_embedding@<domain>`: a router embedding from the domain's documents (`public` too).
`python -m tasks.domain_embedding <domain>`

in:  outputs/anchor/model, outputs/prepare/<domain>/train (+ outputs/domain_embedding/public, whose raw
     mean the other domains center on when domain_embedding.center is true)
out: outputs/domain_embedding/<domain>/ (embedding.safetensors, embedding.json)"""
from __future__ import annotations

import dataclasses
import sys

from flexolmo_core.training.config import DomainEmbeddingConfig, load_stage
from flexolmo_core.training.embeddings import compute_embedding, load_reference, save_embedding
from flexolmo_core.training.stages import read_documents

ANCHOR = "outputs/anchor/model"
PUBLIC = "outputs/domain_embedding/public"


def main(domain: str, params: str = "params.yaml"):
    _, cfg, _ = load_stage(DomainEmbeddingConfig, "domain_embedding", params, domain=domain)
    reference = load_reference(PUBLIC) if cfg.center and domain != "public" else None
    rows, raw = compute_embedding(cfg.mode, domain, read_documents([f"outputs/prepare/{domain}/train"]), ANCHOR, cfg,
                                  reference)
    meta = {"domain": domain, **{k: v for k, v in dataclasses.asdict(cfg).items() if k != "presets"}}
    save_embedding(f"outputs/domain_embedding/{domain}", rows, meta, reference=raw if domain == "public" else None)
    return rows


if __name__ == "__main__":
    main(*sys.argv[1:])
