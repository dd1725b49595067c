"""`flexolmo inspect`: what a directory is (anchor, expert package, merged model) and its key facts."""
from __future__ import annotations

import json
from pathlib import Path

from .anchor import ANCHOR_MANIFEST, anchor_fingerprint, model_config_from_hf
from .merge import MERGED_MANIFEST
from .package import MANIFEST_FILE, load_package


def describe(path: Path) -> dict:
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if (path / MANIFEST_FILE).exists():
        package = load_package(path)
        m = package.manifest
        return {"kind": "expert package", "path": str(path), "domain": m["domain"],
                "anchor_fingerprint": m["anchor_fingerprint"], "uses_bias": m["uses_bias"], "shapes": m["shapes"],
                "package_sha256": package.sha256, "training": m["training"], "data": m["data"]}
    if not (path / "config.json").exists():
        raise ValueError(f"{path}: not an anchor, expert package or merged model")
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    cfg = model_config_from_hf(config)
    info = {"path": str(path), "model_type": config.model_type, "fingerprint": anchor_fingerprint(path),
            "shape": {"d_model": cfg.d_model, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads,
                      "ffn_hidden": cfg.ffn_hidden, "vocab_size": cfg.vocab_size}}
    if (path / MERGED_MANIFEST).exists():
        m = json.loads((path / MERGED_MANIFEST).read_text())
        info.update(kind="merged model", experts=[e["domain"] for e in m["experts"]], top_k=m["top_k"],
                    router_bias=m["router_bias"], recorded_anchor_fingerprint=m["anchor_fingerprint"],
                    **cfg.counts(m["num_experts"], m["top_k"]))
        info["anchor_matches"] = info["fingerprint"] == m["anchor_fingerprint"]
    elif (path / ANCHOR_MANIFEST).exists() or config.model_type == "olmo2":
        info.update(kind="anchor", **cfg.counts(1, 1))
    else:
        info.update(kind=f"{config.model_type} checkpoint")
    return info
