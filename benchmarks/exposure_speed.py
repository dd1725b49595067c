"""Canary exposure's two scorers on one model: every candidate sentence scored whole (`sequence_nll`, the
reference) against the shared prefix run once (`shared_prefix_nll`, what `exposure` uses).

    python benchmarks/exposure_speed.py --model M --canaries DIR [--candidates 200] [--exclude code]

Prints seconds per scorer on the first canary, the ratio, the largest score difference, and the machine."""
from __future__ import annotations

import argparse
import json
import time

from benchmarks.machine import machine
from flexolmo_core.audit.canaries import exposure, read_canaries
from flexolmo_core.cli.commands.audit import scoring_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="a merged model or any causal LM folder")
    ap.add_argument("--canaries", required=True, help="a folder written by `flexolmo audit canaries --plant`")
    ap.add_argument("--candidates", type=int, default=200)
    ap.add_argument("--exclude", default="", help="comma-separated experts to switch off (merged models)")
    args = ap.parse_args()
    model, tokenizer = scoring_model(args.model, [x for x in args.exclude.split(",") if x], "cpu")
    canary = read_canaries(args.canaries)[0]
    seconds, found = {}, {}
    for name, reference in (("whole sentences (reference)", True), ("shared prefix", False)):
        start = time.perf_counter()
        found[name] = exposure(model, tokenizer, canary, args.candidates, reference=reference)
        seconds[name] = round(time.perf_counter() - start, 2)
        print(f"{name}: {seconds[name]} s, rank {found[name]['rank']}, nll {found[name]['nll']}", flush=True)
    ref, fast = seconds["whole sentences (reference)"], seconds["shared prefix"]
    print(json.dumps({"model": args.model, "candidates": args.candidates, "seconds": seconds,
                      "speedup": round(ref / fast, 2), "machine": machine()}))


if __name__ == "__main__":
    main()
