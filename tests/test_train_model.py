"""The fast training path computes the same function as transformers (the readable reference)."""
from __future__ import annotations

import math

import pytest
import torch

from flexolmo_core.anchor.presets import get_preset
from flexolmo_core.io.layout import from_hf_dense, from_hf_moe, to_hf_dense, to_hf_moe
from flexolmo_core.training.model import MoEShape, build, count_matmul_flops
from flexolmo_core.training.objective import objective
from flexolmo_core.training.schedule import lr_at

CFG = get_preset("smoke")


def hf_anchor(seed=0):
    from transformers import Olmo2Config, Olmo2ForCausalLM

    c = Olmo2Config(vocab_size=CFG.vocab_size, hidden_size=CFG.d_model, intermediate_size=CFG.ffn_hidden,
                    num_hidden_layers=CFG.n_layers, num_attention_heads=CFG.n_heads, num_key_value_heads=CFG.n_heads,
                    max_position_embeddings=CFG.max_seq_len, rms_norm_eps=CFG.norm_eps, tie_word_embeddings=False,
                    rope_parameters={"rope_type": "default", "rope_theta": CFG.rope_theta}, pad_token_id=0, eos_token_id=0)
    torch.manual_seed(seed)
    model = Olmo2ForCausalLM(c).eval()
    with torch.no_grad():  # non-trivial norms so that a wrong norm placement shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    return model


IDS = torch.randint(0, CFG.vocab_size, (2, 48), generator=torch.Generator().manual_seed(1))


def test_dense_matches_transformers_and_round_trips():
    hf = hf_anchor()
    tensors = from_hf_dense(hf.state_dict(), CFG.n_layers)
    fast = build(CFG, MoEShape(), tensors, lambda n: True, torch.float32)
    ref = hf(IDS).logits
    assert torch.allclose(fast(IDS)[0], ref, atol=1e-5, rtol=0)
    fast.compute_dtype = torch.bfloat16  # the fast dtype: close, not equal
    assert (fast(IDS)[0].float() - ref).abs().max() < 0.05 * ref.abs().max()
    back = to_hf_dense(fast.tensors(), CFG.n_layers)
    assert all(torch.equal(back[k], v) for k, v in hf.state_dict().items())


def test_owner_model_matches_transformers_and_freezes_structurally():
    from reference.owner import upcycle

    from flexolmo_core.inference.moe import hf_state_dict

    hf = hf_anchor()
    pub, dom = torch.randn(CFG.n_layers, CFG.d_model), torch.randn(CFG.n_layers, CFG.d_model)
    owner = upcycle(hf, pub, dom).eval()
    with torch.no_grad():
        for layer in owner.model.layers:  # make expert 1 differ from expert 0
            layer.mlp.experts.trainable_gate_up_proj.add_(0.05 * torch.randn_like(layer.mlp.experts.trainable_gate_up_proj))
    tensors = from_hf_moe(hf_state_dict(owner), CFG.n_layers)
    fast = build(CFG, MoEShape(2, 2), tensors, lambda n: n.endswith("_1"), torch.float32)
    assert torch.allclose(fast(IDS)[0], owner(IDS).logits, atol=1e-5, rtol=0)
    logits, router_z = fast(IDS)
    loss, _ = objective(logits, IDS, router_z, 1e-3, 1e-5)
    loss.backward()
    params = dict(fast.named_parameters())
    assert params and all(n.endswith(("gate_up_1", "down_1", "router_1")) for n in params)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params.values())


def test_top_k_routing_matches_transformers():
    from transformers import FlexOlmoForCausalLM

    from flexolmo_core.anchor.families import moe_config

    hf = FlexOlmoForCausalLM(moe_config(hf_anchor().config, num_experts=4, top_k=2)).eval()
    with torch.no_grad():
        for layer in hf.model.layers:
            layer.mlp.gate.weight.normal_()
            layer.mlp.experts.gate_up_proj.normal_(0, 0.05)
            layer.mlp.experts.down_proj.normal_(0, 0.05)
    fast = build(CFG, MoEShape(4, 2), from_hf_moe(hf.state_dict(), CFG.n_layers), lambda n: True, torch.float32)
    assert torch.allclose(fast(IDS)[0], hf(IDS).logits, atol=1e-5, rtol=0)
    back, state = from_hf_moe(to_hf_moe(fast.tensors(), CFG.n_layers)), from_hf_moe(hf.state_dict())
    assert set(back) == set(state) and all(torch.equal(back[k], v) for k, v in state.items())


def test_objective_terms():
    logits = torch.randn(3, 50, 11)  # 150 rows: crosses the fused loss's row chunks, last one partial
    targets = torch.randint(0, 11, (3, 50))
    total, ce = objective(logits, targets, torch.tensor(3.0), 1e-3, 1e-5)
    ref_ce = torch.nn.functional.cross_entropy(logits.reshape(-1, 11), targets.reshape(-1))
    z = torch.logsumexp(logits, -1).pow(2).mean()
    assert torch.allclose(ce, ref_ce) and torch.allclose(total, ref_ce + 3e-3 + 1e-5 * z)
    # the fused gradient equals autograd through the plain formula
    from flexolmo_core.training.objective import reference_objective

    a, b = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    objective(a, targets, torch.tensor(0.0), 1e-3, 0.3)[0].backward()
    reference_objective(b, targets, torch.tensor(0.0), 1e-3, 0.3)[0].backward()
    assert torch.allclose(a.grad, b.grad, atol=1e-6)


