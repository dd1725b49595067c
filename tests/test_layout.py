"""One tensor layout: every model the merge stage writes passes `inspect` (anchor matches) and loads
strictly in transformers; opt-out is one function and equals merging without the expert."""
import json

import pytest
import torch

from flexolmo_core.cli.inspect import describe
from flexolmo_core.io import layout
from flexolmo_core.io.checkpoint import load_state
from flexolmo_core.merge.merging import merge, opt_out


@pytest.fixture(scope="module")
def variants(tmp_path_factory, smoke_anchor, packages):
    from flexolmo_core.merge.variants import MergeConfig, merge_variants

    out = tmp_path_factory.mktemp("merge_stage")
    index = merge_variants(MergeConfig(), smoke_anchor, packages, out, out)
    return out, index


def test_the_merge_stage_writes_every_variant(variants):
    _, index = variants
    assert sorted(index) == ["dense_code", "dense_news", "dense_public", "flexolmo", "optout_code", "optout_news", "soup"]


@pytest.mark.parametrize("name", ["flexolmo", "optout_code", "optout_news", "dense_public", "dense_code", "soup"])
def test_every_variant_passes_inspect_and_strict_loading(variants, smoke_anchor, name):
    from transformers import AutoModelForCausalLM

    out, _ = variants
    info = describe(out / name)
    assert info["anchor_matches"] is True, info
    dense = name.startswith(("dense_", "soup"))
    assert info["tensor_layout"] == ("dense" if dense else "fused experts (transformers 5's runtime form)"), info
    if "recorded_anchor_fingerprint" in info:
        assert info["recorded_anchor_fingerprint"] == describe(smoke_anchor)["fingerprint"]
    _, loading = AutoModelForCausalLM.from_pretrained(out / name, output_loading_info=True)
    assert not loading["missing_keys"] and not loading["unexpected_keys"] and not loading["mismatched_keys"]


def test_opt_out_equals_the_merge_without_the_expert(variants, smoke_anchor, packages, tmp_path):
    out, _ = variants
    remerged = tmp_path / "remerged"
    merge(smoke_anchor, [packages["code"], packages["news"]], remerged, exclude=["code"])
    a, b = load_state(out / "optout_code"), load_state(remerged)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((out / "optout_code" / "config.json").read_text()) == json.loads((remerged / "config.json").read_text())
    manifest = json.loads((out / "optout_code" / "flexolmo.json").read_text())
    expected = json.loads((remerged / "flexolmo.json").read_text())
    assert manifest.pop("opted_out_of") and manifest == expected


def test_opt_out_refuses_what_it_cannot_do(variants, tmp_path):
    out, _ = variants
    with pytest.raises(ValueError, match="unknown expert"):
        opt_out(out / "flexolmo", ["poetry"], tmp_path / "x")
    with pytest.raises(ValueError, match="anchor's FFN"):
        opt_out(out / "flexolmo", ["public"], tmp_path / "x")
    assert not (tmp_path / "x").exists()


def per_expert_form(fused: dict) -> dict:
    """The per-expert form (transformers writes it for some models): experts.<e>.<proj>_proj.weight."""
    per_expert = {}
    for name, tensor in fused.items():
        if name.endswith("experts.gate_up_proj"):
            for e, w in enumerate(tensor):
                gate, up = w.chunk(2)
                per_expert[name.replace("gate_up_proj", f"{e}.gate_proj.weight")] = gate
                per_expert[name.replace("gate_up_proj", f"{e}.up_proj.weight")] = up
        elif name.endswith("experts.down_proj"):
            per_expert.update({name.replace("down_proj", f"{e}.down_proj.weight"): w for e, w in enumerate(tensor)})
        else:
            per_expert[name] = tensor
    return per_expert


def test_layout_round_trips_and_reads_the_per_expert_form(variants):
    out, _ = variants
    fused = load_state(out / "flexolmo")
    back = layout.to_hf_moe(layout.from_hf_moe(fused))
    assert set(back) == set(fused) and all(torch.equal(back[k], fused[k]) for k in fused)
    per_expert = per_expert_form(fused)
    again = layout.to_hf_moe(layout.from_hf_moe(per_expert))
    assert set(again) == set(fused) and all(torch.equal(again[k], fused[k]) for k in fused)
    dense = load_state(out / "dense_public")
    assert all(torch.equal(v, layout.to_hf_dense(layout.from_hf_dense(dense))[k]) for k, v in dense.items())


def test_opt_out_of_a_per_expert_checkpoint_equals_opt_out_of_the_fused_one(variants, tmp_path):
    import shutil

    from safetensors.torch import save_file

    out, _ = variants
    per_expert = tmp_path / "per_expert"
    shutil.copytree(out / "flexolmo", per_expert)
    for f in per_expert.glob("*.safetensors*"):
        f.unlink()
    save_file(per_expert_form(load_state(out / "flexolmo")), str(per_expert / "model.safetensors"),
              metadata={"format": "pt"})
    opt_out(per_expert, ["code"], tmp_path / "a", top_k=2)
    opt_out(out / "flexolmo", ["code"], tmp_path / "b", top_k=2)
    a, b = load_state(tmp_path / "a"), load_state(tmp_path / "b")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_inspect_names_each_layout_a_checkpoint_can_hold():
    from flexolmo_core.io.layout import layout_name

    per_layer = lambda fmt: [fmt.format(e=e, p=p) for e in range(2) for p in ("gate", "up", "down")]  # noqa: E731
    assert layout_name(per_layer("model.layers.0.mlp.experts.{e}.{p}_proj.weight")).startswith("per-expert (FlexOlmo")
    mixtral = [n.replace("gate_proj", "w1").replace("up_proj", "w3").replace("down_proj", "w2")
               for n in per_layer("model.layers.0.block_sparse_moe.experts.{e}.{p}_proj.weight")]
    assert layout_name(mixtral).startswith("per-expert (Mixtral")
    assert layout_name(["model.layers.0.mlp.gate_proj.weight", "model.embed_tokens.weight"]) == "dense"
