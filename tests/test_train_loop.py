"""The one training loop on the smoke preset: the owner contract, resume (in process and after a real
SIGKILL), observability outputs, data isolation of the expert stage, router tuning, the unrestricted MoE."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flexolmo_core.training.config import LoopConfig

REPO = Path(__file__).resolve().parents[1]
LOOP = LoopConfig(steps=6, global_batch=4, micro_batch=2, seq_len=32, lr=3e-3, warmup=2, checkpoint_every=2,
                  keep_checkpoints=2, eval_batches=2, progress=False, threads=1)


def env():
    return {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def trained_expert(tmp_path_factory, smoke_anchor, owner_data):
    from flexolmo_core.training.stages import train_expert

    out = tmp_path_factory.mktemp("expert")
    pub, dom = torch.randn(64) * 0.3, torch.randn(64) * 0.3
    summary = train_expert(smoke_anchor, "code", [owner_data["code"]], out, LOOP, val_data=[owner_data["code"]],
                           public_rows=pub, domain_rows=dom, use_bias=True)
    return out, summary


def test_expert_training_keeps_contract_and_reports(trained_expert, smoke_anchor):
    from flexolmo_core.anchor.model import read_fingerprint
    from flexolmo_core.expert.package import load_package

    out, summary = trained_expert
    package = load_package(out / "package", anchor_fingerprint=read_fingerprint(smoke_anchor))
    assert package.manifest["training"]["steps"] == 6 and package.uses_bias
    for key in ("train_loss", "val_loss", "tokens", "wall_seconds", "mfu", "tokens_per_s"):
        assert summary[key] is not None, key
    assert json.loads((out / "summary.json").read_text())["val_loss"] == summary["val_loss"]
    assert (out / "run/dvclive/plots/metrics/expert_code/loss.tsv").exists()
    assert [p.name for p in sorted((out / "run/checkpoints").iterdir())] == ["step-00000004", "step-00000006"]
    # expert 1 moved; the public expert and shared weights are checked bit-identical inside train_expert
    anchor = load_file(str(smoke_anchor / "model.safetensors"))
    start = torch.cat([anchor["model.layers.0.mlp.gate_proj.weight"], anchor["model.layers.0.mlp.up_proj.weight"]])
    assert package.tensor("layers.0.gate_up_proj").shape == start.shape
    assert not torch.equal(package.tensor("layers.0.gate_up_proj"), start)  # upcycled from the anchor FFN, then trained


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])  # the loop runs wherever torch sees a device


@pytest.mark.parametrize("device", DEVICES)
def test_resume_in_process_is_bit_identical(tmp_path, smoke_anchor, owner_data, device):
    from dataclasses import replace

    from flexolmo_core.training.stages import train_expert

    loop = replace(LOOP, device=device)
    full, part = tmp_path / "full", tmp_path / "part"
    train_expert(smoke_anchor, "code", [owner_data["code"]], full, loop)
    train_expert(smoke_anchor, "code", [owner_data["code"]], part, replace(loop, steps=6))
    shutil.rmtree(part / "package")
    for ck in ("step-00000006",):  # drop the final checkpoint: resume from step 4
        shutil.rmtree(part / "run/checkpoints" / ck)
    summary = train_expert(smoke_anchor, "code", [owner_data["code"]], part, loop)
    assert summary["resumed_from"] == "step-00000004"
    a, b = load_file(str(full / "package/expert.safetensors")), load_file(str(part / "package/expert.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def anchor_cmd(tokenizer, data, out, steps):
    return [sys.executable, "-m", "flexolmo_core.cli.main", "anchor", "train", "--preset", "smoke", "--tokenizer",
            str(tokenizer), "--data", str(data), "--out", str(out), "--steps", str(steps), "--global-batch", "4",
            "--micro-batch", "2", "--seq-len", "32", "--warmup", "2", "--checkpoint-every", "2", "--threads", "1",
            "--lr", "3e-3"]


@pytest.mark.slow  # about 20 s: a training subprocess killed and resumed
def test_sigkill_and_resume_gives_bit_identical_weights(tmp_path, smoke_tokenizer, owner_data):
    steps = 40
    straight = subprocess.run(anchor_cmd(smoke_tokenizer, owner_data["code"], tmp_path / "a", steps), env=env(),
                              capture_output=True, text=True, timeout=240)
    assert straight.returncode == 0, straight.stderr[-2000:]
    victim = subprocess.Popen(anchor_cmd(smoke_tokenizer, owner_data["code"], tmp_path / "b", steps), env=env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints = tmp_path / "b/run/checkpoints"
    deadline = time.time() + 180
    while time.time() < deadline and not (checkpoints.exists() and any(p.name >= "step-00000006" for p in checkpoints.iterdir())):
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not (tmp_path / "b/model").exists(), "the run finished before it could be killed"
    resumed = subprocess.run(anchor_cmd(smoke_tokenizer, owner_data["code"], tmp_path / "b", steps), env=env(),
                             capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    summary = json.loads((tmp_path / "b/summary.json").read_text())
    assert summary["resumed_from"] is not None
    a, b = load_file(str(tmp_path / "a/model/model.safetensors")), load_file(str(tmp_path / "b/model/model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_expert_stage_runs_with_only_its_own_domain(tmp_path, smoke_anchor, small_texts):
    """tasks.expert in a folder holding the anchor and one domain's data, nothing else; the public mix reads
    the replay sample that ships inside the anchor folder."""
    import numpy as np
    from tokenizers import Tokenizer

    from flexolmo_core.data.packing import tokenize_documents, write_packed
    from flexolmo_core.training.embeddings import save_embedding

    out = tmp_path / "owner_site"
    shutil.copytree(smoke_anchor, out / "outputs/anchor/model")
    tok = Tokenizer.from_file(str(smoke_anchor / "tokenizer.json"))
    stream = tokenize_documents(small_texts["code"], tok, tok.token_to_id("<|endoftext|>"))
    cut = len(stream) * 9 // 10
    write_packed(stream[:cut], out / "outputs/tokenizer/code/train", 32, 1 << 20, {})
    write_packed(np.ascontiguousarray(stream[cut:]), out / "outputs/tokenizer/code/validation", 32, 1 << 20, {})
    for name in ("public", "code"):
        save_embedding(out / f"outputs/domain_embedding/{name}", torch.randn(64) * 0.3, {"domain": name})
    from flexolmo_core.training.data import TokenWindows
    from flexolmo_core.training.replay import write_public_replay

    public = tokenize_documents(small_texts["public"][:40], tok, tok.token_to_id("<|endoftext|>"))
    write_public_replay(out / "outputs/anchor/model", TokenWindows(public, 64), 2000, seed=0)
    (out / "params.yaml").write_text(
        "preset: smoke\ndomains: {code: {steps: 3}}\nexpert:\n  use_bias: false\n  public_mix: 0.25\n"
        "  loop: {global_batch: 2, micro_batch: 2, seq_len: 32, warmup: 1, eval_batches: 1, progress: false}\n")
    done = subprocess.run([sys.executable, "-m", "tasks.expert", "code"], cwd=out, env=env(), capture_output=True,
                          text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    manifest = json.loads((out / "outputs/expert/code/package/manifest.json").read_text())
    assert manifest["domain"] == "code" and manifest["training"]["steps"] == 3
    assert manifest["training"]["public_mix"] == 0.25
    assert sorted(p.name for p in (out / "outputs").iterdir()) == ["anchor", "domain_embedding", "expert", "tokenizer"]
    # the CLI builds the same ExpertJob from the same params and inputs: the same expert, the same embedding record
    o = "outputs"
    done = subprocess.run([sys.executable, "-m", "flexolmo_core.cli.main", "expert", "train", "--params", "params.yaml",
                           "--domain", "code", "--anchor", f"{o}/anchor/model", "--data", f"{o}/tokenizer/code/train",
                           "--val-data", f"{o}/tokenizer/code/validation", "--public-embedding",
                           f"{o}/domain_embedding/public", "--domain-embedding", f"{o}/domain_embedding/code",
                           "--out", str(tmp_path / "by_hand")], cwd=out, env=env(), capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    by_hand = json.loads((tmp_path / "by_hand/manifest.json").read_text())
    recorded = manifest["training"]["router_embedding"]
    assert by_hand["training"]["router_embedding"] == recorded and recorded["domain"] == "code"
    assert (tmp_path / "by_hand/expert.safetensors").read_bytes() == \
        (out / "outputs/expert/code/package/expert.safetensors").read_bytes()


@pytest.mark.parametrize("device", DEVICES)
def test_router_tuning_moves_only_router_rows(tmp_path, merged, owner_data, small_texts, device):
    from dataclasses import replace

    from flexolmo_core.inference.model import load_flexolmo
    from flexolmo_core.training.stages import tune_router

    (tmp_path / "public.txt").write_text("\n\n".join(small_texts["public"][:60]))
    summary = tune_router(merged, [tmp_path / "public.txt"], [owner_data["code"], owner_data["news"]], tmp_path / "rt",
                          replace(LOOP, device=device), public_windows=8, proxy_windows=8)
    assert summary["experts"] == ["public", "code", "news"]
    before, after = load_file(str(merged / "model.safetensors")), load_file(str(tmp_path / "rt/model/model.safetensors"))
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert changed and all(k.endswith("mlp.gate.weight") for k in changed)
    assert load_flexolmo(tmp_path / "rt/model").manifest["router_tuned"]["steps"] == LOOP.steps
    assert summary["top_k"] == 3  # all experts by default (the paper)


def test_router_rows_get_their_own_learning_rate(smoke_anchor):
    import dataclasses

    from flexolmo_core.anchor.model import load_anchor
    from flexolmo_core.training.loop import group_lr, make_optimizer
    from flexolmo_core.training.stages import owner_fast_model

    anchor = load_anchor(smoke_anchor)
    d, L = anchor.config.hidden_size, anchor.config.num_hidden_layers
    model, _ = owner_fast_model(anchor, torch.zeros(L, d), torch.ones(L, d), True)
    cfg = dataclasses.replace(LOOP, router_lr_scale=10.0, weight_decay=0.1)
    optimizer = make_optimizer(model, cfg)
    scale = {id(p): group_lr(g, 1.0, cfg) for g in optimizer.param_groups for p in g["params"]}
    decay = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        local = name.rsplit(".", 1)[-1]
        assert scale[id(p)] == (10.0 if local.startswith(("router_", "bias_")) else 1.0), name
        assert decay[id(p)] == (0.0 if local.startswith("bias_") else 0.1), name
    assert len(scale) == sum(1 for _ in model.parameters())  # every trainable tensor in exactly one group


def test_expert_top_k_one_routes_each_token_to_one_ffn(tmp_path, smoke_anchor, owner_data):
    """The expert-training top-k lever: at k=1 each token passes through the FFN its router prefers, weighted by
    its raw probability (so the router still learns); k=2 is the soft mixture. Training at k=1 keeps the contract
    (checked inside train_expert) and records k."""
    import dataclasses

    from flexolmo_core.anchor.model import load_anchor
    from flexolmo_core.training.stages import owner_fast_model, train_expert

    anchor = load_anchor(smoke_anchor)
    d, L = anchor.config.hidden_size, anchor.config.num_hidden_layers
    g = torch.Generator().manual_seed(0)
    pub, dom = torch.randn(L, d, generator=g), torch.randn(L, d, generator=g)
    soft, _ = owner_fast_model(anchor, pub, dom, False, top_k=2)
    hard, _ = owner_fast_model(anchor, pub, dom, False, top_k=1)
    with torch.no_grad():  # make expert 1 differ from the public FFN, so the routing shows in the output
        for m in (soft, hard):
            m.layers[0].w.gate_up_1.mul_(3.0)
    ids = torch.randint(0, anchor.config.vocab_size, (2, 16), generator=g)
    x = torch.randn(2, 16, d, generator=g)
    block = hard.layers[0]
    probs = torch.softmax(block.router_logits(x.reshape(-1, d)), dim=-1)
    winner = probs.argmax(-1)
    expected = torch.stack([block.expert(int(e), x.reshape(-1, d)[i:i + 1], torch.float32)[0] * probs[i, e]
                            for i, e in enumerate(winner)])
    assert torch.allclose(block.ffn(x, torch.float32, []).reshape(-1, d), expected, atol=1e-5)
    assert not torch.allclose(soft(ids)[0], hard(ids)[0], atol=1e-4)  # k=2 mixes both FFNs, k=1 does not
    loop = dataclasses.replace(LOOP, steps=2, checkpoint_every=2)
    summary = train_expert(smoke_anchor, "code", [owner_data["code"]], tmp_path / "k1", loop, public_rows=pub,
                           domain_rows=dom, top_k=1)
    assert summary["top_k"] == 1


@pytest.mark.parametrize("device", DEVICES)
def test_unrestricted_moe_matches_flop_budget_and_loads(tmp_path, smoke_tokenizer, owner_data, device):
    from dataclasses import replace

    from flexolmo_core.anchor.presets import get_preset
    from flexolmo_core.inference.model import load_flexolmo
    from flexolmo_core.training.model import MoEShape, count_matmul_flops
    from flexolmo_core.training.stages import train_unrestricted

    per_token = count_matmul_flops(get_preset("smoke"), MoEShape(3, 2), 32, lambda n: True)["train_step"]
    budget = 5 * per_token * LOOP.global_batch * LOOP.seq_len
    summary = train_unrestricted(smoke_tokenizer, [owner_data["code"], owner_data["news"]], tmp_path / "u", "smoke", 3, 2,
                                 replace(LOOP, steps=1, device=device), budget_flops=budget)
    assert summary["steps"] == 5
    loaded = load_flexolmo(tmp_path / "u/model")
    assert loaded.model.config.num_experts == 3 and loaded.model.config.num_experts_per_tok == 2


def test_tokens_per_second_is_a_moving_average():
    """One slow step (the machine busy elsewhere) moves the shown speed by its share of the window only."""
    import collections
    import types

    from flexolmo_core.training.loop import SPEED_WINDOW, log_step

    run = types.SimpleNamespace(label="t", tokens_per_step=100, live=None, bar=None, report_every=0,
                                recent_seconds=collections.deque(maxlen=SPEED_WINDOW))
    shown = [log_step(run, i + 1, 1e-3, 1.0, 0.0, s) for i, s in enumerate([1.0, 1.0, 100.0])]
    assert shown[:2] == [100.0, 100.0] and shown[2] == 300 / 102
    for i in range(SPEED_WINDOW):
        last = log_step(run, 4 + i, 1e-3, 1.0, 0.0, 1.0)
    assert last == 100.0  # the slow step has left the window


def test_without_a_terminal_progress_is_a_plain_line_every_few_steps(capsys):
    """No tqdm bar in a log file or the Prefect UI: `[k/N]` lines, which the pipeline turns into progress."""
    import collections
    import types

    from flexolmo_core.training.loop import log_step

    run = types.SimpleNamespace(label="expert", tokens_per_step=100, live=None, bar=None, report_every=3,
                                cfg=types.SimpleNamespace(steps=7), recent_seconds=collections.deque(maxlen=20))
    for done in range(1, 8):
        log_step(run, done, 1e-3, 2.5, 0.0, 1.0)
    lines = capsys.readouterr().err.splitlines()
    assert [line.split("]")[0] for line in lines] == ["expert: [3/7", "expert: [6/7", "expert: [7/7"]
    assert lines[-1] == "expert: [7/7] loss 2.500, 100 tokens/s, lr 1.00e-03"


def test_btx_learns_a_fresh_router_on_all_data_with_the_tuning_budget(tmp_path, merged, owner_data, small_texts):
    """BTX: the merged experts unchanged, every router row redrawn then trained on all of the data; with the
    rows redrawn and zero steps of learning it could not match FlexOlmo-RT's start (the domain embeddings)."""
    from dataclasses import replace

    from flexolmo_core.merge.merging import read_manifest
    from flexolmo_core.training.stages import train_btx, tune_router

    (tmp_path / "public.txt").write_text("\n\n".join(small_texts["public"][:60]))
    data = [tmp_path / "public.txt", owner_data["code"], owner_data["news"]]
    loop = replace(LOOP, steps=2)
    summary = train_btx(merged, data, tmp_path / "btx", loop)
    assert summary["router_init"] == "random" and summary["steps"] == 2 and summary["label"] == "btx"
    before, after = load_file(str(merged / "model.safetensors")), load_file(str(tmp_path / "btx/model/model.safetensors"))
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert changed == sorted(k for k in before if k.endswith("mlp.gate.weight"))  # every router, nothing else
    rt = tune_router(merged, data[0], data[1:], tmp_path / "rt", loop, public_windows=None, proxy_windows=None)
    tuned = load_file(str(tmp_path / "rt/model/model.safetensors"))
    gate = "model.layers.0.mlp.gate.weight"
    # after 2 small steps RT's rows are still near the domain embeddings; BTX's are near its fresh draw
    assert (tuned[gate] - before[gate]).abs().max() < (after[gate] - before[gate]).abs().max()
    assert read_manifest(tmp_path / "btx/model")["baseline"] == "btx" and rt["router_init"] == "merged"


