"""The `prepare` stage: read every domain, clean, deduplicate paragraphs across domains, decontaminate against
the evaluation data, fill each domain's token budget, split by document, store parquet per split + data card.

Determinism without a global RNG: a document's place in the order and its split come from a keyed hash of
(seed, domain, document id), so the same inputs give the same bytes on any machine and adding a document
never reshuffles the others."""
from __future__ import annotations

import hashlib
import math
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from tokenizers import Tokenizer

from flexolmo_core.data.builtin_sources import BUILTINS, package_dir
from flexolmo_core.data.card import split_sha256, write_cards
from flexolmo_core.data.config import PrepareConfig, SourceSpec, check_domain_name
from flexolmo_core.data.decontam import EvalIndex, olmo_eval_index
from flexolmo_core.data.readers import Document, read_source, source_label
from flexolmo_core.data.text import chunk_document, paragraphs
from flexolmo_core.errors import InputError, MissingInput
from flexolmo_core.io.atomic import atomic_dir
from flexolmo_core.io.params import from_dict

SPLITS = ("train", "validation", "test")
BATCH = 256  # candidate documents filtered and token-counted together


def _key(*parts) -> bytes:
    return hashlib.blake2b(":".join(map(str, parts)).encode("utf-8"), digest_size=16).digest()


def domain_sources(config: PrepareConfig, domain: str) -> list[SourceSpec]:
    raw = config.sources.get(domain)
    if raw is None:
        raise InputError(f"domain {domain!r} has no sources: add a list under prepare.sources.{domain} "
                         f"(kind builtin {sorted(BUILTINS)}, or jsonl / parquet / txt / hf)")
    if not isinstance(raw, list) or not raw:
        raise InputError(f"prepare.sources.{domain}: expected a non-empty list of sources, got {raw!r}")
    specs = []
    for i, item in enumerate(raw):
        spec = from_dict(SourceSpec, item, f"prepare.sources.{domain}[{i}]")
        if spec.kind == "builtin" and spec.name in BUILTINS:
            builtin = BUILTINS[spec.name]
            spec = replace(spec, license=builtin.license if spec.license == "unknown" else spec.license,
                           note=spec.note or builtin.note)
        specs.append(spec)
    return specs


def count_tokenizer(name: str):
    if name == "olmo":
        path = package_dir("olmo_eval", "ai2-olmo-eval") / "tokenizers" / "allenai_gpt-neox-olmo-dolma-v1_5.json"
    else:
        path = Path(name)
    if not path.exists():
        raise MissingInput(f"count tokenizer {path} not found")
    return Tokenizer.from_file(str(path))


@dataclass
class DomainStats:
    paragraphs_removed: int = 0  # exact paragraphs already present in an earlier domain
    documents_emptied_by_dedup: int = 0
    documents_too_short: int = 0
    duplicate_documents: int = 0  # exact duplicates inside the domain
    decontaminated: int = 0
    decontaminated_by_task: dict = field(default_factory=dict)
    candidates_seen: int = 0


@dataclass
class DomainResult:
    domain: str
    splits: dict  # split -> list[Document]
    ref_tokens: dict  # document id -> tokens under the count tokenizer
    stats: DomainStats
    sources: list  # (SourceSpec, documents read, characters read)
    budget: int


def select_domain(domain, docs, priorities, config, budget, seen_paragraphs, eval_index, tokenizer) -> DomainResult:
    """Take documents in keyed-hash order until the token budget is met, filtering as we go."""
    stats = DomainStats()
    parts = []
    for doc in docs:
        pieces = chunk_document(doc.text, config.max_doc_chars)
        for k, piece in enumerate(pieces):
            parts.append(Document(f"{doc.id}#{k}" if len(pieces) > 1 else doc.id, piece, doc.source))
    parts.sort(key=lambda d: (priorities[d.source], _key(config.seed, domain, d.id)))
    min_para = config.dedup_min_paragraph_chars
    chosen, ref_tokens, texts_seen, total = [], {}, set(), 0
    for start in range(0, len(parts), BATCH):
        batch = []
        for doc in parts[start:start + BATCH]:
            stats.candidates_seen += 1
            kept = [p for p in paragraphs(doc.text) if len(p) < min_para or p not in seen_paragraphs]
            removed = len(paragraphs(doc.text)) - len(kept)
            text = "\n\n".join(kept)
            if len(text) < config.min_doc_chars:
                if removed:
                    stats.documents_emptied_by_dedup += 1
                else:
                    stats.documents_too_short += 1
                continue
            stats.paragraphs_removed += removed
            if text in texts_seen:
                stats.duplicate_documents += 1
                continue
            texts_seen.add(text)
            batch.append(Document(doc.id, text, doc.source))
        hits = eval_index.first_hit([d.text for d in batch]) if eval_index else [None] * len(batch)
        clean = []
        for doc, task in zip(batch, hits):
            if task is None:
                clean.append(doc)
            else:
                stats.decontaminated += 1
                stats.decontaminated_by_task[task] = stats.decontaminated_by_task.get(task, 0) + 1
        for doc, enc in zip(clean, tokenizer.encode_batch([d.text for d in clean], add_special_tokens=False)):
            chosen.append(doc)
            ref_tokens[doc.id] = len(enc.ids)
            total += len(enc.ids)
            if total >= budget:
                break
        if total >= budget:
            break
    if len(chosen) < len(SPLITS):
        raise InputError(f"domain {domain!r} has {len(chosen)} usable documents after cleaning, dedup and "
                         f"decontamination; need at least {len(SPLITS)} (one per split)")
    for doc in chosen:  # later domains lose these paragraphs; this domain keeps its own repeats
        seen_paragraphs.update(p for p in paragraphs(doc.text) if len(p) >= min_para)
    return DomainResult(domain, assign_splits(chosen, domain, config), ref_tokens, stats, [], budget)


