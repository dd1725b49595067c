"""Stage `unrestricted_moe`: the paper's "no data restrictions" reference (METHOD.md 7). `python -m tasks.unrestricted_moe`

The merged model's MoE shape trained jointly from scratch on public + every domain, with the training FLOPs
that the anchor and all experts spent (read from their summaries). It costs as much as the whole training
side of the pipeline, so it runs only when `unrestricted_moe.enabled` is true; otherwise the stage records
why it did not run and the evaluation reports the variant as `not run`.
in:  outputs/tokenizer, outputs/anchor/summary.json, outputs/expert/<d>/summary.json
out: outputs/unrestricted_moe/model, run/, summary.json"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from flexolmo_core.io.params import read_params
from flexolmo_core.training.config import UnrestrictedConfig, load_stage
from flexolmo_core.training.stages import flops_budget, train_unrestricted
from tasks import not_run, pin_dtype, run

TOKENS = Path("outputs/tokenizer")
OUT = Path("outputs/unrestricted_moe")


def main(params: str = "params.yaml") -> dict:
    preset, cfg, loop = load_stage(UnrestrictedConfig, "unrestricted_moe", params)
    data = read_params(params)
    domains = list(data.get("domains") or {})
    if not cfg.enabled:
        return not_run(OUT, "unrestricted_moe", "unrestricted_moe.enabled is false (it costs as much as anchor + "
                       "all experts); `dvc exp run -S unrestricted_moe.enabled=true` runs it")
    if OUT.exists():
        shutil.rmtree(OUT)  # the outs of a previous run (DVC would remove them too)
    summaries = [json.loads(Path(p).read_text()) for p in
                 ["outputs/anchor/summary.json", *(f"outputs/expert/{d}/summary.json" for d in domains)]]
    experts = 1 + len(domains)
    top_k = cfg.top_k or (data.get("merge") or {}).get("top_k") or -(-experts // 2)  # the merged model's k
    return train_unrestricted(TOKENS / "tokenizer", [TOKENS / d / "train" for d in ["public", *domains]], OUT, preset,
                              experts, top_k, pin_dtype(loop), budget_flops=flops_budget(summaries),
                              val_data=TOKENS / "public/validation", init_seed=cfg.init_seed)


if __name__ == "__main__":
    run(main)
