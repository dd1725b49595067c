import json

import pytest

from flexolmo_core.anchor.presets import PRESETS, get_preset
from flexolmo_core.cli.main import main


def test_paper_scale_counts_match_the_paper():
    cfg = get_preset("olmo2-7b")
    eight = cfg.counts(num_experts=8, top_k=4)
    # METHOD.md: non-FFN ~2.97B, one expert ~4.33B, 8 experts top-4: ~37.6B total, ~20.3B active
    assert round(cfg.shared_params() / 1e9, 2) == 2.97
    assert round(cfg.expert_params() / 1e9, 2) == 4.33
    assert round(eight["total_params"] / 1e9, 1) == 37.6
    assert round(eight["active_params"] / 1e9, 1) == 20.3
    assert round(cfg.counts(7, 5)["total_params"] / 1e9) == 33  # the released FlexOlmo-7x7B-1T


def test_counts_equal_the_parameters_of_a_built_model():
    from transformers import Olmo2Config, Olmo2ForCausalLM

    cfg = get_preset("smoke")
    model = Olmo2ForCausalLM(Olmo2Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.ffn_hidden,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, tie_word_embeddings=False))
    assert cfg.counts()["total_params"] == sum(p.numel() for p in model.parameters())


def test_flops_grow_with_active_experts():
    cfg = get_preset("tiny")
    assert cfg.flops_per_token(4, 2)["forward"] > cfg.flops_per_token(4, 1)["forward"] > 0
    with pytest.raises(ValueError):
        cfg.counts(num_experts=2, top_k=3)


def test_params_cli_prints_json(capsys):
    assert main(["params", "--preset", "olmo2-7b", "--experts", "8", "--top-k", "4"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["total_params"] == PRESETS["olmo2-7b"].counts(8, 4)["total_params"]
    assert out["active_params"] < out["total_params"]


def test_unknown_preset_is_a_clear_error(capsys):
    assert main(["params", "--preset", "huge"]) == 2
    assert "unknown preset 'huge'" in capsys.readouterr().err
