"""Prefix-pooled routing (issue 14's lever of ours): causal, no training, and opting out stays exact."""
from __future__ import annotations

import pytest
import torch

from flexolmo_core.inference.model import load_flexolmo
from flexolmo_core.inference.moe import pool_prefix
from flexolmo_core.merge.merging import opt_out


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


def test_cached_decoding_pools_as_a_forward_over_the_whole_sequence(merged):
    """The running mean is a state carried from step to step, so the KV cache stays on (issue 29, item 3)."""
    model = load_flexolmo(merged, device="cpu", prefix_pool=0.5).model
    ids = torch.tensor([[3, 17, 5, 9, 44, 2, 8], [7, 7, 1, 30, 12, 6, 5]])
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :4], use_cache=True)
        torch.testing.assert_close(out.logits, full[:, :4], atol=1e-5, rtol=1e-5)
        for t in range(4, ids.shape[1]):
            out = model(ids[:, t:t + 1], past_key_values=out.past_key_values, use_cache=True,
                        attention_mask=torch.ones(2, t + 1, dtype=torch.long))
            torch.testing.assert_close(out.logits[:, -1], full[:, t], atol=1e-5, rtol=1e-5)
        # and pooling matters at these steps: the cached steps differ from the unpooled model's
        plain = load_flexolmo(merged, device="cpu").model(ids).logits
    assert not torch.allclose(full[:, 4:], plain[:, 4:], atol=1e-4)


def test_left_padding_is_left_out_of_the_mean(merged):
    """A left-padded row (as the server batches them) routes its real tokens as it would alone."""
    model = load_flexolmo(merged, device="cpu", prefix_pool=0.5).model
    alone = torch.tensor([[5, 9, 44, 2]])
    padded = torch.tensor([[0, 0, 5, 9, 44, 2]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1]])
    with torch.no_grad():
        a = model(alone).logits
        b = model(padded, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    torch.testing.assert_close(b[:, 2:], a, atol=1e-5, rtol=1e-5)


def test_the_evaluation_pools_merged_variants_when_asked(merged):
    from flexolmo_core.evaluation import runner
    from flexolmo_core.evaluation.variants import Variant, make_lm
    from flexolmo_core.inference.moe import routers
    from flexolmo_core.io.params import ParamsError

    cfg = runner.EvalConfig(prefix_pool=0.25, device="cpu")
    lm = make_lm(Variant("flexolmo", "hf", [str(merged)], flexolmo=True), cfg)
    assert {r.prefix_pool for r in routers(lm.model)} == {0.25}
    ids = torch.tensor([[3, 17, 5, 9, 44, 2, 8]])
    pooled = load_flexolmo(merged, device="cpu", prefix_pool=0.25).model
    with torch.no_grad():
        torch.testing.assert_close(lm.model(ids).logits, pooled(ids).logits)
    with pytest.raises(ParamsError, match=r"evaluate.prefix_pool must be <= 1.0 \(--prefix-pool\)"):
        runner.EvalConfig(prefix_pool=1.5)
