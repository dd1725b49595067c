"""Learning rate: linear warmup, then cosine decay to a fraction of the peak (METHOD.md 3: 10%)."""
from __future__ import annotations

import math


def lr_at(step: int, peak: float, warmup: int, total: int, final_ratio: float = 0.1) -> float:
    """The learning rate of optimiser step `step` (0-based) of `total`."""
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return peak * (final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
