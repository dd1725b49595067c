"""Stage `anchor`: pretrain the dense public model, or import a published one (`anchor.source`).
`python -m tasks.anchor`

in:  outputs/tokenizer/tokenizer, outputs/tokenizer/public/{train,validation}
out: outputs/anchor/model (checkpoint + tokenizer + router projection + public replay sample), outputs/anchor/run
     (checkpoints and dvclive logs; for an import, import.json), outputs/anchor/{summary,metrics}.json"""
from __future__ import annotations

import time
from pathlib import Path

from flexolmo_core.io.atomic import write_json
from flexolmo_core.training.config import AnchorConfig, load_stage
from flexolmo_core.training.stages import train_anchor
from tasks import pin_dtype, run

TOKENIZER = "outputs/tokenizer"
OUT = Path("outputs/anchor")


def import_published(cfg: AnchorConfig, seq_len: int, data: str) -> dict:
    from flexolmo_core.anchor.importing import import_anchor

    start = time.perf_counter()
    manifest = import_anchor(cfg.source, OUT / "model", gguf_file=cfg.gguf_file, projection_dim=cfg.projection_dim,
                             projection_seed=cfg.projection_seed, replay_data=[f"{data}/train"],
                             replay_tokens=cfg.replay_tokens, seq_len=seq_len)
    summary = {**manifest, "seconds": round(time.perf_counter() - start, 2)}
    (OUT / "run").mkdir(parents=True, exist_ok=True)
    write_json(OUT / "run" / "import.json", summary)
    write_json(OUT / "summary.json", summary)
    write_json(OUT / "metrics.json", {"wall_seconds": summary["seconds"]})  # an import's one result: its time
    return summary


def main(params: str = "params.yaml") -> dict:
    preset, cfg, loop = load_stage(AnchorConfig, "anchor", params)
    data = f"{TOKENIZER}/{cfg.data_domain}"
    if cfg.source != "train":
        return import_published(cfg, loop.seq_len, data)
    return train_anchor(f"{TOKENIZER}/tokenizer", f"{data}/train", OUT, preset, pin_dtype(loop), val_data=f"{data}/validation",
                        init_seed=cfg.init_seed, projection_dim=cfg.projection_dim,
                        projection_seed=cfg.projection_seed, replay_tokens=cfg.replay_tokens)


if __name__ == "__main__":
    run(main)
