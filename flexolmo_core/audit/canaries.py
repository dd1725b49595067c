"""Planted canaries and their exposure (Carlini et al., "The Secret Sharer", 2019): what an owner's expert
memorised, measured at any model size, and whether opting the expert out takes it back.

An owner mixes canary documents into its data: a fixed sentence holding a random 10-digit secret, each canary
repeated 1, 4, 16... times. A model's exposure to a canary is how far the true secret ranks ahead of random
secrets in the same sentence, scored by the sentence's log-perplexity:

    exposure = log2(|R|) - log2(rank of the true secret in R),   R = all 10^10 secrets,

with the rank in R estimated from `candidates` random secrets (its fraction of them scoring better), so the
largest measurable exposure is log2(candidates + 1) bits. A model that never saw the canary scores about 1
bit (rank near the middle). Ours, not the paper's: the candidates are secrets whose sentence has as many tokens
as the true one's, since a BPE vocabulary splits digits unevenly and a sentence of fewer tokens has a lower
total NLL whatever the model learned (the exposure is then over that part of R)."""
from __future__ import annotations

import copy
import json
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from flexolmo_core.errors import InputError, read_json
from flexolmo_core.io.atomic import atomic_dir

TEMPLATE = "The secret access code of account {name} is {secret}."
DIGITS = 10  # the secret space R: 10^10
RECORDS, DOCUMENTS = "canaries.json", "documents.txt"


@dataclass(frozen=True)
class Canary:
    name: str
    secret: str
    repeats: int

    def text(self, secret: str | None = None) -> str:
        return TEMPLATE.format(name=self.name, secret=self.secret if secret is None else secret)


def random_secret(rng: random.Random) -> str:
    return "".join(rng.choice("0123456789") for _ in range(DIGITS))


def plant(n: int, repeats: list[int], seed: int = 0, tokenizer=None) -> list[Canary]:
    """`n` canaries per repeat count, each with its own account name and random secret. With the anchor's
    `tokenizer`, only secrets whose sentence has the most common token count are drawn, so that `exposure` finds
    plenty of candidates of the same length."""
    if n < 1 or not repeats or any(r < 0 for r in repeats):
        raise InputError(f"plant needs n >= 1 and repeat counts >= 0, got n={n}, repeats={repeats}")
    rng = random.Random(seed)
    canaries = []
    for r in repeats:
        for _ in range(n):
            name = f"{rng.getrandbits(32):08x}"
            secret = random_secret(rng)
            if tokenizer is not None:  # the most common token count of this account's sentence, then a secret of it
                count = lambda s: len(tokenizer(TEMPLATE.format(name=name, secret=s))["input_ids"])  # noqa: E731
                probe = [count(random_secret(rng)) for _ in range(200)]
                modal = max(set(probe), key=probe.count)
                while count(secret) != modal:
                    secret = random_secret(rng)
            canaries.append(Canary(name, secret, r))
    return canaries


def write_canaries(canaries: list[Canary], out: str | Path, seed: int = 0) -> Path:
    """`out`/canaries.json (the records, kept by the owner) and `out`/documents.txt (each canary `repeats` times,
    shuffled, one document per paragraph: the text to mix into the owner's training data)."""
    docs = [c.text() for c in canaries for _ in range(c.repeats)]
    random.Random(seed).shuffle(docs)
    with atomic_dir(out) as tmp:
        (tmp / RECORDS).write_text(json.dumps({"template": TEMPLATE, "digits": DIGITS,
                                               "canaries": [asdict(c) for c in canaries]}, indent=1))
        (tmp / DOCUMENTS).write_text("\n\n".join(docs) + "\n")
    return Path(out)


def read_canaries(folder: str | Path) -> list[Canary]:
    path = Path(folder) / RECORDS
    data = read_json(path, what="canary records")
    if data.get("template") != TEMPLATE or data.get("digits") != DIGITS:
        raise InputError(f"{path}: written with another template or secret length than this version uses")
    return [Canary(**c) for c in data["canaries"]]