def test_switched_off_stages_record_why_and_clear_old_outputs(tmp_path, monkeypatch):
    """btx and unrestricted_moe are off at tiny: each replaces its old outputs with a summary that says why."""
    import tasks.btx
    import tasks.unrestricted_moe

    shutil.copyfile(REPO / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    for stage, module in (("btx", tasks.btx), ("unrestricted_moe", tasks.unrestricted_moe)):
        (tmp_path / "outputs" / stage / "model").mkdir(parents=True)  # a previous run's checkpoint
        summary = module.main("params.yaml")
        assert summary["status"] == "not run" and f"{stage}.enabled is false" in summary["reason"]
        assert json.loads((tmp_path / "outputs" / stage / "summary.json").read_text()) == summary
        assert not (tmp_path / "outputs" / stage / "model").exists()


def test_auto_dtype_takes_the_faster_matmul_on_the_cpu_and_bf16_on_a_gpu(monkeypatch):
    """loop.dtype auto: on the CPU bf16 only when its measured matmul rate clearly beats fp32's (a near tie keeps
    fp32); on a GPU bf16 without measuring, fp32 on one without bf16; a named dtype is taken as given."""
    from flexolmo_core.io.dtypes import compute_dtype

    cpu, gpu = torch.device("cpu"), torch.device("cuda")

    def rates(bf16, fp32):
        return lambda dtype, on: {torch.bfloat16: bf16, torch.float32: fp32}[dtype]

    assert compute_dtype("auto", cpu, rates(62.2e9, 123.5e9)) == (torch.float32,
                                                                  {"bfloat16": 62.2e9, "float32": 123.5e9})
    assert compute_dtype("auto", cpu, rates(240e9, 120e9))[0] == torch.bfloat16
    assert compute_dtype("auto", cpu, rates(125e9, 120e9))[0] == torch.float32  # within the margin: fp32
    never = lambda dtype, on: pytest.fail("measured without need")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **kw: True)
    assert compute_dtype("auto", gpu, never) == (torch.bfloat16, {})
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **kw: False)  # e.g. a V100 or a T4
    assert compute_dtype("auto", gpu, never) == (torch.float32, {})
    assert compute_dtype("float16", cpu, never) == (torch.float16, {})


