"""Batched decoding over one merged model where every sequence has its own set of experts and its own
sampling settings (greedy, or sampled with its own seeded generator: `serving/sampling.py`).

A request's expert choice is a row of router logit offsets (0 allowed, -inf not), added to every token of
that sequence in every layer (`FlexRouter.row_offset`). So one forward pass serves a batch that mixes
policies, and each sequence's softmax over its allowed experts is exactly that of a model merged with only
those experts (METHOD.md's opt-out). Sequences are left-padded; a batch runs until its longest request ends
(no continuous batching: new requests wait for the next batch, which starts within `batch_wait_ms`)."""
from __future__ import annotations

import collections
import functools
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from flexolmo_core.inference.model import LoadedModel, load_flexolmo
from flexolmo_core.inference.moe import routers
from flexolmo_core.serving.sampling import Sampling, choose, logprobs_of, stop_at


@dataclass
class ModelHandle:
    """One loaded release: every expert present, none masked (masks come per request)."""
    loaded: LoadedModel
    name: str
    path: str
    release: dict | None = None

    @property
    def domains(self) -> list[str]:
        return [e["domain"] for e in self.loaded.manifest["experts"]]

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    def eos_ids(self) -> set[int]:
        ids = self.loaded.model.generation_config.eos_token_id
        ids = ids if isinstance(ids, (list, tuple)) else [ids]
        return {i for i in [*ids, self.tokenizer.eos_token_id] if i is not None}

    def offsets(self, allowed: list[str]) -> torch.Tensor:
        return torch.tensor([0.0 if d in allowed else float("-inf") for d in self.domains])

    @functools.cached_property
    def max_token_chars(self) -> int:
        """The most characters one token stands for (special tokens' text included; UTF-8 bytes, which are at least
        the characters): a prompt of C characters needs at least C / this many tokens, so a prompt too long for
        `max_prompt_tokens` is refused by its length alone, without tokenizing it."""
        tok = self.tokenizer
        pieces = tok.batch_decode([[i] for i in range(len(tok))], skip_special_tokens=False)
        return max(1, *(len(p.encode("utf-8")) for p in pieces), *(len(t) for t in tok.all_special_tokens))


def load_handle(model_dir: str | Path, top_k: int | None = None, release: dict | None = None,
                device: str = "auto", prefix_pool: float = 0.0) -> ModelHandle:
    loaded = load_flexolmo(model_dir, top_k=top_k, device=device, prefix_pool=prefix_pool)
    name = f"flexolmo-v{release['version']:04d}" if release else Path(model_dir).name
    return ModelHandle(loaded=loaded, name=name, path=str(model_dir), release=release)


@dataclass
class Job:
    """One request in the engine. `on_token(job, token_id)` and `on_done(job)` run on the engine's thread."""
    handle: ModelHandle
    prompt_ids: list[int]
    allowed: list[str]
    max_tokens: int
    on_token: Callable | None = None
    on_done: Callable | None = None
    cancelled: bool = False  # the client went away: stop generating for it
    sampling: Sampling = field(default_factory=Sampling)
    index: int = 0  # which of the request's n choices this is (choice i samples with seed + i)
    tokens: list[int] = field(default_factory=list)
    logprobs: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)  # per token, if asked
    text_end: int | None = None  # where a stop string cut the decoded text
    finish_reason: str | None = None
    routing: torch.Tensor | None = None  # summed routing weight per expert over the generated tokens
    error: str | None = None

    def attribution(self) -> dict[str, float]:
        """Each allowed expert's share of routing weight over the generated tokens."""
        return attribution([self])


def attribution(jobs: list[Job]) -> dict[str, float]:
    """Each allowed expert's share of routing weight over the tokens of `jobs` (one request's n choices)."""
    first = jobs[0]
    total = sum((j.routing for j in jobs if j.routing is not None), torch.zeros(len(first.handle.domains)))
    if float(total.sum()) == 0:
        return {d: 0.0 for d in first.allowed}
    share = total / total.sum()
    return {d: round(float(share[i]), 4) for i, d in enumerate(first.handle.domains) if d in first.allowed}


def _set_row_offsets(model, offsets: torch.Tensor | None) -> None:
    for router in routers(model):
        router.row_offset = offsets


