"""Stage `router_tune`: FlexOlmo-RT (METHOD.md 6). `python -m tasks.router_tune`

Only the merged model's router rows move, all experts active, on proxy data: a public sample plus, per
owner, a small proxy set that owner chose to share (here: a fixed sample of each domain's training split).
`router_tune.method: ridge` fits the rows in closed form from the same proxy sets instead (no gradient steps).
in:  outputs/merge/flexolmo, outputs/tokenizer/{public,<d>}/train, outputs/tokenizer/public/validation
out: outputs/router_tune/model (the merged checkpoint with tuned rows), run/, summary.json"""
from __future__ import annotations

from pathlib import Path

from flexolmo_core.io.params import read_params
from flexolmo_core.training.config import RouterTuneConfig, load_stage
from flexolmo_core.training.stages import fit_router, tune_router
from tasks import pin_dtype, run

MERGED = Path("outputs/merge/flexolmo")
TOKENS = Path("outputs/tokenizer")
OUT = Path("outputs/router_tune")


def main(params: str = "params.yaml") -> dict:
    _, cfg, loop = load_stage(RouterTuneConfig, "router_tune", params)
    loop = pin_dtype(loop)
    domains = list((read_params(params).get("domains") or {}))
    if cfg.method == "ridge":
        return fit_router(MERGED, TOKENS / "public/train", [TOKENS / d / "train" for d in domains], OUT, loop.seq_len,
                          cfg.public_windows, cfg.proxy_windows, alpha=cfg.ridge_alpha,
                          public_target=cfg.ridge_public_target, scale=cfg.ridge_scale, seed=loop.seed)
    return tune_router(MERGED, TOKENS / "public/train", [TOKENS / d / "train" for d in domains], OUT, loop,
                       public_windows=cfg.public_windows, proxy_windows=cfg.proxy_windows,
                       val_data=TOKENS / "public/validation", top_k=cfg.top_k)


if __name__ == "__main__":
    run(main)