def test_auto_dtype_run_records_the_dtype_it_chose(tmp_path, smoke_anchor, owner_data, monkeypatch):
    """The run trains in the chosen dtype and its summary says which, with the rates that chose it; the MFU
    denominator is the chosen dtype's measured rate."""
    import dataclasses

    from flexolmo_core.anchor.model import load_anchor
    from flexolmo_core.training import loop
    from flexolmo_core.training.stages import train_expert

    seen = []
    fake = {torch.bfloat16: 3e9, torch.float32: 1e9}  # this "machine" multiplies 3x faster in bf16
    monkeypatch.setattr(loop, "measure_matmul_peak", lambda dtype, on, **kw: seen.append(dtype) or fake[dtype])
    real_setup = loop.setup
    chosen = []
    monkeypatch.setattr(loop, "setup", lambda model, *a, **kw: chosen.append(real_setup(model, *a, **kw)) or chosen[-1])
    anchor = load_anchor(smoke_anchor)
    d, L = anchor.config.hidden_size, anchor.config.num_hidden_layers
    pub, dom = torch.zeros(L, d), torch.zeros(L, d)
    summary = train_expert(smoke_anchor, "code", [owner_data["code"]], tmp_path / "auto",
                           dataclasses.replace(LOOP, steps=2, checkpoint_every=2, dtype="auto"),
                           public_rows=pub, domain_rows=dom)
    assert chosen[0].inner.compute_dtype == torch.bfloat16
    assert summary["dtype"] == "bfloat16" and summary["dtype_rates"] == {"bfloat16": 3e9, "float32": 1e9}
    assert summary["matmul_peak_flops"] == 3e9 and seen == [torch.bfloat16, torch.float32]  # measured once each


