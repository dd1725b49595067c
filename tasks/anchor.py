"""Stage `anchor`: pretrain the dense public model. `python -m tasks.anchor`

in:  outputs/tokenizer/tokenizer, outputs/tokenizer/public/{train,validation}
out: outputs/anchor/model (Olmo2 checkpoint + tokenizer + router projection), outputs/anchor/run
     (checkpoints, dvclive), outputs/anchor/summary.json"""
from __future__ import annotations

import sys

from flexolmo_core.training.config import AnchorConfig, load_stage
from flexolmo_core.training.stages import train_anchor

TOKENIZER = "outputs/tokenizer"
OUT = "outputs/anchor"


def main(params: str = "params.yaml") -> dict:
    preset, cfg, loop = load_stage(AnchorConfig, "anchor", params)
    data = f"{TOKENIZER}/{cfg.data_domain}"
    return train_anchor(f"{TOKENIZER}/tokenizer", f"{data}/train", OUT, preset, loop, val_data=f"{data}/validation",
                        init_seed=cfg.init_seed, projection_dim=cfg.projection_dim,
                        projection_seed=cfg.projection_seed, replay_tokens=cfg.replay_tokens)


if __name__ == "__main__":
    main(*sys.argv[1:])
