"""Stage `btx`: the BTX baseline (METHOD.md 7's "prior merging methods"). `python -m tasks.btx`

The merged experts (their FFNs trained apart, as every owner did) in one MoE whose router is learned from
scratch on the union of public and every domain's training data, with router tuning's loop and budget, so BTX
and FlexOlmo-RT compare at equal cost. Off unless `btx.enabled` (at tiny it would push `make run` past 30
minutes); then the stage records why it did not run and the evaluation reports `not run`.
in:  outputs/merge/flexolmo, outputs/tokenizer/{public,<d>}/train, outputs/tokenizer/public/validation
out: outputs/btx/model (the merged checkpoint with BTX's router), run/, summary.json"""
from __future__ import annotations

import shutil
from pathlib import Path

from flexolmo_core.io.params import read_params
from flexolmo_core.training.config import BTXConfig, RouterTuneConfig, load_stage
from flexolmo_core.training.stages import train_btx
from tasks import not_run, pin_dtype, run

MERGED = Path("outputs/merge/flexolmo")
TOKENS = Path("outputs/tokenizer")
OUT = Path("outputs/btx")


def main(params: str = "params.yaml") -> dict:
    _, cfg, _ = load_stage(BTXConfig, "btx", params)
    _, tune, loop = load_stage(RouterTuneConfig, "router_tune", params)  # FlexOlmo-RT's budget, exactly
    domains = list((read_params(params).get("domains") or {}))
    if not cfg.enabled:
        return not_run(OUT, "btx", "btx.enabled is false (it costs one more router training); "
                       "`dvc exp run -S btx.enabled=true` runs it (the quality preset does)")
    if OUT.exists():
        shutil.rmtree(OUT)  # the outs of a previous run (DVC would remove them too)
    return train_btx(MERGED, [TOKENS / d / "train" for d in ["public", *domains]], OUT, pin_dtype(loop),
                     val_data=TOKENS / "public/validation", init_std=cfg.init_std, init_seed=cfg.init_seed,
                     top_k=tune.top_k)


if __name__ == "__main__":
    run(main)
