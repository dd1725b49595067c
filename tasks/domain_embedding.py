"""Stage `domain_embedding@<domain>`: a router embedding from the domain's documents (`public` too).
`python -m tasks.domain_embedding <domain>`

in:  outputs/anchor/model, outputs/prepare/<domain>/train (+ outputs/domain_embedding/public, whose raw
     mean the other domains center on when domain_embedding.center is true)
out: outputs/domain_embedding/<domain>/ (embedding.safetensors, embedding.json)"""
from __future__ import annotations

from flexolmo_core.training.config import DomainEmbeddingConfig, load_stage
from flexolmo_core.training.jobs import EmbeddingJob, embed_domain_job
from tasks import run

ANCHOR = "outputs/anchor/model"
PUBLIC = "outputs/domain_embedding/public"


def main(domain: str, params: str = "params.yaml"):
    _, cfg, _ = load_stage(DomainEmbeddingConfig, "domain_embedding", params, domain=domain)
    return embed_domain_job(EmbeddingJob(ANCHOR, domain, f"outputs/prepare/{domain}/train",
                                         f"outputs/domain_embedding/{domain}", cfg, PUBLIC))


if __name__ == "__main__":
    run(main)
