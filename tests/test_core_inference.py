import json
import shutil

import torch
from safetensors.torch import load_file, save_file

from flexolmo_core.cli.main import main
from flexolmo_core.inference.model import generate, load_flexolmo
from flexolmo_core.merge.merging import merge

X = torch.randint(0, 1000, (2, 20), generator=torch.Generator().manual_seed(2))
PROMPT = "def read_lines(path):"


def logits(loaded):
    with torch.no_grad():
        return loaded.model(X).logits


def test_masking_an_expert_equals_merging_without_it(smoke_anchor, packages, merged, tmp_path):
    without = tmp_path / "without_code"
    merge(smoke_anchor, [packages["news"]], without, top_k=2)
    masked = load_flexolmo(merged, exclude=["code"])
    reference = load_flexolmo(without)
    torch.testing.assert_close(logits(masked), logits(reference), atol=1e-5, rtol=1e-5)
    a = generate(masked, PROMPT, max_new_tokens=12)
    b = generate(reference, PROMPT, max_new_tokens=12)
    assert a["token_ids"] == b["token_ids"]
    assert a["attribution"]["code"] == 0.0
    # and masking really changes something: with all experts the logits differ
    assert not torch.allclose(logits(load_flexolmo(merged)), logits(reference), atol=1e-4)


def test_only_is_the_complement_of_exclude(merged):
    torch.testing.assert_close(logits(load_flexolmo(merged, only=["public", "news"])),
                               logits(load_flexolmo(merged, exclude=["code"])))


def test_strict_loads_only_the_kept_experts(smoke_anchor, packages, merged, tmp_path):
    corrupt = tmp_path / "corrupt"
    shutil.copytree(merged, corrupt)
    weights = {k: v.clone() for k, v in load_file(corrupt / "model.safetensors").items()}
    for name in list(weights):
        if name.endswith(("experts.gate_up_proj", "experts.down_proj", "gate.weight")):
            weights[name][1] = float("nan")  # expert 1 = code: unusable on disk
    save_file(weights, str(corrupt / "model.safetensors"), metadata={"format": "pt"})
    strict = load_flexolmo(corrupt, exclude=["code"], strict=True)
    assert strict.model.config.num_experts == 2
    reference = load_flexolmo(merged, exclude=["code"])
    torch.testing.assert_close(logits(strict), logits(reference), atol=1e-5, rtol=1e-5)
    assert generate(strict, PROMPT, 8)["token_ids"] == generate(reference, PROMPT, 8)["token_ids"]


def test_attribution_shares_sum_to_one(merged):
    result = generate(load_flexolmo(merged), PROMPT, max_new_tokens=6)
    shares = result["attribution"]
    assert set(shares) == {"public", "code", "news"}
    assert abs(sum(shares.values()) - 1) < 1e-3 and all(s >= 0 for s in shares.values())


def test_generate_cli(merged, capsys):
    assert main(["generate", "--model", str(merged), "--exclude", "news", "--max-new-tokens", "5", "--json", PROMPT]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["kept"] == ["public", "code"] and out["attribution"]["news"] == 0.0 and len(out["token_ids"]) <= 5
    assert out["off"] == ["news"]
    assert main(["generate", "--model", str(merged), "--exclude", "news", "--max-new-tokens", "3", PROMPT]) == 0
    table = capsys.readouterr().out.split("-- attribution")[1].splitlines()
    assert [line.split() for line in table if "news" in line] == [["news", "off"]]
    assert main(["generate", "--model", str(merged), "--max-new-tokens", "3", PROMPT]) == 0
    assert "attribution" in capsys.readouterr().out
    assert main(["generate", "--model", str(merged), "--exclude", "poetry", PROMPT]) == 2
    assert "unknown expert(s) ['poetry']" in capsys.readouterr().err
    assert main(["generate", "--model", str(merged), "--top-k", "0", PROMPT]) == 2
    assert "top_k must be >= 1" in capsys.readouterr().err
    for empty in ("", ",", " "):  # opt-in that names nothing fails closed (it once kept every expert)
        assert main(["generate", "--model", str(merged), "--only", empty, PROMPT]) == 2
        assert "--only names no expert" in capsys.readouterr().err


def test_use_bias_reapplies_the_learned_router_bias(smoke_anchor, tmp_path):
    from reference.owner import upcycle

    from flexolmo_core.anchor.model import load_anchor, read_fingerprint
    from flexolmo_core.expert.package import package_tensors, save_package

    anchor = load_anchor(smoke_anchor)
    d = anchor.config.hidden_size
    owner = upcycle(anchor, torch.randn(d), torch.randn(d), use_bias=True)
    with torch.no_grad():
        for i, layer in enumerate(owner.model.layers):
            layer.mlp.experts.trainable_down_proj.mul_(1.5)  # make the expert differ from the public FFN
            layer.mlp.gate.logit_bias.fill_(-0.7 - i)
    save_package(package_tensors(owner), tmp_path / "pkg", "law", read_fingerprint(smoke_anchor), anchor_dir=smoke_anchor)
    merge(smoke_anchor, [tmp_path / "pkg"], tmp_path / "m", top_k=2)
    manifest = json.loads((tmp_path / "m" / "flexolmo.json").read_text())
    assert manifest["router_bias"] == "dropped" and manifest["experts"][1]["logit_bias"][1] < -1.6
    with torch.no_grad():
        expected = owner.eval()(X).logits
    torch.testing.assert_close(logits(load_flexolmo(tmp_path / "m", use_bias=True)), expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(logits(load_flexolmo(tmp_path / "m")), expected, atol=1e-4)