def assign_splits(docs: list[Document], domain: str, config: PrepareConfig) -> dict:
    by_split_key = sorted(docs, key=lambda d: _key(config.seed, domain, "split", d.id))
    n = len(docs)
    n_val = max(1, math.floor(config.validation_fraction * n))
    n_test = max(1, math.floor(config.test_fraction * n))
    if n_val + n_test >= n:
        raise InputError(f"domain {domain!r}: {n} documents are too few for validation/test fractions "
                         f"{config.validation_fraction}/{config.test_fraction}")
    order = {d.id: i for i, d in enumerate(docs)}  # keep the keyed-hash order inside each split
    val, test, train = by_split_key[:n_val], by_split_key[n_val:n_val + n_test], by_split_key[n_val + n_test:]
    return {name: sorted(part, key=lambda d: order[d.id]) for name, part in
            (("train", train), ("validation", val), ("test", test))}


def check_config(config: PrepareConfig, domains: list[str]) -> None:
    if not domains:
        raise InputError("no domains: params.yaml needs a top-level `domains:` list")
    for d in domains:
        check_domain_name(d)
    if len(set(domains)) != len(domains):
        raise InputError(f"domains listed twice: {sorted(d for d in set(domains) if domains.count(d) > 1)}")
    for d in config.sources:  # sources may cover more domains than a run uses (params.yaml's recipe)
        check_domain_name(d)
    if not (0 < config.validation_fraction < 0.5 and 0 < config.test_fraction < 0.5):
        raise InputError("prepare.validation_fraction and test_fraction must be in (0, 0.5)")
    config.tier_spec()


def build_flexmix(config: PrepareConfig, domains: list[str], out_dir: str | Path,
                  eval_index: EvalIndex | None = None, progress=None) -> dict:
    """Build the corpus into `out_dir` (replaced atomically) and return the summary card.

    Everything is read, filtered and checked in memory first: a bad input raises before a byte is written."""
    check_config(config, domains)
    budget = config.tier_spec().tokens_per_domain
    specs = {d: domain_sources(config, d) for d in domains}
    say, t0 = progress or (lambda message: None), time.perf_counter()
    read = {}
    for k, domain in enumerate(domains, 1):
        say(f"prepare: [{k}/{len(domains)}] reading {domain} ({time.perf_counter() - t0:.1f} s so far)")
        read[domain] = []
        for spec in specs[domain]:
            docs = read_source(spec)
            if not any(d.text.strip() for d in docs):
                raise InputError(f"domain {domain!r}: source {source_label(spec)} has no text")
            read[domain].append((spec, docs))
    if eval_index is None and config.decontam_ngram > 0:
        eval_index = olmo_eval_index(config.decontam_ngram, tuple(config.decontam_exclude_tasks))
    tokenizer = count_tokenizer(config.count_tokenizer)

    results, seen_paragraphs = [], set()
    for k, domain in enumerate(domains, 1):
        say(f"prepare: [{k}/{len(domains)}] selecting {domain}: dedup, filters, decontamination "
            f"({time.perf_counter() - t0:.1f} s so far)")
        priorities = {source_label(s): s.priority for s, _ in read[domain]}
        docs = [d for _, ds in read[domain] for d in ds]
        result = select_domain(domain, docs, priorities, config, budget, seen_paragraphs, eval_index, tokenizer)
        result.sources = [(s, len(ds), sum(len(d.text) for d in ds)) for s, ds in read[domain]]
        results.append(result)

    with atomic_dir(out_dir) as tmp:
        for r in results:
            for split, docs in r.splits.items():
                write_split(tmp / r.domain / split, docs, r.ref_tokens)
        card = write_cards(tmp, results, config, eval_index, python=sys.version.split()[0])
    return card


def write_split(path: Path, docs: list[Document], ref_tokens: dict) -> None:
    """One `datasets` folder per domain split (save_to_disk; the evaluator reads `<domain>/test`).

    The fingerprint is the content hash, so the saved bytes are identical run to run (DVC sees no change)."""
    import datasets
    import pyarrow as pa
    from datasets.table import InMemoryTable

    table = pa.table({
        "id": pa.array([d.id for d in docs], pa.string()),
        "text": pa.array([d.text for d in docs], pa.string()),
        "source": pa.array([d.source for d in docs], pa.string()),
        "ref_tokens": pa.array([ref_tokens[d.id] for d in docs], pa.int32()),
    })
    dataset = datasets.Dataset(InMemoryTable(table), fingerprint=split_sha256(docs)[:16])
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # one bar per split drowns the stage log
    try:
        dataset.save_to_disk(str(path), num_shards=1)
    finally:
        if bars:
            datasets.enable_progress_bars()


def load_split(prepare_dir: str | Path, domain: str, split: str):
    """One domain split as a `datasets.Dataset` (columns id, text, source, ref_tokens)."""
    import datasets

    check_domain_name(domain)
    if split not in SPLITS:
        raise InputError(f"split {split!r} is not one of {SPLITS}")
    path = Path(prepare_dir) / domain / split
    if not (path / "state.json").exists():
        raise MissingInput(f"{path}: no such split (run the prepare stage)")
    return datasets.load_from_disk(str(path))
