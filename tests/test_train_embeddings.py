"""Router embeddings: encoder (offline MiniLM + the anchor's fixed projection), anchor-hidden, random."""
from __future__ import annotations

import pytest
import torch

from flexolmo_core.training.config import DomainEmbeddingConfig
from flexolmo_core.training.embeddings import compute_embedding, load_embedding, save_embedding, write_projection


def test_embedding_modes(tmp_path, smoke_anchor, small_texts):
    anchor = tmp_path / "anchor"
    import shutil

    shutil.copytree(smoke_anchor, anchor)
    write_projection(anchor, 384, 64, seed=0)
    cfg = DomainEmbeddingConfig(documents=6)
    code, _ = compute_embedding("encoder", "code", small_texts["code"], anchor, cfg)
    public, _ = compute_embedding("encoder", "public", small_texts["public"], anchor, cfg)
    assert code.shape == (64,) and 0.1 < float(code.norm()) < 2.0
    assert torch.nn.functional.cosine_similarity(code, public, dim=0) < 0.99  # domains differ
    again, _ = compute_embedding("encoder", "code", small_texts["code"], anchor, cfg)
    assert torch.equal(code, again)  # deterministic: every owner computes the same public row
    hidden, _ = compute_embedding("anchor-hidden", "code", small_texts["code"], anchor, cfg)
    assert hidden.shape == (2, 64) and torch.isfinite(hidden).all()
    rand, _ = compute_embedding("random", "code", [], anchor, cfg)
    assert rand.shape == (64,) and not torch.equal(rand, compute_embedding("random", "news", [], anchor, cfg)[0])
    save_embedding(tmp_path / "emb", hidden, {"mode": "anchor-hidden"})
    assert torch.equal(load_embedding(tmp_path / "emb"), hidden)


def test_centered_rows_encode_the_difference_from_public(tmp_path, smoke_anchor, small_texts):
    from dataclasses import replace

    from flexolmo_core.training.embeddings import load_reference

    cfg = DomainEmbeddingConfig(documents=6, mode="anchor-hidden", center=True, unit_norm=True, scale=2.0)
    public, public_raw = compute_embedding("anchor-hidden", "public", small_texts["public"], smoke_anchor, cfg)
    assert torch.count_nonzero(public) == 0  # the public row centers on itself
    save_embedding(tmp_path / "public", public, {"mode": "anchor-hidden"}, reference=public_raw)
    reference = load_reference(tmp_path / "public")
    code, code_raw = compute_embedding("anchor-hidden", "code", small_texts["code"], smoke_anchor, cfg, reference)
    expected = code_raw - public_raw
    expected = 2.0 * expected / expected.norm(dim=-1, keepdim=True)
    assert torch.allclose(code, expected, atol=1e-6) and torch.allclose(code.norm(dim=-1), torch.full((2,), 2.0))
    plain, _ = compute_embedding("anchor-hidden", "code", small_texts["code"], smoke_anchor, replace(cfg, center=False))
    assert not torch.allclose(plain, code)
    with pytest.raises(ValueError, match="reference"):
        compute_embedding("anchor-hidden", "code", small_texts["code"], smoke_anchor, cfg, None)
    # the stage helper: the public row saves its raw mean, a centered domain reads it back
    from flexolmo_core.training.embeddings import write_domain_embedding

    write_domain_embedding(tmp_path / "pub2", "public", small_texts["public"], smoke_anchor, cfg, {})
    assert torch.equal(load_reference(tmp_path / "pub2"), public_raw)
    written = write_domain_embedding(tmp_path / "code2", "code", small_texts["code"], smoke_anchor, cfg, {},
                                     public_embedding=tmp_path / "pub2")
    assert torch.equal(written, code) and torch.equal(load_embedding(tmp_path / "code2"), code)
    with pytest.raises(ValueError, match="reference mean"):
        save_embedding(tmp_path / "old", public, {})
        load_reference(tmp_path / "old")
