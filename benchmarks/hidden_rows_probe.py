"""How far apart the anchor-hidden router rows put the domains (issue 29), before any owner trains.

Each domain's row per layer is the anchor's mean router input over its training documents, centred on public's
and of unit norm (the `anchor-hidden` rows of the quality study's row levers, before their scale). On other
documents of each domain (the validation split), it prints per layer the mean and spread of every row's logit
and the share of tokens whose top row is their own domain's. The logits' size is what the row scale and the
router temperature have to turn into routing weights.

    python benchmarks/hidden_rows_probe.py --anchor ANCHOR_MODEL --prepare PIPELINE/outputs/prepare
        [--domains code,math,news] [--docs 12] [--chars 1500] [--val-docs 4] [--layers 5,15,25]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from benchmarks.machine import machine
from flexolmo_core.data.readers import read_texts
from flexolmo_core.training.embeddings import anchor_hidden_embedding, sample_documents


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--anchor", required=True, help="the anchor's model folder (an imported SmolLM2, say)")
    ap.add_argument("--prepare", required=True, help="the prepare stage's output: <dir>/<domain>/{train,validation}")
    ap.add_argument("--domains", default="code,math,news")
    ap.add_argument("--docs", type=int, default=12, help="training documents per domain for the means")
    ap.add_argument("--chars", type=int, default=1500, help="characters per document")
    ap.add_argument("--val-docs", type=int, default=4, help="validation documents per domain scored")
    ap.add_argument("--layers", default="5,15,25")
    args = ap.parse_args()
    from transformers import AutoTokenizer

    from flexolmo_core.anchor.model import load_anchor, model_config_from_hf
    from flexolmo_core.io.layout import from_hf_dense
    from flexolmo_core.training.model import MoEShape, build

    prepare, domains = Path(args.prepare), ["public", *args.domains.split(",")]
    means = {d: anchor_hidden_embedding(sample_documents(read_texts([prepare / d / "train"]), args.docs, 0, args.chars),
                                        args.anchor, 2048) for d in domains}
    rows = torch.stack([means[d] - means["public"] for d in domains])  # [domains, layers, d_model]; public's is 0
    rows = rows / rows.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    anchor = load_anchor(args.anchor)
    cfg = model_config_from_hf(anchor.config)
    model = build(cfg, MoEShape(), from_hf_dense(anchor.state_dict(), cfg.n_layers, tied=cfg.tie_embeddings),
                  lambda n: False, torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.anchor)
    layers = [int(x) for x in args.layers.split(",")]
    print(f"| domain | layer | mean logit per row ({', '.join(domains)}) | std per row | own row top-1 |")
    print("|---|---|---|---|---|")
    for own, d in enumerate(domains):
        logits = {layer: [] for layer in layers}
        for text in sample_documents(read_texts([prepare / d / "validation"]), args.val_docs, 1, args.chars):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"][:512]
            with torch.no_grad():
                hidden = model.hidden_states(torch.tensor([ids]))
            for layer in layers:
                logits[layer].append(hidden[layer][0] @ rows[:, layer].T)
        for layer in layers:
            x = torch.cat(logits[layer])
            top1 = (x.argmax(-1) == own).float().mean().item()
            print(f"| {d} | {layer} | {', '.join(f'{v:+.2f}' for v in x.mean(0).tolist())} | "
                  f"{', '.join(f'{v:.2f}' for v in x.std(0).tolist())} | {top1:.3f} |", flush=True)
    print(json.dumps({"machine": machine()}))


if __name__ == "__main__":
    main()