@torch.no_grad()
def decode_batch(handle: ModelHandle, jobs: list[Job]) -> None:
    """Decode `jobs` together (left-padded, one forward per step); fills each job's tokens, logprobs,
    finish_reason and routing, calling on_token as tokens appear."""
    model, tok = handle.loaded.model, handle.tokenizer
    n, width = len(jobs), max(len(j.prompt_ids) for j in jobs)
    pad = tok.pad_token_id if tok.pad_token_id is not None else next(iter(handle.eos_ids()), 0)
    ids = torch.full((n, width), pad, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for b, job in enumerate(jobs):
        ids[b, width - len(job.prompt_ids):] = torch.tensor(job.prompt_ids)
        mask[b, width - len(job.prompt_ids):] = 1
    device = model.device
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    eos, layers = handle.eos_ids(), routers(model)
    routing = torch.zeros(n, len(handle.domains), device=device)
    active = [not j.cancelled for j in jobs]
    generators = [j.sampling.generator(j.index) for j in jobs]
    _set_row_offsets(model, torch.stack([handle.offsets(j.allowed) for j in jobs]).to(device))
    for router in layers:
        router.record = []
    try:
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
        last = torch.arange(n, device=device) * width + width - 1  # each row's last prompt position, flattened
        for step in range(max(j.max_tokens for j in jobs)):
            rows = last if step == 0 else torch.arange(n, device=device)
            for router in layers:  # the routing that chose this step's tokens
                routing += router.record[-1][rows]
                router.record.clear()
            logits = out.logits[:, -1, :]
            chosen = logits.argmax(-1)  # finished rows keep feeding a token; active rows get their own below
            for b, job in enumerate(jobs):
                if not active[b]:
                    continue
                if job.cancelled:
                    active[b], job.finish_reason = False, "cancelled"
                    continue
                token = choose(logits[b], job.sampling, job.tokens, generators[b])
                chosen[b] = token
                if job.sampling.logprobs is not None:
                    job.logprobs.append(logprobs_of(logits[b], token, job.sampling.logprobs))
                job.tokens.append(token)
                job.routing = routing[b].cpu()
                if job.sampling.stop:
                    job.text_end = stop_at(tok.decode(job.tokens, skip_special_tokens=True), job.sampling.stop)
                if job.on_token:
                    job.on_token(job, token)
                if token in eos or job.text_end is not None or len(job.tokens) >= job.max_tokens:
                    stopped = token in eos or job.text_end is not None
                    active[b], job.finish_reason = False, "stop" if stopped else "length"
            if not any(active):
                break
            for b, job in enumerate(jobs):
                if not active[b]:
                    routing[b] = 0  # keep finished rows out of the totals
            mask = torch.cat([mask, torch.ones((n, 1), dtype=torch.long, device=device)], dim=1)
            positions = positions[:, -1:] + 1
            out = model(input_ids=chosen[:, None], attention_mask=mask, position_ids=positions,
                        past_key_values=out.past_key_values, use_cache=True)
    finally:
        _set_row_offsets(model, None)
        for router in layers:
            router.record = None


class Engine:
    """One worker thread that runs batches; a bounded queue in front (full -> the caller answers 429)."""

    def __init__(self, handle: ModelHandle, max_batch: int = 16, batch_wait_ms: float = 5.0, queue_depth: int = 64):
        self.handle, self.max_batch, self.batch_wait = handle, max_batch, batch_wait_ms / 1000
        self.queue: queue.Queue[Job] = queue.Queue(maxsize=queue_depth)
        self._held: collections.deque[Job] = collections.deque()  # jobs for another release than this batch's
        self.batches = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="flexolmo-engine", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        self.queue.put_nowait(job)  # queue.Full when the server is saturated

    def swap(self, handle: ModelHandle) -> None:
        """New requests go to `handle`; requests admitted before finish on the release they started on."""
        self.handle = handle

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _next(self, timeout: float | None) -> Job | None:
        if self._held:
            return self._held.popleft()
        try:
            return self.queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def _run(self) -> None:
        while not self._stop.is_set():
            first = self._next(timeout=0.1)
            if first is None:
                continue
            batch, deadline = [first], time.monotonic() + self.batch_wait
            while len(batch) < self.max_batch:
                job = self._next(timeout=max(0.0, deadline - time.monotonic()))
                if job is None:
                    break
                (batch if job.handle is first.handle else self._held).append(job)
            live = [j for j in batch if not j.cancelled]
            try:
                if live:
                    decode_batch(first.handle, live)
                    self.batches += 1
            except Exception as err:  # noqa: BLE001  (a bug must not kill the server: each job says what failed)
                for job in live:
                    job.error = f"{type(err).__name__}: {err}"
            for job in batch:
                if job.cancelled and job.finish_reason is None:
                    job.finish_reason = "cancelled"
                if job.on_done:
                    job.on_done(job)
