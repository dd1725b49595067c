"""The prefix-pooling lever (issue 14, ours): held-out bpb per domain of a merged model with each token's router
logits pooled with the running mean over its sequence (flexolmo_core.inference.moe.pool_prefix), for a grid of weights.
The weight is chosen on the validation split and reported on the test split (never tuned on what is reported).

    python benchmarks/prefix_pool.py --run DIR [--models flexolmo,flexolmo_rt] [--weights 0,0.25,0.5,0.75]

DIR is a finished pipeline folder (outputs/merge/flexolmo, outputs/router_tune/model, outputs/prepare)."""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
from benchmarks.machine import machine  # noqa: E402

MODELS = {"flexolmo": "outputs/merge/flexolmo", "flexolmo_rt": "outputs/router_tune/model"}


def split_dir(prepare: Path, split: str, domains: list[str], root: Path) -> Path:
    """A domains folder whose `<d>/test` is the prepare stage's `<d>/<split>` (the evaluation reads `test`)."""
    out = root / split
    for d in domains:
        (out / d).mkdir(parents=True, exist_ok=True)
        if not (out / d / "test").exists():
            (out / d / "test").symlink_to((prepare / d / split).resolve())
    return out


def domain_bpb(model_dir: Path, weight: float, domains_dir: Path, domains: list[str], limit: int, chars: int) -> dict:
    from flexolmo_core.evaluation import runner
    from flexolmo_core.inference.model import load_flexolmo

    loaded = load_flexolmo(model_dir, device="cpu", prefix_pool=weight)
    cfg = runner.EvalConfig(domain_limit=limit, domain_max_chars=chars, domains_dir=str(domains_dir), batch_size=16,
                            device="cpu", domains=domains)
    tasks = [f"flexolmo_domain_{d}" for d in domains]
    result = runner.evaluate_lm(runner.hf_lm(loaded.model, cfg, loaded.tokenizer), tasks, cfg)
    return {d: result["tasks"][f"flexolmo_domain_{d}"]["value"] for d in domains}


def main() -> None:
    from flexolmo_core.merge.merging import expert_domains

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="a finished pipeline folder")
    ap.add_argument("--models", default="flexolmo,flexolmo_rt")
    ap.add_argument("--weights", default="0,0.25,0.5,0.75")
    ap.add_argument("--limit", type=int, default=5, help="documents per domain (tiny's evaluate.domain_limit)")
    ap.add_argument("--chars", type=int, default=1500, help="characters per document (tiny's domain_max_chars)")
    args = ap.parse_args()
    run = Path(args.run)
    weights = [float(w) for w in args.weights.split(",")]
    m = machine()
    table = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            model_dir = run / MODELS[name]
            domains = expert_domains(model_dir)
            val, test = (split_dir(run / "outputs/prepare", s, domains, Path(tmp)) for s in ("validation", "test"))
            scores = {w: domain_bpb(model_dir, w, val, domains, args.limit, args.chars) for w in weights}
            means = {w: sum(s.values()) / len(s) for w, s in scores.items()}
            best = min(means, key=means.get)
            for w in weights:
                print(f"{name}: weight {w:.2f}: validation mean bpb {means[w]:.4f}", flush=True)
            chosen = sorted({0.0, best})
            reported = {w: domain_bpb(model_dir, w, test, domains, args.limit, args.chars) for w in chosen}
            table[name] = {"validation_mean": means, "chosen_on_validation": best, "test": reported}
            print(f"\n{name}: chosen on validation: weight {best:.2f}. Held-out (test) bpb:")
            print("| weight | " + " | ".join(domains) + " | mean |")
            print("|---" * (len(domains) + 2) + "|")
            for w, s in reported.items():
                print(f"| {w:.2f} | " + " | ".join(f"{s[d]:.4f}" for d in domains) + f" | {sum(s.values()) / len(s):.4f} |")
    print(f"\nmachine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, load {m['loadavg'][0]:.2f}")
    print(json.dumps({"machine": m, "args": vars(args), "results": table}))


if __name__ == "__main__":
    main()
