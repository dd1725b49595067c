"""`flexolmo inspect`: what a directory is (anchor, expert package, merged model) and its key facts."""
from __future__ import annotations

from pathlib import Path

from flexolmo_core.anchor.families import is_moe, renormalizes
from flexolmo_core.anchor.model import ANCHOR_MANIFEST, anchor_fingerprint, model_config_from_hf
from flexolmo_core.errors import InputError, MissingInput
from flexolmo_core.expert.package import MANIFEST_FILE, load_package, privacy_of
from flexolmo_core.io.checkpoint import check_checkpoint, checkpoint_meta, load_state
from flexolmo_core.io.layout import LAYOUTS, layout_name
from flexolmo_core.merge.baselines import shared_sha256
from flexolmo_core.merge.merging import MERGED_MANIFEST, read_manifest

DENSE_BASELINES = ("dense_expert", "model_soup")


def describe(path: Path) -> dict:
    if not path.exists():
        raise MissingInput(f"{path}: no such file or directory")
    if (path / MANIFEST_FILE).exists():
        package = load_package(path)
        m = package.manifest
        return {"kind": "expert package", "path": str(path), "domain": m["domain"],
                "anchor_fingerprint": m["anchor_fingerprint"], "uses_bias": m["uses_bias"], "shapes": m["shapes"],
                "package_sha256": package.sha256, "privacy": privacy_of(m) or "not trained with DP",
                "training": m.get("training"), "data": m.get("data")}
    if not (path / "config.json").exists():
        raise InputError(f"{path}: not an anchor, expert package or merged model")
    from transformers import AutoConfig

    check_checkpoint(path)  # a truncated config.json or weights file is named here, not deep in transformers
    config = AutoConfig.from_pretrained(path)
    cfg = model_config_from_hf(config)
    info = {"path": str(path), "model_type": config.model_type, "fingerprint": anchor_fingerprint(path),
            "layout": layout_name(checkpoint_meta(path)),
            "shape": {"d_model": cfg.d_model, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads,
                      "ffn_hidden": cfg.ffn_hidden, "vocab_size": cfg.vocab_size}}
    info["layout_means"] = LAYOUTS[info["layout"]]
    if is_moe(config):
        info["renormalizes_top_k"] = renormalizes(config)  # Mixtral: yes; FlexOlmo as released: no
    m = read_manifest(path) if (path / MERGED_MANIFEST).exists() else None
    if m is not None and m.get("layout", info["layout"]) != info["layout"]:
        raise InputError(f"{path / MERGED_MANIFEST}: says layout {m['layout']!r}, but the weights are {info['layout']!r}")
    if m is not None and m.get("baseline") in DENSE_BASELINES:
        # A dense baseline's FFN is not the anchor's, so its fingerprint differs by design; its shared weights
        # must still be the ones recorded when it was cut from a merged model of this anchor.
        info.update(kind=f"baseline ({m['baseline']})", recorded_anchor_fingerprint=m.get("anchor_fingerprint"),
                    anchor_matches=shared_sha256(load_state(path)) == m.get("shared_sha256"), **cfg.counts(1, 1))
    elif m is not None and m.get("anchor_fingerprint") is None:  # the unrestricted MoE: no anchor to match
        info.update(kind=f"baseline ({m.get('baseline', 'no anchor')})", experts=[e["domain"] for e in m["experts"]],
                    top_k=m["top_k"], anchor_matches=None, **cfg.counts(len(m["experts"]), m["top_k"]))
    elif m is not None:
        info.update(kind="merged model", experts=[e["domain"] for e in m["experts"]], top_k=m["top_k"],
                    router_bias=m.get("router_bias"), recorded_anchor_fingerprint=m["anchor_fingerprint"],
                    **cfg.counts(len(m["experts"]), m["top_k"]))
        info["anchor_matches"] = info["fingerprint"] == m["anchor_fingerprint"]
    elif (path / ANCHOR_MANIFEST).exists() or not is_moe(config):
        info.update(kind="anchor", **cfg.counts(1, 1))
    else:
        info.update(kind=f"{config.model_type} checkpoint")
    return info
