"""Stage `expert@<domain>`: train the owner's expert against the frozen anchor. `python -m tasks.expert <domain>`

in:  outputs/anchor/model, outputs/tokenizer/<domain>/{train,validation},
     outputs/domain_embedding/{public,<domain>}  (nothing of any other domain)
out: outputs/expert/<domain>/package (the expert package), outputs/expert/<domain>/run, .../summary.json"""
from __future__ import annotations

from flexolmo_core.training.config import ExpertConfig, load_stage
from flexolmo_core.training.jobs import ExpertJob, train_expert_job
from tasks import pin_dtype, run

ANCHOR = "outputs/anchor/model"
EMBEDDINGS = "outputs/domain_embedding"


def main(domain: str, params: str = "params.yaml") -> dict:
    _, cfg, loop = load_stage(ExpertConfig, "expert", params, domain=domain)
    return train_expert_job(ExpertJob(
        ANCHOR, domain, f"outputs/tokenizer/{domain}/train", f"outputs/expert/{domain}", cfg, pin_dtype(loop),
        val_data=f"outputs/tokenizer/{domain}/validation", public_embedding=f"{EMBEDDINGS}/public",
        domain_embedding=f"{EMBEDDINGS}/{domain}"))


if __name__ == "__main__":
    run(main)
