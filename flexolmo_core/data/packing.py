"""Packed token shards and the loader that training reads.

On disk a split is one flat token stream (documents joined by EOS) in uint16/uint32 memmap shards plus a
JSON index, like OLMo-core's numpy datasets. Sample i is tokens [i*L, (i+1)*L); the sequence length is
chosen when loading, so a change of context length never forces a repack. The order is a seeded
permutation per epoch, addressed by a global sample index: resuming at index k replays exactly what an
uninterrupted run would have read, and rank r of w processes reads global indices r, r+w, r+2w, ..."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from flexolmo_core.data.config import check_domain_name
from flexolmo_core.errors import InputError, MissingInput
from flexolmo_core.io.atomic import write_json

INDEX = "index.json"
FORMAT = "flexolmo-packed-v1"


PIECE_CHARS = 1 << 16  # a document is tokenized in pieces of at most this many characters
BATCH_CHARS = 1 << 20  # and pieces are encoded in batches of about this much text: memory stays bounded


def document_pieces(text: str, limit: int = PIECE_CHARS):
    """`text` in pieces of at most `limit` characters, cut before a space that sits between two non-spaces.
    A byte-level BPE pre-tokenizer (GPT-2's, SmolLM2's, ours) always starts a new pre-token there, so the
    tokens are exactly those of the whole text; a piece with no such space is cut hard (tokens may differ
    at that one point). This is what keeps a 50 MB single-line document from costing gigabytes."""
    start = 0
    while len(text) - start > limit:
        cut = text.rfind(" ", start + 1, start + limit)
        while cut > start and (text[cut - 1].isspace() or text[cut + 1].isspace()):
            cut = text.rfind(" ", start + 1, cut)
        cut = cut if cut > start else start + limit
        yield text[start:cut]
        start = cut
    yield text[start:]


def tokenize_documents(texts, tokenizer, eos_id: int, batch_chars: int = BATCH_CHARS,
                       piece_chars: int = PIECE_CHARS) -> np.ndarray:
    """All documents as one stream, EOS after each. `tokenizer` is a `tokenizers.Tokenizer` (a transformers
    fast tokenizer's `backend_tokenizer`). The one text tokenizer of the project (packing and training)."""
    dtype = np.uint16 if tokenizer.get_vocab_size() <= 1 << 16 else np.uint32
    out, batch, size = [], [], 0

    def flush():
        for (_, last), enc in zip(batch, tokenizer.encode_batch_fast([p for p, _ in batch], add_special_tokens=False)):
            out.append(np.asarray(enc.ids, dtype=dtype))
            if last:
                out.append(np.asarray([eos_id], dtype=dtype))
        batch.clear()

    for text in texts:
        pieces = list(document_pieces(text, piece_chars))
        for n, piece in enumerate(pieces):
            batch.append((piece, n == len(pieces) - 1))
            size += len(piece)
            if size >= batch_chars:
                flush()
                size = 0
    flush()
    return np.concatenate(out) if out else np.zeros(0, dtype)


def write_packed(stream: np.ndarray, out_dir: str | Path, seq_len: int, shard_tokens: int, meta: dict) -> dict:
    """Write the stream as shards (multiples of seq_len tokens; the ragged tail is dropped) plus the index."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    usable = (len(stream) // seq_len) * seq_len
    if usable == 0:
        raise InputError(f"{out}: {len(stream)} tokens are fewer than one sequence of {seq_len}")
    shard_tokens = max(seq_len, (shard_tokens // seq_len) * seq_len)
    shards = []
    for k, start in enumerate(range(0, usable, shard_tokens)):
        chunk = np.ascontiguousarray(stream[start:min(start + shard_tokens, usable)])
        name = f"tokens-{k:05d}.bin"
        chunk.tofile(out / name)
        shards.append({"file": name, "tokens": int(len(chunk)), "sha256": hashlib.sha256(chunk.tobytes()).hexdigest()})
    index = {"format": FORMAT, "dtype": np.dtype(stream.dtype).name, "seq_len": seq_len, "num_tokens": usable,
             "num_samples": usable // seq_len, "dropped_tail_tokens": int(len(stream) - usable), "shards": shards, **meta}
    write_json(out / INDEX, index)
    return index


class PackedDataset:
    """Fixed-length samples over the memmapped shards of one domain split."""

    def __init__(self, path: str | Path, seq_len: int | None = None):
        self.path = Path(path)
        index_path = self.path / INDEX
        if not index_path.exists():
            raise MissingInput(f"{index_path}: not a packed split (run the tokenizer stage)")
        self.index = json.loads(index_path.read_text())
        if self.index.get("format") != FORMAT:
            raise InputError(f"{index_path}: unknown format {self.index.get('format')!r}")
        self.seq_len = int(seq_len or self.index["seq_len"])
        dtype = np.dtype(self.index["dtype"])
        self.shards = [np.memmap(self.path / s["file"], dtype=dtype, mode="r", shape=(s["tokens"],))
                       for s in self.index["shards"]]
        self.bounds = np.cumsum([0] + [s["tokens"] for s in self.index["shards"]])
        self.num_tokens = int(self.bounds[-1])
        if self.num_tokens < self.seq_len:
            raise InputError(f"{self.path}: {self.num_tokens} tokens are fewer than one sample of {self.seq_len}")

    def __len__(self) -> int:
        return self.num_tokens // self.seq_len

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range [0, {len(self)})")
        start, end = i * self.seq_len, (i + 1) * self.seq_len
        k = int(np.searchsorted(self.bounds, start, side="right")) - 1
        parts = []
        while start < end:  # a sample may straddle two shards when seq_len is overridden
            take = min(end, int(self.bounds[k + 1])) - start
            offset = start - int(self.bounds[k])
            parts.append(self.shards[k][offset:offset + take])
            start += take
            k += 1
        return np.concatenate(parts).astype(np.int64) if len(parts) > 1 else parts[0].astype(np.int64)

    def epoch_order(self, seed: int, epoch: int) -> np.ndarray:
        return np.random.Generator(np.random.PCG64([seed, epoch])).permutation(len(self))

    def sample_at(self, global_index: int, seed: int, shuffle: bool = True) -> int:
        """The sample index read at a global step position (epochs wrap around with a fresh permutation)."""
        epoch, pos = divmod(global_index, len(self))
        return int(self.epoch_order(seed, epoch)[pos]) if shuffle else pos

    def iterate(self, seed: int = 0, start: int = 0, rank: int = 0, world_size: int = 1, shuffle: bool = True,
                num_samples: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """(global_index, tokens) for global indices start+rank, start+rank+world_size, ... ."""
        if not 0 <= rank < world_size:
            raise InputError(f"rank {rank} is not in [0, {world_size})")
        n, g, orders = len(self), start + rank, {}
        stop = None if num_samples is None else start + num_samples
        while stop is None or g < stop:
            epoch, pos = divmod(g, n)
            if epoch not in orders:  # one permutation per epoch, computed once
                orders = {epoch: self.epoch_order(seed, epoch) if shuffle else np.arange(n)}
            yield g, self[int(orders[epoch][pos])]
            g += world_size

    def batches(self, batch_size: int, seed: int = 0, start: int = 0, rank: int = 0, world_size: int = 1,
                shuffle: bool = True, num_batches: int | None = None):
        """torch LongTensor batches [batch_size, seq_len]; `start` counts global samples already consumed.

        Per step, the world reads batch_size * world_size consecutive global samples."""
        samples = None if num_batches is None else num_batches * batch_size * world_size
        rows = []
        for _, tokens in self.iterate(seed, start, rank, world_size, shuffle, samples):
            rows.append(tokens)
            if len(rows) == batch_size:
                yield torch.from_numpy(np.stack(rows))
                rows = []


def packed_path(tokenizer_dir: str | Path, domain: str, split: str) -> Path:
    """Where the tokenizer stage puts one domain split's packed shards."""
    return Path(tokenizer_dir) / domain / split


def open_packed(tokenizer_dir: str | Path, domain: str, split: str, seq_len: int | None = None) -> PackedDataset:
    check_domain_name(domain)
    return PackedDataset(packed_path(tokenizer_dir, domain, split), seq_len)
