"""Router embeddings: encoder (offline MiniLM + the anchor's fixed projection), anchor-hidden, random."""
from __future__ import annotations

import torch

from flexolmo_core.training.config import DomainEmbeddingConfig
from flexolmo_core.training.embeddings import compute_embedding, load_embedding, save_embedding, write_projection


def test_embedding_modes(tmp_path, smoke_anchor, small_texts):
    anchor = tmp_path / "anchor"
    import shutil

    shutil.copytree(smoke_anchor, anchor)
    write_projection(anchor, 384, 64, seed=0)
    cfg = DomainEmbeddingConfig(documents=6)
    code = compute_embedding("encoder", "code", small_texts["code"], anchor, cfg)
    public = compute_embedding("encoder", "public", small_texts["public"], anchor, cfg)
    assert code.shape == (64,) and 0.1 < float(code.norm()) < 2.0
    assert torch.nn.functional.cosine_similarity(code, public, dim=0) < 0.99  # domains differ
    again = compute_embedding("encoder", "code", small_texts["code"], anchor, cfg)
    assert torch.equal(code, again)  # deterministic: every owner computes the same public row
    hidden = compute_embedding("anchor-hidden", "code", small_texts["code"], anchor, cfg)
    assert hidden.shape == (2, 64) and torch.isfinite(hidden).all()
    rand = compute_embedding("random", "code", [], anchor, cfg)
    assert rand.shape == (64,) and not torch.equal(rand, compute_embedding("random", "news", [], anchor, cfg))
    save_embedding(tmp_path / "emb", hidden, {"mode": "anchor-hidden"})
    assert torch.equal(load_embedding(tmp_path / "emb"), hidden)