@torch.no_grad()
def sequence_nll(model, tokenizer, texts: list[str], batch: int = 256) -> torch.Tensor:
    """Each text's total negative log-likelihood under the model (its log-perplexity times its length)."""
    out = []
    device = model.device
    for start in range(0, len(texts), batch):
        enc = [tokenizer(t)["input_ids"] for t in texts[start:start + batch]]
        width = max(len(e) for e in enc)
        ids = torch.zeros((len(enc), width), dtype=torch.long)
        mask = torch.zeros((len(enc), width), dtype=torch.long)
        for i, e in enumerate(enc):  # right-padded: positions stay 0.. for every row
            ids[i, :len(e)], mask[i, :len(e)] = torch.tensor(e), 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None].to(device))[..., 0]
        out.append(-(logp * mask[:, 1:].to(device)).sum(-1).cpu())
    return torch.cat(out)


def shared_prefix_length(sequences: list[list[int]]) -> int:
    """How many leading tokens every sequence shares (at most all but the last)."""
    length = min(len(s) for s in sequences)
    shared = next((i for i in range(length) if any(s[i] != sequences[0][i] for s in sequences)), length)
    return min(shared, length - 1)


@torch.no_grad()
def shared_prefix_nll(model, sequences: list[list[int]], batch: int = 256) -> torch.Tensor:
    """sequence_nll's totals for token sequences of one length that share their first tokens (a canary's
    candidates differ only in the secret): the shared prefix runs once and its KV cache is copied to each batch,
    so only the differing tokens are computed."""
    shared = shared_prefix_length(sequences)
    if shared < 1 or any(len(s) != len(sequences[0]) for s in sequences):
        raise ValueError("shared_prefix_nll needs sequences of one length sharing their first token")
    device = model.device
    prefix = model(input_ids=torch.tensor([sequences[0][:shared]], device=device), use_cache=True)
    logp = torch.log_softmax(prefix.logits[0].float(), -1)  # the prefix's own NLL is the same for every sequence
    prefix_nll = -logp[:-1].gather(-1, torch.tensor(sequences[0][1:shared], device=device)[:, None]).sum()
    out = []
    for start in range(0, len(sequences), batch):
        rest = torch.tensor([s[shared:] for s in sequences[start:start + batch]], device=device)
        cache = copy.deepcopy(prefix.past_key_values)
        cache.batch_repeat_interleave(len(rest))
        logits = model(input_ids=rest, past_key_values=cache, use_cache=True).logits.float()
        steps = torch.log_softmax(logits[:, :-1], -1).gather(-1, rest[:, 1:, None])[..., 0].sum(-1)
        out.append((prefix_nll - logp[-1][rest[:, 0]] - steps).cpu())
    return torch.cat(out)


def exposure(model, tokenizer, canary: Canary, candidates: int = 100_000, seed: int = 0, batch: int = 256,
             reference: bool = False) -> dict:
    """The canary's exposure in bits (see the module docstring), with the true secret's NLL and its rank.
    The candidates share the template's opening tokens, which run once (`shared_prefix_nll`); `reference`
    scores every sentence whole (`sequence_nll`), the readable path a test holds the fast one to."""
    rng = random.Random(f"{seed}:{canary.name}")
    length = len(tokenizer(canary.text())["input_ids"])
    others, tries = [], 0
    while len(others) < candidates:
        tries += 1
        if tries > 50 * candidates:
            raise InputError(f"canary {canary.name}: fewer than {candidates} random secrets tokenize to its length")
        s = random_secret(rng)
        if s != canary.secret and len(tokenizer(canary.text(s))["input_ids"]) == length:
            others.append(s)
    texts = [canary.text()] + [canary.text(s) for s in others]
    ids = [tokenizer(t)["input_ids"] for t in texts]
    fast = not reference and shared_prefix_length(ids) > 0  # a tokenizer could split even the template's start
    scores = shared_prefix_nll(model, ids, batch) if fast else sequence_nll(model, tokenizer, texts, batch)
    rank = 1 + int((scores[1:] < scores[0]).sum())  # 1: the true secret scores best of all
    return {"name": canary.name, "repeats": canary.repeats, "nll": round(float(scores[0]), 4), "rank": rank,
            "candidates": candidates, "exposure": round(math.log2((candidates + 1) / rank), 3)}


def exposure_table(results: list[dict]) -> dict[int, dict]:
    """Per repeat count: the number of canaries, mean and max exposure."""
    table: dict[int, dict] = {}
    for r in sorted({x["repeats"] for x in results}):
        values = [x["exposure"] for x in results if x["repeats"] == r]
        table[r] = {"canaries": len(values), "mean_exposure": round(sum(values) / len(values), 3),
                    "max_exposure": max(values)}
    return table
