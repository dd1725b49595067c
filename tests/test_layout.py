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
    assert info["layout"] == ("dense" if dense else "released-flex_olmo"), info
    assert json.loads((out / name / "flexolmo.json").read_text())["layout"] == info["layout"]
    assert info.get("renormalizes_top_k") is (None if dense else False)  # FlexOlmo as released: raw top-k weights
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


def fused_form(released: dict) -> dict:
    """The fused form this project wrote before (transformers 5's runtime names), from a released state."""
    reader = layout.MoEReader(*layout.state_getter(released))
    fused = {n: t for n, t in released.items() if not layout.is_moe_tensor(n)}
    for i in sorted(reader.routers):
        fused.update(layout.runtime_moe_state(reader, i, list(range(len(reader.router(i))))))
    return fused


def test_layout_round_trips_and_reads_the_fused_form(variants):
    out, _ = variants
    released = load_state(out / "flexolmo")
    assert layout.layout_name(released) == "released-flex_olmo"
    back = layout.to_hf_moe(layout.from_hf_moe(released))
    assert set(back) == set(released) and all(torch.equal(back[k], released[k]) for k in released)
    fused = fused_form(released)
    assert layout.layout_name(fused) == "fused" and len(fused) < len(released)
    again = layout.to_hf_moe(layout.from_hf_moe(fused))
    assert set(again) == set(released) and all(torch.equal(again[k], released[k]) for k in released)
    dense = load_state(out / "dense_public")
    assert all(torch.equal(v, layout.to_hf_dense(layout.from_hf_dense(dense))[k]) for k, v in dense.items())


def test_outputs_of_earlier_versions_still_work(variants, tmp_path):
    """A fused checkpoint (what earlier versions wrote) opts out, cuts a dense expert, fingerprints and loads
    strictly exactly as its released twin."""
    import shutil

    from safetensors.torch import save_file

    from flexolmo_core.anchor.model import anchor_fingerprint
    from flexolmo_core.inference.model import load_flexolmo
    from flexolmo_core.merge.baselines import extract_dense_expert

    out, _ = variants
    fused = tmp_path / "fused"
    shutil.copytree(out / "flexolmo", fused)
    for f in fused.glob("*.safetensors*"):
        f.unlink()
    save_file(fused_form(load_state(out / "flexolmo")), str(fused / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="says layout 'released-flex_olmo', but the weights are 'fused'"):
        describe(fused)  # the manifest and the weights must agree
    manifest = json.loads((fused / "flexolmo.json").read_text())
    (fused / "flexolmo.json").write_text(json.dumps({k: v for k, v in manifest.items() if k != "layout"}))
    assert describe(fused)["layout"] == "fused" and anchor_fingerprint(fused) == anchor_fingerprint(out / "flexolmo")
    for source in (fused, out / "flexolmo"):
        opt_out(source, ["code"], tmp_path / f"{source.name}_optout", top_k=2)
        extract_dense_expert(source, 1, tmp_path / f"{source.name}_dense")
    for kind in ("optout", "dense"):
        a, b = load_state(tmp_path / f"fused_{kind}"), load_state(tmp_path / f"flexolmo_{kind}")
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    ids = torch.tensor([[5, 9, 2, 7, 11, 3]])
    with torch.no_grad():
        a, b = (load_flexolmo(d, exclude=["news"], strict=True, device="cpu").model(ids).logits
                for d in (fused, out / "flexolmo"))
    assert torch.equal(a, b)


def test_inspect_names_each_layout_a_checkpoint_can_hold():
    from flexolmo_core.io.layout import layout_name

    per_layer = lambda fmt: [fmt.format(e=e, p=p) for e in range(2) for p in ("gate", "up", "down")]  # noqa: E731
    assert layout_name(per_layer("model.layers.0.mlp.experts.{e}.{p}_proj.weight")) == "released-flex_olmo"
    mixtral = [n.replace("gate_proj", "w1").replace("up_proj", "w3").replace("down_proj", "w2")
               for n in per_layer("model.layers.0.block_sparse_moe.experts.{e}.{p}_proj.weight")]
    assert layout_name(mixtral) == "released-mixtral"
    assert layout_name(["model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.gate.weight"]) == "fused"
    assert layout_name(["model.layers.0.mlp.gate_proj.weight", "model.embed_tokens.weight"]) == "dense"


def test_configs_are_written_so_transformers_4_reads_rope_as_5_does(tmp_path):
    from transformers import AutoConfig

    from flexolmo_core.anchor.families import write_config

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    write_config(tmp_path, AutoConfig.for_model("mixtral", hidden_size=64, rope_parameters=rope))
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["rope_theta"] == 500000.0 and written["rope_scaling"]["factor"] == 8.0
    assert written["rope_scaling"]["rope_type"] == "llama3" and "transformers_version" not in written
    assert AutoConfig.from_pretrained(tmp_path).rope_parameters == rope  # 5.x reads back what it wrote
