"""Canary exposure: planted secrets an expert memorised are measured, and opting the expert out takes them back
(the opt-out guarantee shown on what was memorised, not only on bpb)."""
from __future__ import annotations

import json
import math

import pytest
import torch

from benchmarks.privacy import bpb_difference
from flexolmo_core.audit.canaries import (
    DOCUMENTS,
    plant,
    read_canaries,
    write_canaries,
)
from flexolmo_core.cli.main import main
from flexolmo_core.errors import InputError


def test_planted_documents_hold_each_canary_as_often_as_asked(tmp_path):
    canaries = plant(2, [1, 4, 0], seed=3)
    write_canaries(canaries, tmp_path / "c")
    assert read_canaries(tmp_path / "c") == canaries and len({c.secret for c in canaries}) == 6
    docs = (tmp_path / "c" / DOCUMENTS).read_text().split("\n\n")
    for c in canaries:
        assert sum(d.strip() == c.text() for d in docs) == c.repeats
    with pytest.raises(InputError, match="repeat counts >= 0"):
        plant(1, [-1])


def test_bad_audit_input_is_one_line_and_writes_nothing(tmp_path, capsys):
    assert main(["audit", "canaries", "--plant", "2", "--repeats", "1,x", "--out", str(tmp_path / "c")]) == 2
    assert "--repeats must be comma-separated integers, got '1,x'" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
    assert main(["audit", "canaries", "--model", "m", "--canaries", "c", "--candidates", "0"]) == 2
    assert "--candidates must be >= 1, got 0" in capsys.readouterr().err
    for flag, value, expected in (("--batch-documents", "0", "must be >= 1 (--batch-documents), got 0"),
                                  ("--samples", "0", "must be >= 1 (--samples), got 0"),
                                  ("--temperature", "0", "must be > 0 (--temperature), got 0.0")):
        assert main(["audit", "extraction", "--model", "m", "--data", "d", flag, value]) == 2
        assert expected in capsys.readouterr().err


@pytest.fixture(scope="module")
def memorised(tmp_path_factory, smoke_anchor):
    """A merge of the smoke anchor and one expert trained on nothing but canary documents (2 canaries x 16),
    with 2 control canaries that were planted nowhere."""
    from flexolmo_core.merge.merging import merge
    from flexolmo_core.training.config import LoopConfig
    from flexolmo_core.training.stages import train_expert

    root = tmp_path_factory.mktemp("audit")
    from transformers import AutoTokenizer

    write_canaries(plant(4, [16, 0], seed=1, tokenizer=AutoTokenizer.from_pretrained(smoke_anchor)), root / "canaries")
    loop = LoopConfig(steps=120, lr=1e-2, warmup=4, global_batch=8, micro_batch=8, seq_len=32, checkpoint_every=40,
                      eval_batches=1, progress=False)
    train_expert(smoke_anchor, "code", [root / "canaries" / DOCUMENTS], root / "run", loop, package_dir=root / "pkg")
    merge(smoke_anchor, [root / "pkg"], root / "merged", top_k=2)
    return root


