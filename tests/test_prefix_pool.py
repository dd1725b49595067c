"""Prefix-pooled routing (issue 14's lever of ours): causal, no training, and opting out stays exact."""
from __future__ import annotations

import pytest
import torch

from flexolmo_core.inference import load_flexolmo
from flexolmo_core.merge import opt_out
from flexolmo_core.moe import pool_prefix


def test_pool_prefix_is_the_running_mean_written_out():
    torch.manual_seed(0)
    logits = torch.randn(2 * 5, 3)
    got = pool_prefix(logits, 5, 0.25).view(2, 5, 3)
    seqs = logits.view(2, 5, 3)
    for b in range(2):
        for t in range(5):
            expected = 0.75 * seqs[b, t] + 0.25 * seqs[b, :t + 1].mean(0)
            assert torch.allclose(got[b, t], expected, atol=1e-6)
    with pytest.raises(RuntimeError, match="sequence length"):
        pool_prefix(logits, None, 0.25)


def test_weight_zero_is_the_merged_model_and_pooling_is_causal(merged):
    ids = torch.tensor([[3, 17, 5, 9, 44, 2, 8]])
    plain = load_flexolmo(merged, device="cpu").model(ids).logits
    assert torch.equal(load_flexolmo(merged, device="cpu", prefix_pool=0.0).model(ids).logits, plain)
    pooled = load_flexolmo(merged, device="cpu", prefix_pool=0.5).model
    a = pooled(ids).logits
    assert not torch.allclose(a, plain)  # the lever changes routing
    changed = ids.clone()
    changed[0, 4:] = torch.tensor([1, 1, 1])
    b = pooled(changed).logits
    assert torch.equal(a[0, :4], b[0, :4])  # a token's routing sees only its prefix


def test_opting_out_stays_exact_under_pooling(merged, tmp_path):
    ids = torch.tensor([[3, 17, 5, 9, 44, 2, 8], [7, 7, 1, 30, 12, 6, 5]])
    masked = load_flexolmo(merged, exclude=["news"], top_k=2, device="cpu", prefix_pool=0.5).model(ids).logits
    opt_out(merged, ["news"], tmp_path / "without_news", top_k=2)
    sliced = load_flexolmo(tmp_path / "without_news", top_k=2, device="cpu", prefix_pool=0.5).model(ids).logits
    assert torch.allclose(masked, sliced, atol=1e-5, rtol=0)
