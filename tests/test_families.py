"""The whole path on both architecture families, with checkpoints built by transformers at smoke size:
an OLMo-2 anchor with GQA saved sharded (-> FlexOlmo) and a Llama anchor with GQA and tied embeddings
(-> Mixtral). Each: import the anchor, train an owner expert, import a released-style 2-expert model,
merge, load with AutoModelForCausalLM, and check the method's guarantees."""
from __future__ import annotations

import json
import re

import pytest
import torch
from published import SHAPE, released_style_expert, save, token_ids

from flexolmo_core.anchor.importing import import_anchor
from flexolmo_core.errors import PackageError
from flexolmo_core.expert.convert import export_package, import_package, read_internal, split_merged
from flexolmo_core.expert.package import load_package
from flexolmo_core.merge.merging import merge, opt_out

FAMILIES = {"olmo2_gqa_sharded": "FlexOlmoForCausalLM", "llama_gqa_tied": "MixtralForCausalLM"}


def published_anchor(name: str, tokenizer_dir, out):
    from transformers import LlamaConfig, LlamaForCausalLM, Olmo2Config, Olmo2ForCausalLM

    torch.manual_seed(0)
    if name == "olmo2_gqa_sharded":
        return save(Olmo2ForCausalLM(Olmo2Config(**SHAPE, **token_ids(tokenizer_dir))), tokenizer_dir, out,
                    max_shard_size="100KB")
    model = LlamaForCausalLM(LlamaConfig(**SHAPE, **token_ids(tokenizer_dir), tie_word_embeddings=True))
    return save(model, tokenizer_dir, out)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def world(request, tmp_path_factory, smoke_tokenizer, owner_data):
    from flexolmo_core.training.config import LoopConfig
    from flexolmo_core.training.stages import train_expert

    root = tmp_path_factory.mktemp(request.param)
    published = published_anchor(request.param, smoke_tokenizer, root / "published")
    anchor = root / "anchor"
    import_anchor(published, anchor, replay_data=[owner_data["news"]], replay_tokens=1024, seq_len=32)
    L, d = SHAPE["num_hidden_layers"], SHAPE["hidden_size"]
    torch.manual_seed(3)
    public, domain = torch.randn(L, d) * 0.1, torch.randn(L, d) * 0.1
    loop = LoopConfig(steps=4, lr=3e-3, warmup=1, global_batch=2, micro_batch=2, seq_len=32, checkpoint_every=4,
                      eval_batches=1, progress=False)
    train_expert(anchor, "code", [owner_data["code"]], root / "code.run", loop, public_rows=public,
                 domain_rows=domain, package_dir=root / "code", public_mix=0.25)
    released = released_style_expert(anchor, public, root / "released_model")
    import_package(released, anchor, root / "released", domain="released")
    merge(anchor, [root / "code", root / "released"], root / "merged", top_k=2)
    return {"root": root, "anchor": anchor, "published": published, "public": public, "domain": domain,
            "architecture": FAMILIES[request.param], "released_model": released}


def logits(model_dir, ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return type(model).__name__, model(ids).logits


def sample_ids(seed: int = 0):
    return torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(seed))


def converted_from(model_type: str) -> list:
    """The per-expert names transformers' own conversion map converts from when it loads `model_type`."""
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    return [re.compile(re.escape(pattern).replace(r"\*", r"\d+")) for rule in get_checkpoint_conversion_mapping(model_type)
            if type(rule).__name__ == "WeightConverter" for pattern in rule.source_patterns]


