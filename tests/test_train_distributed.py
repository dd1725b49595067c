"""torchrun with 2 CPU processes (gloo) matches one process with the same global batch: DDP, and FSDP2
(fully_shard per block) for what CPU allows."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow  # torchrun subprocesses: about 70 s in all


def run(args, nproc: int, tmp: Path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1"}
    head = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m"]
            if nproc > 1 else [sys.executable, "-m"])
    done = subprocess.run(head + ["flexolmo_core.cli.main", *args], env=env, capture_output=True, text=True, timeout=300,
                          cwd=tmp)
    assert done.returncode == 0, done.stderr[-3000:]


def anchor_args(tokenizer, data, out, strategy="ddp"):
    return ["anchor", "train", "--preset", "smoke", "--tokenizer", str(tokenizer), "--data", str(data), "--out", str(out),
            "--steps", "4", "--global-batch", "4", "--micro-batch", "2", "--seq-len", "32", "--warmup", "1",
            "--dtype", "float32", "--threads", "1", "--distributed", strategy, "--checkpoint-every", "2",
            "--lr", "3e-3"]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one(tmp_path, smoke_tokenizer, owner_data, strategy):
    run(anchor_args(smoke_tokenizer, owner_data["code"], tmp_path / "one"), 1, tmp_path)
    run(anchor_args(smoke_tokenizer, owner_data["code"], tmp_path / "two", strategy), 2, tmp_path)
    a = load_file(str(tmp_path / "one/model/model.safetensors"))
    b = load_file(str(tmp_path / "two/model/model.safetensors"))
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < 1e-4, worst  # same samples, same math; only the gradient summation order differs


def test_fsdp_resumes_from_its_checkpoints(tmp_path, smoke_tokenizer, owner_data):
    """Two FSDP2 ranks, stopped after step 2 (the step-4 checkpoint and the model removed), resume to the same
    weights as an uninterrupted FSDP run: checkpoints hold full (unsharded) tensors that every rank reshards."""
    import shutil

    full, part = tmp_path / "full", tmp_path / "part"
    run(anchor_args(smoke_tokenizer, owner_data["code"], full, "fsdp"), 2, tmp_path)
    run(anchor_args(smoke_tokenizer, owner_data["code"], part, "fsdp"), 2, tmp_path)
    shutil.rmtree(part / "run/checkpoints/step-00000004")
    shutil.rmtree(part / "model")
    run(anchor_args(smoke_tokenizer, owner_data["code"], part, "fsdp"), 2, tmp_path)
    assert '"resumed_from": "step-00000002"' in (part / "summary.json").read_text()
    a, b = load_file(str(full / "model/model.safetensors")), load_file(str(part / "model/model.safetensors"))
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < 1e-5, worst