def test_the_expert_stage_trains_the_same_package_whatever_the_matmul_timing_says(tmp_path, monkeypatch, smoke_anchor,
                                                                                 owner_data):
    """loop.dtype auto is resolved once per machine by the numerics stage, and the expert stage reads that record:
    with the measured rates flipped between two runs (bf16 3x faster, then 3x slower), the numerics record stays
    and the two packages are byte for byte the same. (When each stage timed its own matmuls, the flip changed
    the compute dtype, and with it the weights.)"""
    import yaml

    import tasks
    import tasks.expert
    import tasks.numerics
    from flexolmo_core.expert.package import load_package
    from flexolmo_core.training import loop as training_loop
    from flexolmo_core.training.embeddings import save_embedding

    ws = tmp_path / "ws"
    shutil.copytree(smoke_anchor, ws / "outputs/anchor/model")
    for split in ("train", "validation"):
        shutil.copytree(owner_data["code"], ws / f"outputs/tokenizer/code/{split}")
    d = json.loads((smoke_anchor / "config.json").read_text())["hidden_size"]
    for domain, seed in (("public", 0), ("code", 1)):
        rows = torch.randn(d, generator=torch.Generator().manual_seed(seed)) * 0.1
        save_embedding(ws / f"outputs/domain_embedding/{domain}", rows, {"mode": "random", "domain": domain})
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params.update(preset="smoke", domains={"code": {"steps": 2, "checkpoint_every": 2, "eval_batches": 1, "public_mix": 0}})
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    monkeypatch.chdir(ws)

    def machine_measures(bf16: float, fp32: float) -> None:
        rates = {torch.bfloat16: bf16, torch.float32: fp32}
        monkeypatch.setattr(tasks.numerics, "measure_matmul_peak", lambda dtype, on, **kw: rates[dtype])
        monkeypatch.setattr(training_loop, "measure_matmul_peak", lambda dtype, on, **kw: rates[dtype])

    shas, records, dtypes = [], [], []
    for bf16, fp32 in ((3e9, 1e9), (1e9, 3e9)):
        machine_measures(bf16, fp32)
        records.append(tasks.numerics.main("params.yaml"))
        dtypes.append(tasks.expert.main("code", "params.yaml")["dtype"])
        shas.append(load_package(ws / "outputs/expert/code/package").sha256)
        shutil.rmtree(ws / "outputs/expert")
    assert shas[0] == shas[1], dtypes
    assert dtypes == ["bfloat16", "bfloat16"]  # the first measurement's choice, both times
    assert records[0] == records[1] and records[0]["auto"]["cpu"]["dtype"] == "bfloat16"
    # a named dtype is used as given; a missing record is a clear error, not a silent timing
    assert tasks.pin_dtype(LoopConfig(dtype="float32")).dtype == "float32"
    (ws / tasks.NUMERICS).unlink()
    from flexolmo_core.errors import MissingInput

    with pytest.raises(MissingInput, match="resolved once per machine by the numerics stage"):
        tasks.pin_dtype(LoopConfig(dtype="auto"))


