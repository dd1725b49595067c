"""A public replay sample that travels with the anchor, and the owner's training stream that mixes it in.

Why: an owner who trains only on their own data teaches the router row "route *every* token to my expert"
(the cheapest direction is the one all hidden states share), so after the merge that row pulls other
domains' tokens too. Mixing a little public text into owner training makes the row learn what separates
the domain from public text instead. Public text is public, and the sample ships inside the anchor
folder, so the owner still receives nothing but the anchor and their own data.
Differs from the paper's recipe (owner data only); `expert.public_mix: 0` restores it."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from flexolmo_core.errors import InputError, MissingInput
from flexolmo_core.io.atomic import atomic_dir, write_json
from flexolmo_core.training.data import Mixture, TokenWindows

REPLAY_DIR = "public_replay"  # a subfolder of the anchor model folder: merges never copy it
REPLAY_FILE = "tokens.safetensors"


def write_public_replay(anchor_dir, public_windows, tokens: int, seed: int) -> dict:
    """Store `tokens` public tokens (whole windows drawn with `seed`) in anchor_dir/public_replay."""
    n = len(public_windows)
    width = len(public_windows[0])
    take = min(n, max(1, -(-tokens // width)))
    picked = np.sort(np.random.Generator(np.random.PCG64(seed)).permutation(n)[:take])
    flat = np.concatenate([np.asarray(public_windows[int(i)], dtype=np.int64) for i in picked])
    meta = {"tokens": int(flat.size), "windows": int(take), "window": int(width), "seed": seed,
            "source_windows": int(n)}
    with atomic_dir(Path(anchor_dir) / REPLAY_DIR) as tmp:
        save_file({"tokens": torch.from_numpy(flat.astype(np.int32))}, str(tmp / REPLAY_FILE))
        write_json(tmp / "replay.json", meta)
    return meta


def read_public_replay(anchor_dir, seq_len: int) -> TokenWindows:
    path = Path(anchor_dir) / REPLAY_DIR / REPLAY_FILE
    if not path.exists():
        raise MissingInput(f"{path}: this anchor carries no public replay sample (the anchor stage writes "
                                f"it; set anchor.replay_tokens > 0 and rerun it, or set expert.public_mix: 0)")
    return TokenWindows(load_file(str(path))["tokens"].long(), seq_len)


class Repeat:
    """Cycle a window set to a given length (a small replay sample against a large domain)."""

    def __init__(self, windows, length: int):
        self.windows, self.length = windows, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        return self.windows[i % len(self.windows)]


def with_public_mix(domain_windows, public_windows, fraction: float):
    """Domain windows plus public windows so that `fraction` of the shuffled stream is public."""
    if not 0.0 <= fraction < 1.0:
        raise InputError(f"expert.public_mix must be in [0, 1), got {fraction}")
    if fraction == 0.0:
        return domain_windows
    count = max(1, round(len(domain_windows) * fraction / (1.0 - fraction)))
    return Mixture([domain_windows, Repeat(public_windows, count)])
