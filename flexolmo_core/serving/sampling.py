"""How each request chooses its next token: greedy, or sampled with its own seeded generator after the OpenAI
penalties, temperature, top-k and top-p; where its text stops; and the log-probabilities it reports.

Every function works on one sequence's logits from the model as served, that is with the request's masked
experts already at -inf in every router, so an opted-out expert never contributes to a token or a logprob.
Sampling runs on a CPU copy of the row with a CPU generator, so a seed gives the same tokens on any device and
whatever else shares the batch."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Sampling:
    """One request's decoding settings (the OpenAI fields of the same names)."""

    temperature: float = 0.0  # 0: greedy (argmax)
    top_p: float = 1.0  # nucleus: the smallest set of tokens whose probability reaches top_p
    top_k: int = 0  # only the k most likely tokens (0: all)
    seed: int | None = None  # the same seed gives the same tokens, alone or in any batch
    presence_penalty: float = 0.0  # subtracted from the logit of every token already generated
    frequency_penalty: float = 0.0  # subtracted once per time a token was already generated
    stop: tuple[str, ...] = ()  # the text ends before the first of these
    logprobs: int | None = None  # None: none; k: each token's logprob and the k most likely alternatives

    def generator(self, index: int = 0) -> torch.Generator | None:
        """This request's generator (choice `index` of n gets seed + index); None for greedy decoding."""
        if self.temperature == 0:
            return None
        seed = self.seed + index if self.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
        return torch.Generator().manual_seed(seed)


def penalised(logits: torch.Tensor, sampling: Sampling, generated: list[int]) -> torch.Tensor:
    """The logits after the presence and frequency penalties (OpenAI's definition) for what was generated."""
    if not generated or not (sampling.presence_penalty or sampling.frequency_penalty):
        return logits
    counts = torch.bincount(torch.tensor(generated), minlength=logits.shape[-1]).to(logits.dtype)
    return logits - sampling.frequency_penalty * counts - sampling.presence_penalty * (counts > 0).to(logits.dtype)


def choose(logits: torch.Tensor, sampling: Sampling, generated: list[int], generator: torch.Generator | None) -> int:
    """The next token from one row of logits [vocab]."""
    logits = penalised(logits.float().cpu(), sampling, generated)
    if sampling.temperature == 0:
        return int(logits.argmax())
    logits = logits / sampling.temperature
    if 0 < sampling.top_k < logits.shape[-1]:
        logits = logits.masked_fill(logits < logits.topk(sampling.top_k).values[-1], float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if sampling.top_p < 1:
        ordered, order = probs.sort(descending=True)
        before = ordered.cumsum(-1) - ordered  # probability of the tokens ranked above each one
        probs = torch.zeros_like(probs).scatter(0, order, ordered.masked_fill(before >= sampling.top_p, 0))
    return int(torch.multinomial(probs, 1, generator=generator))


def logprobs_of(logits: torch.Tensor, token: int, k: int) -> tuple[float, list[tuple[int, float]]]:
    """The model's log-probability of `token` and its k most likely tokens with theirs: log-softmax of the
    logits as served, before penalties, temperature, top-k and top-p (what the model says, not the sampler)."""
    logp = torch.log_softmax(logits.float().cpu(), dim=-1)
    top = logp.topk(k) if k else None
    return float(logp[token]), ([] if top is None else list(zip(top.indices.tolist(), top.values.tolist())))


def stop_at(text: str, stops: tuple[str, ...]) -> int | None:
    """Where the text ends: the start of the earliest stop string in it, or None."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None
