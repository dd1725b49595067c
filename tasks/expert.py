"""Stage `expert@<domain>`: train the owner's expert against the frozen anchor. `python -m tasks.expert <domain>`

in:  outputs/anchor/model, outputs/tokenizer/<domain>/{train,validation},
     outputs/domain_embedding/{public,<domain>}  (nothing of any other domain)
out: outputs/expert/<domain>/package (the expert package), outputs/expert/<domain>/run, .../summary.json"""
from __future__ import annotations

import json
from pathlib import Path

from flexolmo_core.training.config import ExpertConfig, load_stage
from flexolmo_core.training.embeddings import load_embedding
from flexolmo_core.training.stages import train_expert
from tasks import pin_dtype, run

ANCHOR = "outputs/anchor/model"


def main(domain: str, params: str = "params.yaml") -> dict:
    _, cfg, loop = load_stage(ExpertConfig, "expert", params, domain=domain)
    loop = pin_dtype(loop)
    emb = Path("outputs/domain_embedding")
    meta = json.loads((emb / domain / "embedding.json").read_text())
    return train_expert(ANCHOR, domain, f"outputs/tokenizer/{domain}/train", f"outputs/expert/{domain}", loop,
                        val_data=f"outputs/tokenizer/{domain}/validation",
                        public_rows=load_embedding(emb / "public"), domain_rows=load_embedding(emb / domain),
                        use_bias=cfg.use_bias, embedding_meta=meta, public_mix=cfg.public_mix, top_k=cfg.top_k)


if __name__ == "__main__":
    run(main)