def test_numerics_measures_again_on_another_machine_or_margin(monkeypatch):
    from flexolmo_core.io import dtypes

    rates = {torch.bfloat16: 3e9, torch.float32: 1e9}
    first = dtypes.resolve_numerics(None, lambda dtype, on: rates[dtype])
    assert first["auto"]["cpu"] == {"dtype": "bfloat16", "matmul_flops": {"bfloat16": 3e9, "float32": 1e9}}
    rates = {torch.bfloat16: 1e9, torch.float32: 3e9}
    assert dtypes.resolve_numerics(first, lambda dtype, on: rates[dtype]) is first  # same machine: kept
    assert dtypes.resolve_numerics(first, lambda dtype, on: rates[dtype], margin=1.2)["auto"]["cpu"]["dtype"] == "float32"
    moved = {**first, "machine": {**first["machine"], "cpu": "another CPU"}}
    assert dtypes.resolve_numerics(moved, lambda dtype, on: rates[dtype])["auto"]["cpu"]["dtype"] == "float32"
    assert dtypes.pinned_dtype("auto", "cpu", first) == "bfloat16" and dtypes.pinned_dtype("float32", "cpu", first) == "float32"


def test_a_run_killed_while_dvclive_wrote_its_summary_resumes(tmp_path, smoke_anchor, owner_data):
    """A SIGKILL in the middle of dvclive's in-place summary write leaves torn JSON (seen once in the kill-and-resume
    test, under load); the resume drops it instead of failing to read it."""
    import dataclasses

    from flexolmo_core.training.stages import train_expert

    loop = dataclasses.replace(LOOP, steps=2, checkpoint_every=2)
    train_expert(smoke_anchor, "code", [owner_data["code"]], tmp_path / "run", loop)
    summary = tmp_path / "run" / "run" / "dvclive" / "metrics.json"
    assert json.loads(summary.read_text())["step"] >= 1
    summary.write_text('{"step": 1, "loss": 3.')  # torn mid-write
    result = train_expert(smoke_anchor, "code", [owner_data["code"]], tmp_path / "run",
                          dataclasses.replace(loop, steps=4))
    assert result["resumed_from"] == "step-00000002" and json.loads(summary.read_text())["step"] >= 3


