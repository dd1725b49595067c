import json
import shutil

import torch
from safetensors.torch import load_file, save_file

from flexolmo_core.anchor.model import anchor_fingerprint, load_anchor, read_fingerprint, save_anchor
from flexolmo_core.cli.main import main


def test_fingerprint_is_stable_across_save_and_load(smoke_anchor, smoke_tokenizer, tmp_path):
    fp = anchor_fingerprint(smoke_anchor)
    assert fp == read_fingerprint(smoke_anchor)
    resaved = tmp_path / "resaved"
    assert save_anchor(load_anchor(smoke_anchor), smoke_tokenizer, resaved) == fp
    assert anchor_fingerprint(resaved) == fp


def test_fingerprint_changes_with_any_shared_weight_or_the_tokenizer(smoke_anchor, tmp_path):
    fp = anchor_fingerprint(smoke_anchor)
    for name in ("model.layers.1.self_attn.q_norm.weight", "model.layers.0.mlp.down_proj.weight", "lm_head.weight"):
        copy = tmp_path / name
        shutil.copytree(smoke_anchor, copy)
        weights = load_file(copy / "model.safetensors")
        weights[name] = weights[name].clone()
        weights[name].view(-1)[0] += 1e-3
        save_file(weights, str(copy / "model.safetensors"), metadata={"format": "pt"})
        assert anchor_fingerprint(copy) != fp, name
    copy = tmp_path / "tok"
    shutil.copytree(smoke_anchor, copy)
    tok = json.loads((copy / "tokenizer.json").read_text())
    tok["model"]["vocab"]["zzz_new"] = len(tok["model"]["vocab"]) + 5
    (copy / "tokenizer.json").write_text(json.dumps(tok))
    assert anchor_fingerprint(copy) != fp


def test_anchor_is_a_plain_transformers_checkpoint(smoke_anchor):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(smoke_anchor, use_safetensors=True)
    assert type(model).__name__ == "Olmo2ForCausalLM"
    assert not model.config.tie_word_embeddings
    tok = AutoTokenizer.from_pretrained(smoke_anchor)
    ids = tok("def f(x): return x", return_tensors="pt")["input_ids"]
    assert torch.isfinite(model(ids).logits).all()


def test_anchor_init_and_inspect_cli(smoke_tokenizer, tmp_path, capsys):
    out = tmp_path / "a"
    assert main(["anchor", "init", "--preset", "smoke", "--tokenizer", str(smoke_tokenizer), "--out", str(out)]) == 0
    fp = json.loads(capsys.readouterr().out)["fingerprint"]
    assert main(["inspect", str(out)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "anchor" and info["fingerprint"] == fp


def test_anchor_init_refuses_a_missing_tokenizer(tmp_path, capsys):
    assert main(["anchor", "init", "--preset", "smoke", "--tokenizer", str(tmp_path / "none"),
                 "--out", str(tmp_path / "a")]) == 2
    assert not (tmp_path / "a").exists()