def measure(capsys, model, canaries, *extra) -> dict:
    assert main(["audit", "canaries", "--model", str(model), "--canaries", str(canaries), "--candidates", "1000",
                 "--device", "cpu", "--json", *extra]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.slow  # trains an expert for 120 steps and scores 3 x 8,008 sentences (~80 s)
def test_opting_the_expert_out_takes_back_what_it_memorised(memorised, smoke_anchor, capsys):
    """With the expert, the planted canaries stand out; opted out, every canary ranks as it does in the anchor
    that never saw them."""
    canaries = memorised / "canaries"
    with_expert = measure(capsys, memorised / "merged", canaries)
    opted_out = measure(capsys, memorised / "merged", canaries, "--exclude", "code")
    anchor = measure(capsys, smoke_anchor, canaries)
    planted = with_expert["by_repeats"]["16"]["mean_exposure"]
    assert planted > anchor["by_repeats"]["16"]["mean_exposure"] + 3, (with_expert, anchor)
    assert planted > with_expert["by_repeats"]["0"]["mean_exposure"] + 3
    assert [c["rank"] for c in opted_out["canaries"]] == [c["rank"] for c in anchor["canaries"]]


@pytest.mark.slow  # shares the trained expert above
def test_the_shared_prefix_scorer_gives_the_reference_scores(memorised, smoke_anchor):
    """exposure's fast path (the template's opening tokens run once, their KV cache copied to each batch of
    candidates) gives sequence_nll's totals and the same ranks: on the merge, its opt-out and the dense anchor,
    over several batches."""
    from flexolmo_core.audit.canaries import exposure, sequence_nll, shared_prefix_nll
    from flexolmo_core.cli.commands.audit import scoring_model

    canaries = read_canaries(memorised / "canaries")
    for path, exclude in ((memorised / "merged", []), (memorised / "merged", ["code"]), (smoke_anchor, [])):
        model, tokenizer = scoring_model(str(path), exclude, "cpu")
        texts = [canaries[0].text(f"{n * 7_919_113 % 10**10:010d}") for n in range(2000)]
        lengths = [len(tokenizer(t)["input_ids"]) for t in texts]
        texts = [t for t, n in zip(texts, lengths) if n == max(set(lengths), key=lengths.count)][:150]
        reference = sequence_nll(model, tokenizer, texts, batch=64)
        fast = shared_prefix_nll(model, [tokenizer(t)["input_ids"] for t in texts], batch=64)
        assert len(texts) > 128 and torch.allclose(fast, reference, atol=1e-4, rtol=0), (path, exclude)
        for c in canaries:
            a, b = exposure(model, tokenizer, c, 200), exposure(model, tokenizer, c, 200, reference=True)
            assert a["rank"] == b["rank"] and abs(a["nll"] - b["nll"]) < 1e-3, (a, b)


@pytest.mark.slow  # shares the trained expert above; draws 4 continuations of 16 tokens per document
# (20 prefix tokens hold the account name, which tells the 4 canaries apart; temperature 0.1: at 1.0 a smoke
# model's memory of 16 repeats is a ranking, not a certainty, and its samples are noise: near-zero extraction
# at small scale says little, as the issue says)
def test_extraction_finds_memorised_documents_and_none_once_the_expert_is_out(memorised, capsys):
    docs = memorised / "documents.jsonl"  # one training document per line (the .txt file is one document)
    docs.write_text("".join(json.dumps({"text": c.text()}) + "\n" for c in read_canaries(memorised / "canaries")
                            if c.repeats))

    def audit(*extra) -> dict:
        assert main(["audit", "extraction", "--model", str(memorised / "merged"), "--data", str(docs), "--prefixes", "8", "--prefix-tokens", "20",
                     "--new-tokens", "16", "--samples", "4", "--temperature", "0.1", "--device", "cpu", "--json",
                     *extra]) == 0
        return json.loads(capsys.readouterr().out)

    for batching in ([], ["--batch-documents", "1"]):  # the 4 documents in one generate call; one at a time
        with_expert, opted_out = audit(*batching), audit("--exclude", "code", *batching)
        assert with_expert["documents"] == 4 and with_expert["rate"] >= 0.75 and with_expert["interval_95"][0] > 0.3
        assert opted_out["extracted"] == 0 and opted_out["mean_similarity"] < with_expert["mean_similarity"] - 0.3


def test_the_wilson_interval_matches_its_formula_at_known_points():
    from flexolmo_core.audit.extraction import wilson

    low, high = wilson(0, 10)
    assert low == 0.0 and abs(high - 0.2775) < 1e-3  # the textbook 95% upper bound for 0 of 10
    low, high = wilson(5, 10)
    assert abs(low - 0.2366) < 1e-3 and abs(high - 0.7634) < 1e-3


def test_a_dense_model_with_a_manifest_is_scored_as_a_dense_model(merged, tmp_path):
    """A dense baseline carries flexolmo.json too; it has no experts to mask, so it loads as the causal LM it is."""
    from flexolmo_core.cli.commands.audit import scoring_model
    from flexolmo_core.merge.baselines import extract_dense_expert

    dense = extract_dense_expert(merged, 1, tmp_path / "dense")
    model, _ = scoring_model(str(dense), [], "cpu")
    assert type(model).__name__ == "Olmo2ForCausalLM"
    with pytest.raises(InputError, match="need a merged model"):
        scoring_model(str(dense), ["code"], "cpu")


def test_the_privacy_studys_bpb_cost_pools_bytes_and_resamples_the_same_documents_for_both_models():
    lengths, bpb = [500, 1500, 3000, 800], [0.7, 0.9, 1.1, 1.3]
    plain = [[-b * n * math.log(2), n] for n, b in zip(lengths, bpb)]
    worse = [[-(b + 0.05) * n * math.log(2), n] for n, b in zip(lengths, bpb)]  # 0.05 bpb worse on each one
    cost = bpb_difference(worse, plain, draws=500)
    # Paired: every resample of these documents costs exactly 0.05, whatever the lengths drawn.
    assert cost["mean"] == pytest.approx(0.05) and cost["low"] == pytest.approx(0.05)
    assert cost["high"] == pytest.approx(0.05)
    mixed = [[-(b + d) * n * math.log(2), n] for n, b, d in zip(lengths, bpb, [0.2, -0.1, -0.05, 0.1])]
    cost = bpb_difference(mixed, plain, draws=2000)
    # Pooled over bytes (not a mean of per-document bpb): (100 - 150 - 150 + 80) / 5800 bits per byte.
    assert cost["mean"] == pytest.approx(-120 / 5800)
    assert cost["low"] < 0 < cost["high"]
