import json
import os
import subprocess
import sys

import pytest
import torch
from reference.owner import project_after_step, trainable_parameters, upcycle
from safetensors.torch import load_file

from flexolmo_core.anchor.model import anchor_fingerprint, load_anchor, read_fingerprint
from flexolmo_core.cli.main import main
from flexolmo_core.expert.package import package_tensors, save_package
from flexolmo_core.merge.merging import merge

X = torch.randint(0, 1000, (2, 20), generator=torch.Generator().manual_seed(1))


def test_anchor_plus_one_package_at_k2_equals_the_owner_model(smoke_anchor, tmp_path):
    from transformers import AutoModelForCausalLM

    anchor = load_anchor(smoke_anchor)
    d = anchor.config.hidden_size
    owner = upcycle(anchor, torch.randn(d) * 0.1, torch.randn(d) * 0.1)
    opt = torch.optim.AdamW(trainable_parameters(owner), lr=1e-2, weight_decay=0.0)
    for _ in range(3):
        owner(input_ids=X, labels=X).loss.backward()
        opt.step()
        opt.zero_grad()
        project_after_step(owner)
    save_package(package_tensors(owner), tmp_path / "pkg", "math", read_fingerprint(smoke_anchor), anchor_dir=smoke_anchor)
    merge(smoke_anchor, [tmp_path / "pkg"], tmp_path / "merged", top_k=2)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", use_safetensors=True).eval()
    assert type(merged).__name__ == "FlexOlmoForCausalLM"
    assert merged.config.num_experts == 2 and merged.config.num_experts_per_tok == 2
    with torch.no_grad():
        torch.testing.assert_close(merged(X).logits, owner.eval()(X).logits, atol=1e-5, rtol=1e-5)


def test_shared_weights_and_public_ffn_are_bit_identical_to_the_anchor(smoke_anchor, merged):
    anchor = load_file(smoke_anchor / "model.safetensors")
    out = load_file(merged / "model.safetensors")
    for name, tensor in anchor.items():  # the anchor's FFN is expert 0, in the released per-expert names
        assert torch.equal(out[name.replace(".mlp.", ".mlp.experts.0.")], tensor), name
    manifest = json.loads((merged / "flexolmo.json").read_text())
    assert anchor_fingerprint(merged) == anchor_fingerprint(smoke_anchor) == manifest["anchor_fingerprint"]
    assert [e["domain"] for e in manifest["experts"]] == ["public", "code", "news"]
    assert manifest["router_bias"] == "dropped"  # the code package learned a bias; HF FlexOlmo has none


def test_merge_is_deterministic(smoke_anchor, packages, merged, tmp_path):
    again = tmp_path / "again"
    merge(smoke_anchor, [packages["code"], packages["news"]], again, top_k=2)
    for name in ("model.safetensors", "config.json", "flexolmo.json", "tokenizer.json"):
        assert (again / name).read_bytes() == (merged / name).read_bytes(), name


def test_a_failed_merge_leaves_the_previous_output_untouched(smoke_anchor, packages, tmp_path, monkeypatch):
    import flexolmo_core.merge.merging as merge_module

    out = tmp_path / "out"
    merge(smoke_anchor, [packages["news"]], out)
    before = (out / "model.safetensors").read_bytes()

    def crash(folder, specs, shard_bytes, metadata=None):
        with open(folder / "model.safetensors", "wb") as handle:
            handle.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(merge_module, "write_model", crash)
    with pytest.raises(OSError):
        merge(smoke_anchor, [packages["code"], packages["news"]], out)
    assert (out / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_killed_merge_leaves_no_output(smoke_anchor, packages, tmp_path):
    out = tmp_path / "killed"
    script = (
        "import os, signal, flexolmo_core.merge.merging as m\n"
        "real = m.write_model\n"
        "def die(folder, specs, shard_bytes, metadata=None):\n"
        "    real(folder, specs, shard_bytes, metadata=metadata)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "m.write_model = die\n"
        f"m.merge({str(smoke_anchor)!r}, [{str(packages['news'])!r}], {str(out)!r})\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=os.getcwd())
    assert proc.returncode == -9
    assert not out.exists()


def test_merge_cli_and_inspect(smoke_anchor, packages, tmp_path, capsys):
    out = tmp_path / "m"
    assert main(["merge", "--anchor", str(smoke_anchor), "--expert", str(packages["code"]), "--expert",
                 str(packages["news"]), "--out", str(out), "--top-k", "1", "--exclude", "news"]) == 0
    assert json.loads(capsys.readouterr().out)["experts"] == ["public", "code"]
    assert main(["inspect", str(out)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "merged model" and info["anchor_matches"] and info["top_k"] == 1
    assert main(["merge", "--anchor", str(smoke_anchor), "--expert", str(packages["code"]), "--out",
                 str(tmp_path / "bad"), "--exclude", "poetry"]) == 2
    assert "poetry" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_merge_refuses_a_package_from_another_anchor(smoke_tokenizer, packages, tmp_path, capsys):
    from flexolmo_core.anchor.model import init_anchor

    other = tmp_path / "other_anchor"
    init_anchor("smoke", smoke_tokenizer, other, seed=1)
    assert main(["merge", "--anchor", str(other), "--expert", str(packages["code"]), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert anchor_fingerprint(other) in err and "trained against anchor" in err


def test_streaming_writer_matches_safetensors(tmp_path):
    from safetensors.torch import save_file

    from flexolmo_core.io.stream_safetensors import write_streaming

    tensors = {"b": torch.randn(3, 5), "a.weight": torch.randn(7).to(torch.bfloat16), "c": torch.randn(2, 2, 2),
               "scalar": torch.tensor(1.5)}
    write_streaming(tmp_path / "ours.safetensors",
                    [(n, t.dtype, tuple(t.shape), (lambda t=t: t)) for n, t in tensors.items()], {"format": "pt"})
    save_file(tensors, str(tmp_path / "theirs.safetensors"), metadata={"format": "pt"})
    ours, theirs = load_file(tmp_path / "ours.safetensors"), load_file(tmp_path / "theirs.safetensors")
    assert ours.keys() == theirs.keys() == tensors.keys()
    assert all(torch.equal(ours[k], theirs[k]) and ours[k].dtype == theirs[k].dtype for k in tensors)