def test_schedule_warmup_then_cosine_to_ten_percent():
    lrs = [lr_at(s, 1.0, 10, 110) for s in range(110)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lr_at(110, 1.0, 10, 110) == pytest.approx(0.1) and math.isclose(min(lrs[9:]), lrs[-1])


def test_flops_count_only_needed_work():
    """Exact per-token matmul FLOPs at smoke (d 64, FFN 256, vocab 1024, 2 layers), seq 64, by hand:
    one expert's FFN 2*3*64*256 = 98304; a projection 2*64*64 = 8192; attention mixing, causal (32 keys on
    average), scores + sum 2*2*64*32 = 8192; LM head 2*1024*64 = 131072; a 2-row router 2*64*2 = 256."""
    dense = count_matmul_flops(CFG, MoEShape(), 64, lambda n: True)
    # forward: 2 x (4 projections 32768 + mixing 8192 + FFN 98304) + head 131072 = 409600
    # backward, everything trains: head weight + input 2 x 131072; per layer weights (32768 + 98304) plus
    # input gradients through FFN, projections and both mixing matmuls (98304 + 32768 + 2 x 8192) = 278528
    assert dense == {"forward": 409600, "backward": 2 * 131072 + 2 * 278528, "train_step": 1228800}
    owner = count_matmul_flops(CFG, MoEShape(2, 2), 64, lambda n: n.endswith("_1"))
    # forward: 2 x (32768 + 8192 + 2 experts 196608 + router 256) + 131072 = 606720
    # backward: head input gradient 131072 (head frozen); top layer: full input gradient 196608 + 256 + 32768
    # + 16384, plus expert 1's weights 98304; bottom layer: expert 1's weights 98304 and only the gradient
    # that reaches them (down_proj's input, 2*64*256 = 32768), nothing below it.
    assert owner == {"forward": 606720, "backward": 131072 + (246016 + 98304) + (98304 + 32768), "train_step": 1213184}


def family_models():
    """Each family's unusual shapes at smoke size, built by transformers itself: Llama with grouped-query
    attention and tied embeddings, Olmo2 with GQA, and Mixtral (3 experts, top-2, renormalised weights)."""
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MixtralConfig,
        MixtralForCausalLM,
        Olmo2Config,
        Olmo2ForCausalLM,
    )

    shape = dict(vocab_size=CFG.vocab_size, hidden_size=CFG.d_model, intermediate_size=CFG.ffn_hidden,
                 num_hidden_layers=CFG.n_layers, num_attention_heads=CFG.n_heads, num_key_value_heads=2,
                 max_position_embeddings=CFG.max_seq_len, pad_token_id=0, eos_token_id=0)
    return {
        "llama_gqa_tied": (LlamaForCausalLM(LlamaConfig(**shape, tie_word_embeddings=True,
                                                        rope_parameters={"rope_type": "default", "rope_theta": 1e5})),
                           MoEShape()),
        "olmo2_gqa": (Olmo2ForCausalLM(Olmo2Config(**shape)), MoEShape()),
        "mixtral_3x_top2": (MixtralForCausalLM(MixtralConfig(**shape, num_local_experts=3, num_experts_per_tok=2,
                                                             tie_word_embeddings=True)),
                            MoEShape(3, 2, renormalize=True)),
    }


@pytest.mark.parametrize("name", ["llama_gqa_tied", "olmo2_gqa", "mixtral_3x_top2"])
def test_both_families_match_transformers_and_round_trip(name):
    from flexolmo_core.anchor.model import model_config_from_hf

    torch.manual_seed(3)
    hf, moe = family_models()[name]
    hf.eval()
    with torch.no_grad():  # non-trivial norms and router rows, so a wrong placement or weighting shows
        for pname, p in hf.named_parameters():
            if "norm" in pname or pname.endswith("mlp.gate.weight"):
                p.normal_(1.0 if "norm" in pname else 0.0, 0.3)
    cfg = model_config_from_hf(hf.config)
    assert cfg.family == ("olmo2" if name.startswith("olmo2") else "llama") and cfg.kv_heads == 2
    read, write = (from_hf_moe, to_hf_moe) if moe.num_experts > 1 else (from_hf_dense, to_hf_dense)
    fast = build(cfg, moe, read(hf.state_dict(), tied=cfg.tie_embeddings), lambda n: True, torch.float32)
    ref = hf(IDS).logits
    assert torch.allclose(fast(IDS)[0], ref, atol=1e-5, rtol=0)
    back = write(fast.tensors())  # the tied LM head is not written; transformers ties it on load
    _, info = type(hf).from_pretrained(None, config=hf.config, state_dict=back, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert all(torch.equal(v, read(hf.state_dict(), tied=cfg.tie_embeddings)[k]) for k, v in read(back).items())
    counts = cfg.counts(moe.num_experts, moe.top_k)
    assert counts["total_params"] == sum(p.numel() for p in hf.parameters())  # tied: counted once
