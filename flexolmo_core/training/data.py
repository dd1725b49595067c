"""Token windows for training: anything with `__len__` and `__getitem__(i) -> [seq_len + 1] token ids`.

Sources: the tokenizer stage's packed shards (flexolmo_core.data.packing.PackedDataset, opened with
seq_len + 1 so every window carries its next-token targets), or text files (.txt / .jsonl / folders)
tokenized here. The order is a function of (seed, global sample index) only, as in the packed loader, so a
resumed run reads exactly what an uninterrupted one would have, and ranks read disjoint slices."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from flexolmo_core.data.packing import PackedDataset, tokenize_documents
from flexolmo_core.data.readers import read_texts
from flexolmo_core.errors import InputError


class TokenWindows:
    """Non-overlapping [seq_len + 1] windows over one token stream (documents joined by EOS)."""

    def __init__(self, tokens, seq_len: int):
        self.tokens = torch.as_tensor(np.asarray(tokens), dtype=torch.long)
        self.window = seq_len + 1
        if len(self.tokens) < self.window:
            raise InputError(f"only {len(self.tokens)} tokens; need at least seq_len + 1 = {self.window}")

    def __len__(self) -> int:
        return len(self.tokens) // self.window

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.tokens[i * self.window:(i + 1) * self.window]


def is_packed(path: str | os.PathLike) -> bool:
    return (Path(path) / "index.json").exists()


def open_windows(sources, seq_len: int, tokenizer_dir: str | os.PathLike | None = None):
    """Windows from one packed split directory, or from text files/folders tokenized with `tokenizer_dir`."""
    sources = [Path(s) for s in ([sources] if isinstance(sources, (str, os.PathLike)) else sources)]
    if len(sources) == 1 and is_packed(sources[0]):
        return PackedDataset(sources[0], seq_len=seq_len + 1)
    if tokenizer_dir is None:
        raise InputError("text data needs a tokenizer directory (the anchor's)")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    return TokenWindows(tokenize(read_texts(sources), tokenizer), seq_len)


def tokenize(texts: list[str], tokenizer) -> np.ndarray:
    """Text files as one token stream (EOS after each document), through the packer's tokenizer."""
    return tokenize_documents(texts, tokenizer.backend_tokenizer, tokenizer.eos_token_id).astype(np.int64)


class Mixture:
    """Several window sets read as one (router tuning's proxy data, the unrestricted MoE's joint data)."""

    def __init__(self, parts: list):
        self.labels = [k for k, p in enumerate(parts) if len(p)]  # a window's label: its part's index in `parts`
        self.parts = [parts[k] for k in self.labels]
        self.bounds = np.cumsum([0] + [len(p) for p in self.parts])

    def __len__(self) -> int:
        return int(self.bounds[-1])

    def __getitem__(self, i: int):
        k = self._part(i)
        return self.parts[k][i - int(self.bounds[k])]

    def label_of(self, i: int) -> int:
        """Which of the given parts window i comes from (router tuning: the proxy set, so the expert)."""
        return self.labels[self._part(i)]

    def _part(self, i: int) -> int:
        return int(np.searchsorted(self.bounds, i, side="right")) - 1


class Order:
    """Global sample index -> window index: a fresh seeded permutation per epoch (same scheme as the
    packed loader), cached for the current epoch."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self._epoch, self._perm = n, seed, None, None

    def __call__(self, global_index: int) -> int:
        epoch, pos = divmod(global_index, self.n)
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, np.random.Generator(np.random.PCG64([self.seed, epoch])).permutation(self.n)
        return int(self._perm[pos])


def batch(windows, order: Order, start: int, size: int) -> torch.Tensor:
    """Rows for global sample indices [start, start + size) as a LongTensor [size, seq_len + 1]."""
    return torch.stack([torch.as_tensor(np.asarray(windows[order(g)]), dtype=torch.long)
                        for g in range(start, start + size)])


def batch_labels(windows, order: Order, start: int, size: int) -> torch.Tensor:
    """The label of each row `batch` returns for the same arguments (windows that know their labels only)."""
    return torch.tensor([windows.label_of(order(g)) for g in range(start, start + size)], dtype=torch.long)


def fixed_batches(windows, size: int, count: int) -> list[torch.Tensor]:
    """The first `count` batches in file order (validation: the same tokens for every model)."""
    n = min(len(windows), size * count)
    rows = [torch.as_tensor(np.asarray(windows[i]), dtype=torch.long) for i in range(n)]
    return [torch.stack(rows[i:i + size]) for i in range(0, n, size)]
