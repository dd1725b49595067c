"""A package's canary: what backs its anchor-fingerprint claim with the weights themselves.

At export the package records the logits of the owner's model (the anchor merged with this package alone at
k=2, which is the owner model: tests/test_core_merge.py) on a fixed token sequence, at a fixed subset of the
vocabulary, rounded to DECIMALS, with their sha256. Merge recomputes them from the anchor at hand and the
package alone. A package trained against another anchor, or with an edited fingerprint, gives other logits
and is refused, naming both hashes.

Both sides compute in fp32 (bf16 weights are upcast exactly), through the same code, so what remains is the
order of floating-point sums, which varies with the thread count (measured, 1 vs 2 threads: the rounded logits
were identical for the tiny and the SmolLM2-135M anchors). Values are compared with |a - b| <= ATOL (1e-3,
well above that noise and the 5e-5 of rounding, far below the O(1) changes a different anchor or expert makes);
equal hashes short-cut the comparison."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from .package import ExpertPackage, PackageError

TOKENS, VOCAB, DECIMALS, ATOL = 16, 16, 4, 1e-3


def _ids(n: int, vocab_size: int, stride: int, offset: int) -> list[int]:
    return [(offset + i * stride) % vocab_size for i in range(n)]


@torch.no_grad()
def compute_canary(anchor_dir: str | Path, anchor_cfg, package: ExpertPackage) -> dict:
    """The canary of `package` over the anchor in `anchor_dir` (one forward pass of the 2-expert model)."""
    from transformers import AutoModelForCausalLM

    from .families import load_weights
    from .merge import merged_specs

    specs, config = merged_specs(Path(anchor_dir), anchor_cfg, [package], top_k=2)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    load_weights(model, {name: produce().float() for name, _, _, produce in specs}, anchor_dir)
    model.eval()
    tokens = _ids(TOKENS, config.vocab_size, 7919, 13)
    vocab = _ids(VOCAB, config.vocab_size, 104729, 1)
    logits = model(torch.tensor([tokens])).logits[0][:, vocab]
    values = [[round(float(v), DECIMALS) for v in row] for row in logits]
    return {"tokens": tokens, "vocab_ids": vocab, "decimals": DECIMALS, "logits": values,
            "sha256": hashlib.sha256(json.dumps(values).encode()).hexdigest()}


def check_canary(anchor_dir: str | Path, anchor_cfg, package: ExpertPackage) -> None:
    """Refuse `package` unless its recorded canary is what this anchor and its weights compute."""
    recorded = package.manifest.get("canary")
    where = package.path / "manifest.json"
    if not isinstance(recorded, dict) or not isinstance(recorded.get("logits"), list):
        raise PackageError(f"{where}: no canary, so nothing in the weights backs its anchor fingerprint; "
                           "re-export the package with this version (flexolmo package import)")
    if hashlib.sha256(json.dumps(recorded["logits"]).encode()).hexdigest() != recorded.get("sha256"):
        raise PackageError(f"{where}: the canary's logits do not match its own sha256 (edited or corrupt)")
    now = compute_canary(anchor_dir, anchor_cfg, package)
    if now["sha256"] == recorded.get("sha256"):
        return
    try:
        worst = max(abs(a - b) for ra, rb in zip(now["logits"], recorded["logits"], strict=True)
                    for a, b in zip(ra, rb, strict=True))
    except (TypeError, ValueError):
        worst = float("inf")
    if recorded.get("tokens") != now["tokens"] or recorded.get("vocab_ids") != now["vocab_ids"] or not worst <= ATOL:
        raise PackageError(f"{package.path}: its canary (logits {str(recorded.get('sha256'))[:16]}) is not what the anchor "
                           f"{anchor_dir} and its weights compute (logits {now['sha256'][:16]}, largest difference "
                           f"{worst:.3g} > {ATOL}): it was trained against another anchor, whatever its manifest says")
