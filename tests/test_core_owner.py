import json

import pytest
import torch
from reference.owner import (
    frozen_differences,
    project_after_step,
    trainable_parameter_names,
    trainable_parameters,
    upcycle,
)
from safetensors.torch import load_file

from flexolmo_core.anchor.model import load_anchor
from flexolmo_core.cli.main import main


def tokens(seed=0, shape=(2, 24), vocab=1000):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def test_identical_expert_owner_model_reproduces_the_anchor(smoke_anchor):
    anchor = load_anchor(smoke_anchor).eval()
    d = anchor.config.hidden_size
    # any router rows: top-2 of 2 weights sum to 1 and both experts are the same FFN
    owner = upcycle(anchor, torch.randn(d), torch.randn(anchor.config.num_hidden_layers, d), use_bias=True).eval()
    x = tokens()
    torch.testing.assert_close(owner(x).logits, anchor(x).logits, atol=1e-5, rtol=1e-5)


def test_trainable_contract_is_exactly_expert1_router_row1_and_bias(smoke_anchor):
    anchor = load_anchor(smoke_anchor)
    owner = upcycle(anchor, use_bias=True)
    trainable = {n for n, p in owner.named_parameters() if p.requires_grad}
    assert trainable == set(trainable_parameter_names(owner))
    L = anchor.config.num_hidden_layers
    assert len(trainable) == 4 * L
    assert all(("trainable_" in n) or n.endswith("logit_bias") for n in trainable)
    expected = L * (3 * anchor.config.hidden_size * anchor.config.intermediate_size + anchor.config.hidden_size + 1)
    assert sum(p.numel() for p in trainable_parameters(owner)) == expected


def test_only_the_contract_moves_after_training_steps(smoke_anchor):
    anchor = load_anchor(smoke_anchor)
    public = torch.randn(anchor.config.hidden_size)
    owner = upcycle(anchor, public, torch.randn(anchor.config.hidden_size), use_bias=True)
    before = {n: p.detach().clone() for n, p in owner.named_parameters() if p.requires_grad}
    # every parameter goes to the optimiser: the structure (not the optimiser's list) must keep things frozen
    opt = torch.optim.AdamW([p for p in owner.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    for step in range(3):
        x = tokens(step)
        owner(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
        project_after_step(owner)
    assert frozen_differences(owner, anchor, public) == []
    weights = [n for n in before if not n.endswith("logit_bias")]  # the bias may sit at its bound 0
    assert all(not torch.equal(owner.get_parameter(n), before[n]) for n in weights)
    with torch.no_grad():
        for layer in owner.model.layers:
            layer.mlp.gate.logit_bias += 1.0  # a positive bias must be projected back to <= 0
    project_after_step(owner)
    assert all(float(layer.mlp.gate.logit_bias.max()) <= 0 for layer in owner.model.layers)


def test_expert_train_cli_keeps_shared_weights_bit_identical(smoke_anchor, owner_data, tmp_path, capsys):
    pkg = tmp_path / "pkg"
    assert main(["expert", "train", "--anchor", str(smoke_anchor), "--domain", "code", "--data",
                 str(owner_data["code"]), "--out", str(pkg), "--steps", "3"]) == 0
    manifest = json.loads((pkg / "manifest.json").read_text())
    assert manifest["training"]["steps"] == 3 and manifest["data"]["documents"] > 0
    assert "text" not in json.dumps(manifest["data"]).lower().replace("texts", "")  # counts and hashes only
    weights = load_file(pkg / "expert.safetensors")
    anchor = load_anchor(smoke_anchor)
    gate_up0 = torch.cat([anchor.model.layers[0].mlp.gate_proj.weight, anchor.model.layers[0].mlp.up_proj.weight])
    assert not torch.equal(weights["layers.0.gate_up_proj"], gate_up0)  # the expert did train
    # Bit-identical: the anchor + this package merged holds every anchor tensor unchanged (expert 0 = its FFN).
    from flexolmo_core.io import layout
    from flexolmo_core.io.checkpoint import load_state
    from flexolmo_core.merge.merging import merge

    merge(smoke_anchor, [pkg], tmp_path / "merged")
    merged, base = layout.from_hf_moe(load_state(tmp_path / "merged")), layout.from_hf_dense(load_state(smoke_anchor))
    assert all(torch.equal(merged[name], tensor) for name, tensor in base.items())
    assert torch.equal(weights["layers.0.public_router"], torch.zeros_like(weights["layers.0.public_router"]))


def test_router_rows_must_have_a_known_shape(smoke_anchor):
    anchor = load_anchor(smoke_anchor)
    with pytest.raises(ValueError, match="router embedding must have shape"):
        upcycle(anchor, torch.randn(7))
