"""The paths a 7B-class run takes, at smoke size: one dtype rule end to end with a bf16 anchor (train ->
package -> merge -> router tuning -> load -> generate -> evaluate), sharded safetensors that transformers
reads unchanged, the plain-read tensor reader against safetensors' own, and devices (CPU always, CUDA when
torch sees one)."""
from __future__ import annotations

import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from flexolmo_core.anchor.model import anchor_fingerprint
from flexolmo_core.io.checkpoint import checkpoint_meta, load_state
from flexolmo_core.merge import baselines  # noqa: E402
from flexolmo_core.merge.merging import merge, opt_out  # noqa: E402
from flexolmo_core.training.config import LoopConfig  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
LOOP = dict(steps=2, lr=3e-3, warmup=1, global_batch=4, micro_batch=4, seq_len=32, checkpoint_every=2,
            eval_batches=1, progress=False)


def dtypes_of(folder) -> set[str]:
    return {str(dtype).removeprefix("torch.") for dtype, _ in checkpoint_meta(folder).values()}


@pytest.fixture(scope="module")
def bf16_anchor(tmp_path_factory, smoke_anchor):
    """The smoke anchor as a published bf16 checkpoint, imported (the import keeps its dtype)."""
    from transformers import AutoModelForCausalLM

    from flexolmo_core.anchor.importing import import_anchor
    from flexolmo_core.anchor.model import copy_tokenizer

    root = tmp_path_factory.mktemp("bf16")
    published = root / "published"
    AutoModelForCausalLM.from_pretrained(smoke_anchor).to(torch.bfloat16).save_pretrained(published)
    copy_tokenizer(smoke_anchor, published)
    import_anchor(published, root / "anchor")
    return root / "anchor"


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_anchor_end_to_end(bf16_anchor, owner_data, tmp_path, device):
    from flexolmo_core.evaluation import runner, smoke
    from flexolmo_core.expert.package import load_package
    from flexolmo_core.inference.model import generate, load_flexolmo
    from flexolmo_core.training.stages import train_expert, tune_router

    assert dtypes_of(bf16_anchor) == {"bfloat16"}
    loop = LoopConfig(**LOOP, device=device)
    for domain in ("code", "news"):
        summary = train_expert(bf16_anchor, domain, [owner_data[domain]], tmp_path / f"{domain}.run", loop,
                               domain_rows=torch.randn(64) * 0.1, package_dir=tmp_path / domain)
        assert summary["train_loss"] == summary["train_loss"]  # a number, not NaN
        package = load_package(tmp_path / domain, expected_dtype="bfloat16")  # one dtype, the anchor's
        assert {r["dtype"] for r in package.manifest["tensors"].values()} == {"bfloat16"}
    merge(bf16_anchor, [tmp_path / "code", tmp_path / "news"], tmp_path / "merged", top_k=2)
    assert dtypes_of(tmp_path / "merged") == {"bfloat16"}
    tune_router(tmp_path / "merged", [owner_data["news"]], [[owner_data["code"]]], tmp_path / "rt", loop,
                public_windows=4, proxy_windows=4)
    assert dtypes_of(tmp_path / "rt" / "model") == {"bfloat16"}
    before = checkpoint_meta(tmp_path / "merged")
    assert checkpoint_meta(tmp_path / "rt" / "model") == before  # only the router values changed
    loaded = load_flexolmo(tmp_path / "rt" / "model", device=device)
    expected = torch.float32 if device == "cpu" else torch.bfloat16  # dtypes.py rule 5
    assert next(loaded.model.parameters()).dtype == expected
    out = generate(loaded, "def main", max_new_tokens=3)
    shares = out["attribution"]  # each rounded to 4 decimals: their sum is 1 within half a unit of the 4th per share
    assert len(out["token_ids"]) == 3 and abs(sum(shares.values()) - 1) <= 5e-5 * len(shares) + 1e-12
    smoke.write_domain_fixture(tmp_path / "domains", ["code"], n_docs=2)
    cfg = runner.EvalConfig(domain_limit=2, domains_dir=str(tmp_path / "domains"), batch_size=2, device=device)
    result = runner.evaluate_lm(runner.hf_lm(tmp_path / "rt" / "model", cfg), ["flexolmo_domain_code"], cfg)
    assert result["tasks"]["flexolmo_domain_code"]["status"] == "ok"
    assert result["tasks"]["flexolmo_domain_code"]["value"] > 0


def test_a_package_of_another_dtype_is_refused(bf16_anchor, packages, tmp_path):
    """fp32 packages (trained against the fp32 smoke anchor) are refused by dtype before anything else reads them."""
    from flexolmo_core.errors import PackageError
    from flexolmo_core.expert.package import load_package

    with pytest.raises(PackageError, match="float32, the anchor's weights are bfloat16"):
        load_package(packages["news"], expected_dtype="bfloat16")