def test_router_tuning_with_the_auxiliary_cross_entropy_routes_each_proxy_set_to_its_expert(merged, owner_data,
                                                                                           small_texts, tmp_path,
                                                                                           own_top1):
    """router_aux_ce (issue 29's lever): the routing cross-entropy against each window's proxy set, beside the LM
    loss, moves each proxy set's tokens to its own expert; only router rows train, as in plain router tuning."""
    from dataclasses import replace

    from flexolmo_core.training.data import Mixture, open_windows
    from flexolmo_core.training.stages import Take, read_merged, tune_router

    public = tmp_path / "public.txt"
    public.write_text("\n\n".join(small_texts["public"][:60]))
    sets = [public, owner_data["code"], owner_data["news"]]
    loop = replace(LOOP, steps=12, lr=5e-2, warmup=1)
    shares = {}
    for aux in (0.0, 1.0):
        out = tmp_path / f"rt_{aux:g}"
        tune_router(merged, sets[0], sets[1:], out, replace(loop, router_aux_ce=aux), public_windows=8, proxy_windows=8)
        windows = {e: torch.stack([torch.as_tensor(w[i][:LOOP.seq_len]) for i in range(len(w))])
                   for e, w in enumerate(Take(open_windows(p, LOOP.seq_len, merged), 8, 0) for p in sets)}
        shares[aux] = own_top1(out / "model", windows)
        _, before, _ = read_merged(merged)
        _, after, _ = read_merged(out / "model")
        assert all(torch.equal(before[k], after[k]) for k in before if not k.endswith("gate.weight"))
    assert shares[1.0] > shares[0.0] + 0.15, shares
    labelled = Mixture([Take(open_windows(p, 8, merged), 2, 0) for p in sets])
    assert [labelled.label_of(i) for i in range(len(labelled))] == [0, 0, 1, 1, 2, 2]


