"""Per-example gradients for DP-SGD (training/privacy.py): the vectorised path (torch.func) against the reference
(one backward per example), on one micro-batch of an owner model, with how far apart their clipped gradients are.

    python benchmarks/dp_speed.py --anchor outputs/anchor/model [--rows 8] [--seq-len 256] [--repeats 3]"""
from __future__ import annotations

import argparse
import time

import torch

from benchmarks.machine import machine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--anchor", required=True, help="an anchor folder (the owner model is built on it)")
    parser.add_argument("--rows", type=int, default=8, help="windows in the micro-batch")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each path (the best is printed)")
    args = parser.parse_args()
    from flexolmo_core.training.objective import objective, reference_objective
    from flexolmo_core.training.privacy import DPConfig, PrivateGradients
    from flexolmo_core.training.stages import owner_fast_model

    model, _ = owner_fast_model(args.anchor, None, None, False, 2)
    rows = torch.randint(0, model.cfg.vocab_size, (args.rows, args.seq_len + 1), generator=torch.Generator().manual_seed(0))
    cfg = DPConfig(enabled=True, noise_multiplier=1.0, max_grad_norm=1.0)

    def fast():
        private = PrivateGradients(cfg, 1000, args.rows, 1)
        private.bind(model)
        private.add_batch(rows, lambda out, t: reference_objective(out[0], t, out[1], 1e-3, 1e-5))
        return private.sum

    def reference():
        private = PrivateGradients(cfg, 1000, args.rows, 1)
        private.bind(model)
        for row in rows:
            logits, z = model(row[None, :-1])
            private.add_example(objective(logits, row[None, 1:], z, 1e-3, 1e-5)[0])
        return private.sum

    times, sums = {}, {}
    for name, run in (("vectorised", fast), ("reference", reference)):
        best = float("inf")
        for _ in range(args.repeats):
            start = time.perf_counter()
            sums[name] = run()
            best = min(best, time.perf_counter() - start)
        times[name] = best
    diff = max(float((a - b).abs().max()) for a, b in zip(sums["vectorised"], sums["reference"]))
    m = machine()
    print(f"machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, load {m['loadavg'][0]:.2f}")
    print(f"owner model on {args.anchor}: {args.rows} windows x {args.seq_len} tokens, "
          f"{sum(p.numel() for p in model.parameters() if p.requires_grad):,} trainable parameters")
    print(f"vectorised {times['vectorised']:.2f} s, reference {times['reference']:.2f} s (best of {args.repeats}): "
          f"{times['reference'] / times['vectorised']:.2f}x; clipped sums differ by at most {diff:.3g}")


if __name__ == "__main__":
    main()