def test_sharded_outputs_read_back_unchanged(smoke_anchor, packages, tmp_path):
    """Every writer of models shards past `shard_bytes` in transformers' layout, and what it writes is tensor
    for tensor what the single-file form holds; transformers loads both to the same logits."""
    from transformers import AutoModelForCausalLM

    pkgs = [packages["code"], packages["news"]]
    small = 200_000  # bytes: the smoke merge (~2.9 MB) becomes many shards
    merge(smoke_anchor, pkgs, tmp_path / "one", top_k=2)
    merge(smoke_anchor, pkgs, tmp_path / "sharded", top_k=2, shard_bytes=small)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in (tmp_path / "sharded").glob("*.safetensors"))
    assert len(shards) > 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert set(index["weight_map"].values()) == set(shards)
    assert not (tmp_path / "one" / "model.safetensors.index.json").exists()
    assert anchor_fingerprint(tmp_path / "one") == anchor_fingerprint(tmp_path / "sharded")

    def same(a, b):
        sa, sb = load_state(a), load_state(b)
        assert sorted(sa) == sorted(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)

    same(tmp_path / "one", tmp_path / "sharded")
    ids = torch.tensor([[1, 5, 9, 2, 7]])
    logits = [AutoModelForCausalLM.from_pretrained(tmp_path / n)(ids).logits for n in ("one", "sharded")]
    assert torch.equal(logits[0], logits[1])
    for name, make in {
        "optout": lambda src, out, b: opt_out(src, ["code"], out, shard_bytes=b),
        "dense": lambda src, out, b: baselines.extract_dense_expert(src, 1, out, shard_bytes=b),
    }.items():
        make(tmp_path / "one", tmp_path / f"{name}_one", 10**12)
        make(tmp_path / "sharded", tmp_path / f"{name}_sharded", small)  # reads shards, writes shards
        same(tmp_path / f"{name}_one", tmp_path / f"{name}_sharded")
    baselines.extract_dense_expert(tmp_path / "sharded", 2, tmp_path / "dense2", shard_bytes=small)
    baselines.model_soup([tmp_path / "dense_sharded", tmp_path / "dense2"], tmp_path / "soup", shard_bytes=small)
    d1, d2, soup = (load_state(tmp_path / n) for n in ("dense_sharded", "dense2", "soup"))
    ffn = "model.layers.0.mlp.down_proj.weight"
    assert torch.allclose(soup[ffn], (d1[ffn] + d2[ffn]) / 2, atol=1e-6)
    manifest = json.loads((tmp_path / "soup" / "flexolmo.json").read_text())
    assert manifest["shared_sha256"] == baselines.shared_sha256(soup) == baselines.shared_sha256(d1)


def test_tensor_files_read_what_safe_open_reads(merged):
    from safetensors import safe_open

    from flexolmo_core.io.stream_safetensors import TensorFiles

    files = TensorFiles(merged)
    with safe_open(str(merged / "model.safetensors"), framework="pt") as handle:
        for name in handle.keys():
            assert torch.equal(files.get(name), handle.get_tensor(name))
            if ".experts." in name:
                for e in range(handle.get_slice(name).get_shape()[0]):
                    assert torch.equal(files.get(name, e), handle.get_slice(name)[e])
    name = "model.layers.0.mlp.experts.0.down_proj.weight"
    with pytest.raises(IndexError):
        files.get(name, files.meta(name)[1][0])


def test_pieces_must_add_up_to_the_declared_tensor(tmp_path):
    from flexolmo_core.errors import InputError
    from flexolmo_core.io.stream_safetensors import write_streaming

    spec = ("w", torch.float32, (3, 2), lambda: (torch.ones(1, 2) for _ in range(2)))
    with pytest.raises(InputError, match="produced 2 rows"):
        write_streaming(tmp_path / "x.safetensors", [spec])


def test_cuda_is_refused_plainly_without_a_gpu():
    from flexolmo_core.errors import InputError
    from flexolmo_core.io.dtypes import resolve_device

    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="needs a CUDA GPU"):
            resolve_device("cuda")
    with pytest.raises(InputError, match="device must be one of"):
        LoopConfig(device="tpu")


def test_a_header_length_that_starts_like_a_pickle_is_still_safetensors(tmp_path):
    """A header of 128 + 256k bytes begins with 0x80, a pickle's protocol marker; the JSON after it decides."""
    import struct

    from flexolmo_core.io.stream_safetensors import TensorFiles, check_safetensors_file, save_tensors

    for pad in range(300):
        path = tmp_path / "w.safetensors"
        save_tensors({"w": torch.arange(6.0).reshape(2, 3)}, path, metadata={"pad": "x" * pad})
        if struct.unpack("<Q", path.read_bytes()[:8])[0] % 256 == 0x80:
            break
    assert path.read_bytes()[:1] == b"\x80"
    check_safetensors_file(path)
    assert torch.equal(TensorFiles(path).get("w"), torch.arange(6.0).reshape(2, 3))
    path.write_bytes(b"\x80\x02" + b"not json at all")  # a real pickle's start is still refused
    from flexolmo_core.errors import InputError

    with pytest.raises(InputError, match="pickle"):
        check_safetensors_file(path)


@pytest.mark.slow  # about 50 s: the whole GPU script rehearsed on the CPU
def test_the_gpu_check_script_runs_end_to_end_on_the_cpu(tmp_path):
    """benchmarks/gpu_check.sh, rehearsed at smoke shapes on the CPU: every part runs and reports (on a GPU
    machine the same script runs at `small` and a 1B-class shape)."""
    import subprocess

    env = {**os.environ, "DEVICE": "cpu", "QUICK": "1", "OUT": str(tmp_path)}
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh"], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "tokens/s" in (tmp_path / "train_small.txt").read_text()
    assert "expert (ours)" in (tmp_path / "expert_1b.txt").read_text()
    assert "merged (4 experts, top-2)" in (tmp_path / "decode.txt").read_text()
    assert "2 passed" in (tmp_path / "tests.txt").read_text()  # a scale path and DP's vectorised clipping
    assert "expert (ours, DP-SGD)" in (tmp_path / "dp_owner.txt").read_text()