def test_every_written_expert_tensor_is_in_the_layout_transformers_converts_from(world, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    from flexolmo_core.cli.inspect import describe
    from flexolmo_core.inference.model import load_flexolmo
    from flexolmo_core.io.checkpoint import checkpoint_meta

    root = world["root"]
    opt_out(root / "merged", ["code"], tmp_path / "optout", top_k=1)
    for model in (root / "merged", tmp_path / "optout", world["released_model"]):
        model_type = AutoConfig.from_pretrained(model).model_type
        sources = converted_from(model_type)
        names = list(checkpoint_meta(model))
        experts = [n for n in names if ".experts." in n]
        assert sources and experts and all(any(p.search(n) for p in sources) for n in experts), (model, experts[:3])
        routers = [n for n in names if n.endswith("gate.weight")]
        assert all(".block_sparse_moe." in n for n in experts + routers) == (model_type == "mixtral")
        info = describe(model)
        assert info["layout"] == {"flex_olmo": "released-flex_olmo", "mixtral": "released-mixtral"}[model_type]
        assert info["renormalizes_top_k"] is (model_type == "mixtral")
        hf, loading = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32, output_loading_info=True)
        assert not any(loading.values()), loading  # strict: nothing missing, unexpected or mismatched
        if model == world["released_model"]:
            continue
        # what transformers 4.x reads the same way (benchmarks/interop.py runs it): RoPE's theta beside 5.x's
        # rope_parameters, and a tokenizer class it knows
        config = json.loads((model / "config.json").read_text())
        assert config["rope_theta"] == config["rope_parameters"]["rope_theta"] and "transformers_version" not in config
        assert json.loads((model / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
        ours = load_flexolmo(model, strict=True, dtype=torch.float32, device="cpu").model  # our reader, not transformers'
        with torch.no_grad():
            diff = (hf.eval()(sample_ids()).logits - ours(sample_ids()).logits).abs().max()
        assert diff < 1e-5, (model, diff)


def test_public_parts_stay_bit_identical(world):
    anchor, merged = read_internal(world["anchor"]), read_internal(world["root"] / "merged")
    assert all(torch.equal(merged[name], tensor) for name, tensor in anchor.items())
    code = load_package(world["root"] / "code")
    for i in range(SHAPE["num_hidden_layers"]):
        assert torch.equal(code.tensor(f"layers.{i}.public_router"), world["public"][i])
        assert torch.equal(merged[f"layers.{i}.router_0"], world["public"][i])
        assert not torch.equal(code.tensor(f"layers.{i}.router"), world["domain"][i])  # the domain row trained


def test_anchor_plus_one_package_at_k2_is_the_owner_model(world, tmp_path):
    """The exported 2-expert model (transformers' own class) computes what the owner trained (FastOlmo)."""
    from transformers import AutoModelForCausalLM

    from flexolmo_core.training.model import build
    from flexolmo_core.training.stages import owner_fast_model

    export_package(world["root"] / "code", world["anchor"], tmp_path / "owner")
    name, hf = logits(tmp_path / "owner", ids := sample_ids())
    assert name == world["architecture"]
    owner, tensors = owner_fast_model(AutoModelForCausalLM.from_pretrained(world["anchor"]), world["public"],
                                      world["domain"], False)
    package = load_package(world["root"] / "code")
    for i in range(SHAPE["num_hidden_layers"]):
        tensors[f"layers.{i}.gate_up_1"] = package.tensor(f"layers.{i}.gate_up_proj")
        tensors[f"layers.{i}.down_1"] = package.tensor(f"layers.{i}.down_proj")
        tensors[f"layers.{i}.router_1"] = package.tensor(f"layers.{i}.router")
    fast = build(owner.cfg, owner.moe, tensors, lambda n: False, torch.float32).eval()
    with torch.no_grad():
        assert torch.allclose(fast(ids)[0], hf, atol=1e-5, rtol=0)


@pytest.mark.parametrize("top_k", [1, 2])  # at k=1 of 2, Mixtral's renormalised weight (1) differs from FlexOlmo's
def test_masking_an_expert_equals_the_merge_without_it(world, tmp_path, top_k):
    from flexolmo_core.inference.model import load_flexolmo

    root = world["root"]
    merge(world["anchor"], [root / "code"], tmp_path / "without", top_k=top_k)
    opt_out(root / "merged", ["released"], tmp_path / "opted_out", top_k=top_k)
    without, opted = read_internal(tmp_path / "without"), read_internal(tmp_path / "opted_out")
    assert without.keys() == opted.keys() and all(torch.equal(without[k], opted[k]) for k in without)
    name, expected = logits(tmp_path / "without", ids := sample_ids(1))
    assert name == world["architecture"]
    masked = load_flexolmo(root / "merged", exclude=["released"], top_k=top_k)
    with torch.no_grad():
        got = masked.model(ids).logits
        _, full = logits(root / "merged", ids)
    assert torch.allclose(got, expected, atol=1e-5, rtol=0)
    assert not torch.allclose(full, expected, atol=1e-3)  # the released expert did contribute before


def test_a_router_scale_scales_every_row_and_keeps_opt_out_exact(world, tmp_path):
    """merge.router_scale (a router temperature, a lever of issue 29): every row, the public one included, is the
    unscaled merge's row times the scale; the opt-out of a scaled merge is the scaled merge without the expert."""
    root = world["root"]
    merge(world["anchor"], [root / "code", root / "released"], tmp_path / "scaled", top_k=2, router_scale=4.0)
    plain, scaled = read_internal(root / "merged"), read_internal(tmp_path / "scaled")
    routers = [k for k in plain if ".router" in k]
    assert routers and plain.keys() == scaled.keys()
    for k in plain:
        assert torch.equal(scaled[k], plain[k] * 4.0 if k in routers else plain[k]), k
    merge(world["anchor"], [root / "code"], tmp_path / "without", top_k=1, router_scale=4.0)
    opt_out(tmp_path / "scaled", ["released"], tmp_path / "opted_out", top_k=1)
    without, opted = read_internal(tmp_path / "without"), read_internal(tmp_path / "opted_out")
    assert without.keys() == opted.keys() and all(torch.equal(without[k], opted[k]) for k in without)
    assert json.loads((tmp_path / "scaled/flexolmo.json").read_text())["router_scale"] == 4.0
    with pytest.raises(Exception, match="router-scale"):
        merge(world["anchor"], [root / "code"], tmp_path / "bad", router_scale=0.0)
    assert not (tmp_path / "bad").exists()


def test_released_expert_round_trip_and_split(world, tmp_path, capsys):
    from flexolmo_core.cli.main import main

    root, anchor = world["root"], str(world["anchor"])
    assert main(["package", "export", str(root / "released"), "--anchor", anchor, "--out", str(tmp_path / "exported")]) == 0
    assert main(["package", "import", "--from", str(tmp_path / "exported"), "--anchor", anchor,
                 "--out", str(tmp_path / "again")]) == 0
    assert main(["package", "import", "--from", str(tmp_path / "exported"), "--anchor", anchor, "--expert", "2",
                 "--out", str(tmp_path / "none")]) == 2
    assert "has experts 0..1; expert 2 cannot be imported" in capsys.readouterr().err
    before = read_internal(world["anchor"])
    for argv in (["merge", "--anchor", anchor, "--expert", str(root / "code"), "--out", anchor],  # onto the anchor
                 ["merge", "--anchor", anchor, "--expert", str(root / "code"), "--out", str(root)],  # around it
                 ["package", "export", str(root / "code"), "--anchor", anchor, "--out", str(root / "code")],
                 ["package", "split", str(root / "merged"), "--anchor", anchor, "--out", str(root / "merged")]):
        assert main(argv) == 2, argv
        assert "would overwrite the source" in capsys.readouterr().err
    assert all(torch.equal(before[k], t) for k, t in read_internal(world["anchor"]).items())
    assert load_package(root / "code").domain == "code" and (root / "merged" / "flexolmo.json").exists()
    assert main(["package", "import", "--from", str(tmp_path / "exported"), "--anchor", str(tmp_path / "nowhere"),
                 "--out", str(tmp_path / "none")]) == 2
    assert "nowhere/config.json: missing; expected the anchor folder" in capsys.readouterr().err
    a, b = load_package(root / "released"), load_package(tmp_path / "again")
    assert b.domain == "released" and a.tensor_names == b.tensor_names
    assert all(torch.equal(a.tensor(n), b.tensor(n)) for n in a.tensor_names)
    released = read_internal(world["released_model"])
    assert torch.equal(a.tensor("layers.1.gate_up_proj"), released["layers.1.gate_up_1"])
    split = split_merged(root / "merged", world["anchor"], tmp_path / "split")
    assert sorted(split) == ["code", "released"]
    for domain in split:
        ours, back = load_package(root / domain), load_package(split[domain])
        assert all(torch.equal(ours.tensor(n), back.tensor(n)) for n in ours.tensor_names)


def test_import_checks_the_anchor_within_bf16_rounding(world, tmp_path):
    from safetensors.torch import load_file, save_file

    source = world["released_model"]
    rounded, shifted = tmp_path / "rounded", tmp_path / "shifted"
    for out, change in ((rounded, lambda t: t.to(torch.bfloat16).float()), (shifted, lambda t: t + 0.02)):
        out.mkdir()
        for f in source.iterdir():
            if f.suffix == ".safetensors":
                state = load_file(str(f))
                norm = "model.norm.weight"
                state = {k: change(v) if k == norm else v for k, v in state.items()}
                save_file(state, str(out / f.name), metadata={"format": "pt"})
            else:
                (out / f.name).write_bytes(f.read_bytes())
    import_package(rounded, world["anchor"], tmp_path / "ok", domain="released")  # bf16 noise passes
    with pytest.raises(PackageError, match=r"tensor norm differs from the anchor's by 0\.0\d+"):
        import_package(shifted, world["anchor"], tmp_path / "bad", domain="released")
    assert not (tmp_path / "bad").exists()
    with pytest.raises(PackageError, match=r"model_type '(olmo2|llama)' is dense"):
        import_package(world["published"], world["anchor"], tmp_path / "dense", domain="x")