def test_the_auxiliary_cross_entropy_is_the_routing_cross_entropy_written_out(merged):
    import torch.nn.functional as F

    from flexolmo_core.io.layout import from_hf_moe
    from flexolmo_core.training.model import MoEShape, build
    from flexolmo_core.training.stages import read_merged

    cfg, state, _ = read_merged(merged)
    model = build(cfg, MoEShape(3, 3), from_hf_moe(state, cfg.n_layers), lambda n: ".router_" in n, torch.float32)
    ids = torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(0))
    targets = torch.tensor([1, 2])
    model.set_router_targets(targets)
    model(ids)
    expected = []
    for u in model.hidden_states(ids):
        expected.append(F.cross_entropy(u.reshape(-1, u.shape[-1]) @ torch.stack(
            [getattr(model.layers[len(expected)].w, f"router_{e}") for e in range(3)]).T, targets.repeat_interleave(9)))
    torch.testing.assert_close(model.routing_ce(), torch.stack(expected).mean())


def test_the_auxiliary_cross_entropy_refuses_windows_without_labels(merged, owner_data, tmp_path):
    from dataclasses import replace

    from flexolmo_core.errors import InputError
    from flexolmo_core.io.layout import from_hf_moe
    from flexolmo_core.training.data import open_windows
    from flexolmo_core.training.loop import train
    from flexolmo_core.training.model import MoEShape, build
    from flexolmo_core.training.stages import read_merged

    cfg, state, _ = read_merged(merged)
    model = build(cfg, MoEShape(3, 3), from_hf_moe(state, cfg.n_layers), lambda n: ".router_" in n, torch.float32)
    with pytest.raises(InputError, match="router_aux_ce needs windows labelled by proxy set"):
        train(model, open_windows(owner_data["code"], 32, merged), replace(LOOP, router_aux_ce=1.0), tmp_path / "run")
    assert not (tmp_path / "run").exists()
