"""Packed shards and the loader: exact resume at any sample index, disjoint covering distributed slices."""
from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from flexolmo_core.data.packing import PackedDataset, tokenize_documents, write_packed
from flexolmo_core.data.tokenizer import load_tokenizer, tokenizer_sha256, train_tokenizer


def stdlib_docs() -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return [(root / n).read_text(encoding="utf-8") for n in ("textwrap.py", "shlex.py", "fnmatch.py", "heapq.py", "queue.py")]


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    from tokenizers import Tokenizer

    root = tmp_path_factory.mktemp("packed")
    docs = stdlib_docs()
    train_tokenizer(docs, 600, root / "tok")
    tok = Tokenizer.from_file(str(root / "tok" / "tokenizer.json"))
    eos = tok.token_to_id("<|endoftext|>")
    stream = tokenize_documents(docs, tok, eos)
    # 3 shards of 4 samples of 64 tokens, so overridden sequence lengths straddle shard boundaries
    write_packed(stream, root / "split", seq_len=64, shard_tokens=256, meta={"eos_token_id": eos})
    return root, docs, tok, eos, stream


def test_stream_is_documents_joined_by_eos(packed):
    _, docs, tok, eos, stream = packed
    assert stream.dtype == np.uint16
    ends = np.flatnonzero(stream == eos)
    assert len(ends) == len(docs)
    first = stream[: ends[0]].tolist()
    assert first == tok.encode(docs[0], add_special_tokens=False).ids
    assert tok.decode(first) == docs[0]  # byte-level BPE round-trips exactly


def test_samples_are_consecutive_windows_across_shards(packed):
    root, _, _, _, stream = packed
    ds = PackedDataset(root / "split")
    assert len(ds.index["shards"]) > 1
    for seq_len in (64, 100):  # 100 does not divide the shard size: samples straddle shards
        ds = PackedDataset(root / "split", seq_len=seq_len)
        assert len(ds) == ds.num_tokens // seq_len
        for i in range(len(ds)):
            assert ds[i].tolist() == stream[i * seq_len:(i + 1) * seq_len].tolist()
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_resume_at_any_index_replays_the_same_sequences(packed):
    ds = PackedDataset(packed[0] / "split")
    total = 3 * len(ds) + 5  # crosses epoch boundaries
    full = [(g, x.tolist()) for g, x in ds.iterate(seed=7, num_samples=total)]
    assert [g for g, _ in full] == list(range(total))
    for start in (1, len(ds) - 1, len(ds) + 3, 2 * len(ds)):
        resumed = [(g, x.tolist()) for g, x in ds.iterate(seed=7, start=start, num_samples=total - start)]
        assert resumed == full[start:]
    # each epoch is a permutation: every sample exactly once
    first_epoch = sorted(ds.sample_at(g, seed=7) for g in range(len(ds)))
    assert first_epoch == list(range(len(ds)))
    assert [ds.sample_at(g, 7) for g in range(len(ds))] != [ds.sample_at(g, 8) for g in range(len(ds))]


def test_distributed_slices_are_disjoint_and_cover(packed):
    ds = PackedDataset(packed[0] / "split")
    world, n = 3, len(ds)
    seen = {}
    for rank in range(world):
        for g, _ in ds.iterate(seed=1, rank=rank, world_size=world, num_samples=n):
            assert g not in seen
            seen[g] = rank
    assert sorted(seen) == list(range(n))
    assert sorted(ds.sample_at(g, 1) for g in seen) == list(range(n))
    batches = list(ds.batches(batch_size=2, seed=1, rank=1, world_size=world, num_batches=1))
    assert len(batches) == 1 and tuple(batches[0].shape) == (2, ds.seq_len)
    with pytest.raises(ValueError, match="rank"):
        next(ds.iterate(rank=3, world_size=3))


def test_tokenizer_is_deterministic_and_loads_with_autotokenizer(packed, tmp_path):
    root, docs, _, _, _ = packed
    train_tokenizer(docs, 600, tmp_path / "again")
    assert tokenizer_sha256(tmp_path / "again") == tokenizer_sha256(root / "tok")
    hf = load_tokenizer(root / "tok")
    assert hf.eos_token == "<|endoftext|>" and hf.pad_token == "<|pad|>" and len(hf) == 600
    assert hf.decode(hf(docs[1])["input_ids"]) == docs[1]


def test_long_documents_are_tokenized_in_pieces_with_the_same_tokens(smoke_tokenizer):
    """A document is cut before a space between non-spaces, where byte-level BPE starts a new pre-token, so
    the pieces' tokens are the whole text's; pieces stay under the limit (a 50 MB line costs MBs, not GBs)."""
    from transformers import AutoTokenizer

    from flexolmo_core.data.packing import document_pieces, tokenize_documents

    backend = AutoTokenizer.from_pretrained(smoke_tokenizer).backend_tokenizer
    text = " ".join(f"word{i % 97}  and\tmore,{i}" for i in range(4000))
    pieces = list(document_pieces(text, limit=500))
    assert "".join(pieces) == text and len(pieces) > 100 and max(map(len, pieces)) <= 500
    whole = backend.encode(text, add_special_tokens=False).ids
    stream = tokenize_documents([text, "tail"], backend, eos_id=0)
    pieced = tokenize_documents([text, "tail"], backend, eos_id=0, batch_chars=2000, piece_chars=500)
    assert pieced.tolist() == stream.tolist() == whole + [0] + backend.encode("tail").ids + [0]
    assert list(document_pieces("x" * 1200, limit=500)) == ["x" * 500, "x" * 500, "x" * 200]  # no space: cut hard


def test_the_tokenizer_follows_the_model_preset_unless_told_otherwise(tmp_path):
    """tokenizer.vocab_size null = the preset's (so `-S preset=smoke` runs as it is); a number wins; no preset
    and no number is refused by name."""
    import yaml

    from flexolmo_core.data.config import TokenizerConfig, tokenizer_vocab
    from flexolmo_core.io.params import load_section

    shipped = load_section(TokenizerConfig, "tokenizer", "params.yaml")
    assert shipped.vocab_size is None
    assert tokenizer_vocab(shipped, "smoke") == 1024 and tokenizer_vocab(shipped, "tiny") == 8192
    assert tokenizer_vocab(TokenizerConfig(vocab_size=600), "smoke") == 600
    with pytest.raises(ValueError, match="tokenizer.vocab_size is null"):
        tokenizer_vocab(shipped, None)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"preset": "smoke", "tokenizer": {}}))
    from flexolmo_core.cli.main import main

    data = tmp_path / "docs"  # enough text for 8192 merges: the preset's 1024 is what stops it
    data.mkdir()
    for i, path in enumerate(sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:40]):
        (data / f"{i}.txt").write_text(path.read_text(encoding="utf-8"))
    assert main(["tokenizer", "train", "--data", str(data), "--out", str(tmp_path / "tok"), "--params", str(params)]) == 0
    assert len(json.loads((tmp_path / "tok" / "tokenizer.json").read_text())["model"]["vocab"]) == 1024
