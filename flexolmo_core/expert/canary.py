"""A package's canary: what backs its anchor-fingerprint claim with the weights themselves.

At export the package records the logits of the owner's model (the anchor merged with this package alone at
k=2, which is the owner model: tests/test_core_merge.py) on a fixed token sequence, at a fixed subset of the
vocabulary, rounded to DECIMALS, with their sha256. Merge recomputes them from the anchor at hand and the
package alone. A package trained against another anchor, or with an edited fingerprint, gives other logits
and is refused, naming both hashes.

Both sides compute in fp32 (bf16 weights are upcast exactly), through the same code, so what remains is the
order of floating-point sums, which varies with the thread count (measured, 1 vs 2 threads: the rounded logits
were identical for the tiny and the SmolLM2-135M anchors). The forward runs one layer at a time from disk
(the training fast path's blocks, which tests/test_train_model.py checks against transformers), reading only
the embedding and LM-head rows it needs, so a merge of 7B-class experts never holds a whole model. Values are compared with |a - b| <= ATOL (1e-3,
well above that noise and the 5e-5 of rounding, far below the O(1) changes a different anchor or expert makes);
equal hashes short-cut the comparison."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F

from flexolmo_core.anchor.families import RENORMALIZES
from flexolmo_core.anchor.model import model_config_from_hf
from flexolmo_core.errors import PackageError
from flexolmo_core.io.checkpoint import checkpoint_getter
from flexolmo_core.io.layout import SHARED, TOP, dense_ffn_names
from flexolmo_core.training.model import Block, MoEShape, rms_norm, rope_tables


class ExpertPackage(Protocol):
    """What the canary reads of a package (package.ExpertPackage; not imported: package.py calls this module)."""

    path: Path
    manifest: dict

    def tensor(self, name: str) -> torch.Tensor: ...

TOKENS, VOCAB, DECIMALS, ATOL = 16, 16, 4, 1e-3


def _ids(n: int, vocab_size: int, stride: int, offset: int) -> list[int]:
    return [(offset + i * stride) % vocab_size for i in range(n)]


@torch.no_grad()
def owner_logits(anchor_dir: str | Path, anchor_cfg, package: ExpertPackage, tokens: list[int],
                 vocab: list[int]) -> torch.Tensor:
    """fp32 logits [len(tokens), len(vocab)] of the owner model (anchor + `package`, top-2 of 2), computed one
    layer at a time from the files."""
    cfg = model_config_from_hf(anchor_cfg)
    _, get = checkpoint_getter(anchor_dir)
    f32 = torch.float32
    x = torch.stack([get(TOP["embed"], t) for t in tokens]).to(f32)[None]  # [1, T, d]: only these rows are read
    cos, sin = rope_tables(cfg, len(tokens))
    moe = MoEShape(2, 2, renormalize=RENORMALIZES[cfg.family])
    for i in range(cfg.n_layers):
        block = Block(cfg, moe)
        for local, hf in SHARED[cfg.family].items():
            block.w.put(local, get(f"model.layers.{i}.{hf}", None), trainable=False)
        gate, up, down = dense_ffn_names(i)
        block.w.put("gate_up_0", torch.cat([get(gate, None), get(up, None)]), trainable=False)
        block.w.put("down_0", get(down, None), trainable=False)
        block.w.put("gate_up_1", package.tensor(f"layers.{i}.gate_up_proj"), trainable=False)
        block.w.put("down_1", package.tensor(f"layers.{i}.down_proj"), trainable=False)
        block.w.put("router_0", package.tensor(f"layers.{i}.public_router"), trainable=False)
        block.w.put("router_1", package.tensor(f"layers.{i}.router"), trainable=False)
        x = block(x, cos, sin, f32, [])
        del block
    x = rms_norm(x, get(TOP["norm"], None).to(f32), cfg.norm_eps, cast_first=cfg.pre_norm)
    head = TOP["embed"] if cfg.tie_embeddings else TOP["lm_head"]
    rows = torch.stack([get(head, v) for v in vocab]).to(f32)  # only the canary's vocabulary rows
    return F.linear(x[0], rows)


@torch.no_grad()
def compute_canary(anchor_dir: str | Path, anchor_cfg, package: ExpertPackage) -> dict:
    """The canary of `package` over the anchor in `anchor_dir` (one forward pass of the 2-expert model)."""
    tokens = _ids(TOKENS, anchor_cfg.vocab_size, 7919, 13)
    vocab = _ids(VOCAB, anchor_cfg.vocab_size, 104729, 1)
    logits = owner_logits(anchor_dir, anchor_cfg, package, tokens, vocab)
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
