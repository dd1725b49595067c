"""Time the evaluate stage per variant on random checkpoints with the `tiny` preset's shapes (vocab 8192,
d_model 256, 4 layers, FFN 1024, 512 context; public + 7 experts, top-4), using params.yaml's `evaluate`
budget. Random weights: the scores mean nothing, the seconds do.

    python benchmarks/eval_time.py [--variants public,flexolmo,btm] [--limit N] [--suites a,b]
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from flexolmo_core.evaluation import runner, smoke, suite, variants
from flexolmo_core.io.params import load_section, read_params

TINY = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=512, vocab_size=8192)
DOMAINS = sorted(read_params("params.yaml")["domains"])  # the closed domains of params.yaml (7 at tiny)


def main() -> None:
    ap = argparse.ArgumentParser()
    d = DOMAINS[0]
    ap.add_argument("--variants", default=f"public,dense_{d},owner_{d},soup,btm,prompt_routing,flexolmo,optout_{d}")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--suites", default=None)
    ap.add_argument("--out", default=None, help="write the timings JSON here")
    args = ap.parse_args()
    cfg = load_section(runner.EvalConfig, "evaluate", "params.yaml")
    if args.limit is not None:
        cfg.limit = cfg.domain_limit = args.limit
    suites = args.suites.split(",") if args.suites else cfg.suites
    cfg.domains = ["public", *DOMAINS]
    full = [t for s in suites for t in suite.resolve_suite(s, cfg.domains)]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tok = smoke.train_tokenizer(root / "tok", vocab_size=2048)
        smoke.build_anchor(root / "anchor", tok, shape=TINY)
        smoke.build_merged(root / "merged", root / "anchor", tok, DOMAINS, top_k=4, shape=TINY)
        cfg.domains_dir = str(smoke.write_domain_fixture(root / "domains", ["public", *DOMAINS], n_docs=20))
        built = {v.name: v for v in variants.build_variants(root / "merged", root / "work", root / "anchor")}
        timings, cpu_s = {}, {}
        for name in args.variants.split(","):
            tasks = full if args.suites else runner.suites_for(name, cfg)
            start, cpu = time.perf_counter(), time.process_time()
            res = variants.evaluate_variant(built[name], tasks, cfg)
            timings[name] = round(time.perf_counter() - start, 1)
            cpu_s[name] = round(time.process_time() - cpu, 1)  # both threads; less sensitive to a busy machine
            ran = sum(r["status"] == "ok" for r in res["tasks"].values())
            print(f"{name}: {timings[name]} s wall, {cpu_s[name]} s CPU ({ran}/{len(tasks)} tasks ran; "
                  f"load average {os.getloadavg()[0]:.1f})", flush=True)
        # Unmeasured variants are estimated from a measured one of the same kind: soup ~ public (dense, same
        # suites); dense_*/owner_*/optout_* from the measured one of that prefix.
        def estimate(n):
            if n in timings:
                return timings[n]
            if n == "soup":
                return timings.get("public", 0)
            same = [t for m, t in timings.items() if m.split("_")[0] == n.split("_")[0]]
            return sum(same) / len(same) if same else 0
        total = sum(estimate(n) for n in built)
        print(f"estimated all {len(built)} variants: {total:.0f} s")
        if args.out:
            Path(args.out).write_text(json.dumps({"per_variant_s": timings, "per_variant_cpu_s": cpu_s,
                                                  "estimated_total_s": total,
                                                  "n_variants": len(built), "limit": cfg.limit}, indent=2))


if __name__ == "__main__":
    main()
