"""Batched decoding over one merged model where every sequence has its own set of experts and its own
sampling settings (greedy, or sampled with its own seeded generator: `serving/sampling.py`).

A request's expert choice is a row of router logit offsets (0 allowed, -inf not), added to every token of
that sequence in every layer (`FlexRouter.row_offset`). So one forward pass serves a batch that mixes
policies, and each sequence's softmax over its allowed experts is exactly that of a model merged with only
those experts (METHOD.md's opt-out). Batching is continuous (`Running`): requests join the running sequences
at a step boundary, left-padded into the shared KV cache, and leave when their own tokens are done."""
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


class Running:
    """The sequences decoded together (continuous batching). Each row is one job with its own KV-cache row,
    attention-mask row, position, expert mask and generator; rows join at a step boundary (`admit`: their prompts
    are prefilled together, their cache left-padded to the running one's width and stacked under it) and leave
    as soon as they finish (`step` drops them), so a short request never waits for a long one."""

    def __init__(self, handle: ModelHandle):
        self.handle, self.model = handle, handle.loaded.model
        self.jobs: list[Job] = []
        self.generators: list = []
        self.cache = self.mask = self.positions = self.pending = self.offsets = None
        self.pool: list | None = None  # prefix pooling's per-row running sums, one (sum, count) per router
        self.eos = handle.eos_ids()

    # ---- one token for one row -----------------------------------------------------------------------------
    def _advance(self, b: int, logits: torch.Tensor) -> int:
        """Choose row b's next token from its logits and record it; returns the token."""
        job = self.jobs[b]
        token = choose(logits, job.sampling, job.tokens, self.generators[b])
        if job.sampling.logprobs is not None:
            job.logprobs.append(logprobs_of(logits, token, job.sampling.logprobs))
        job.tokens.append(token)
        if job.sampling.stop:
            job.text_end = stop_at(self.handle.tokenizer.decode(job.tokens, skip_special_tokens=True), job.sampling.stop)
        if job.on_token:
            job.on_token(job, token)
        if token in self.eos or job.text_end is not None:
            job.finish_reason = "stop"
        elif len(job.tokens) >= job.max_tokens:
            job.finish_reason = "length"
        return token

    def _forward(self, offsets: torch.Tensor, **inputs):
        """One forward pass with these rows' expert masks; returns its output and each layer's routing records."""
        layers = routers(self.model)
        _set_row_offsets(self.model, offsets)
        for router in layers:
            router.record = []
        try:
            out = self.model(use_cache=True, **inputs)
            return out, [router.record[-1] for router in layers]
        finally:
            _set_row_offsets(self.model, None)
            for router in layers:
                router.record = None

    # ---- rows join ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def admit(self, jobs: list[Job]) -> None:
        """Prefill the new jobs' prompts (left-padded among themselves), choose their first tokens, and add them."""
        jobs = [j for j in jobs if not j.cancelled]
        if not jobs:
            return
        tok, device = self.handle.tokenizer, self.model.device
        n, width = len(jobs), max(len(j.prompt_ids) for j in jobs)
        pad = tok.pad_token_id if tok.pad_token_id is not None else next(iter(self.eos), 0)
        ids = torch.full((n, width), pad, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for b, job in enumerate(jobs):
            ids[b, width - len(job.prompt_ids):] = torch.tensor(job.prompt_ids)
            mask[b, width - len(job.prompt_ids):] = 1
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        offsets = torch.stack([self.handle.offsets(j.allowed) for j in jobs]).to(device)
        old_pool = self._pool_state()
        out, records = self._forward(offsets, input_ids=ids, attention_mask=mask, position_ids=positions)
        last = torch.arange(n, device=device) * width + width - 1  # each row's last prompt position, flattened
        first = len(self.jobs)
        self.jobs += jobs
        self.generators += [j.sampling.generator(j.index) for j in jobs]
        routing = torch.stack(records).sum(0)[last].cpu()  # one copy to the CPU per forward, not one per row
        logits = out.logits[:, -1].float().cpu()
        for b, job in enumerate(jobs):
            job.routing = routing[b]
        pending = torch.tensor([self._advance(first + b, logits[b]) for b in range(n)], device=device)
        self._stack(out.past_key_values, mask, positions[:, -1], pending, offsets, old_pool)
        self._drop_finished()

    def _stack(self, cache, mask, positions, pending, offsets, old_pool) -> None:
        """Put the new rows' cache, mask and state under the running ones, left-padding the narrower side."""
        if self.cache is None:
            self.cache, self.mask, self.positions, self.pending, self.offsets = cache, mask, positions, pending, offsets
            return
        width = max(self.mask.shape[1], mask.shape[1])
        self.mask = torch.cat([_left_pad(self.mask, width), _left_pad(mask, width)])
        for old, new in zip(self.cache.layers, cache.layers):
            old.keys = torch.cat([_left_pad(old.keys, width, dim=2), _left_pad(new.keys, width, dim=2)])
            old.values = torch.cat([_left_pad(old.values, width, dim=2), _left_pad(new.values, width, dim=2)])
        self.positions = torch.cat([self.positions, positions])
        self.pending, self.offsets = torch.cat([self.pending, pending]), torch.cat([self.offsets, offsets])
        if old_pool is not None:  # the prefill started fresh sums for the new rows: the old rows' go on top
            for router, (total, count) in zip(routers(self.model), old_pool):
                router.pool_sum = torch.cat([total, router.pool_sum])
                router.pool_count = torch.cat([count, router.pool_count])

    def _pool_state(self) -> list | None:
        layers = routers(self.model)
        if not layers[0].prefix_pool or not self.jobs:
            return None
        return [(r.pool_sum, r.pool_count) for r in layers]

    # ---- one step for every row ---------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> None:
        """Feed every row its last token, choose the next one, and let finished rows go."""
        if not self.jobs:
            return
        device = self.model.device
        self.mask = torch.cat([self.mask, torch.ones((len(self.jobs), 1), dtype=torch.long, device=device)], dim=1)
        self.positions = self.positions + 1
        out, records = self._forward(self.offsets, input_ids=self.pending[:, None], attention_mask=self.mask,
                                     position_ids=self.positions[:, None], past_key_values=self.cache)
        self.cache = out.past_key_values
        routing = torch.stack(records).sum(0).cpu()  # one copy to the CPU per step, not one per row
        logits = out.logits[:, -1].float().cpu()
        for b, job in enumerate(self.jobs):
            if job.cancelled:
                job.finish_reason = "cancelled"
                continue
            job.routing = job.routing + routing[b]
            self.pending[b] = self._advance(b, logits[b])
        self._drop_finished()

    def _drop_finished(self) -> None:
        """Remove finished rows from every per-row state (and columns no row needs any more); tell their callers."""
        for job in self.jobs:
            if job.cancelled and job.finish_reason is None:
                job.finish_reason = "cancelled"
        keep = [b for b, j in enumerate(self.jobs) if j.finish_reason is None]
        done = [j for j in self.jobs if j.finish_reason is not None]
        if not done:
            return
        index = torch.tensor(keep, dtype=torch.long, device=self.model.device)
        self.jobs, self.generators = [self.jobs[b] for b in keep], [self.generators[b] for b in keep]
        if keep:
            self.mask, self.positions = self.mask[index], self.positions[index]
            self.pending, self.offsets = self.pending[index], self.offsets[index]
            cut = int((self.mask.sum(0) > 0).nonzero()[0])  # leading columns that are padding in every row left
            self.mask = self.mask[:, cut:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[index, :, cut:], layer.values[index, :, cut:]
            for router in routers(self.model):
                if router.pool_sum is not None and router.prefix_pool:
                    router.pool_sum, router.pool_count = router.pool_sum[index], router.pool_count[index]
        else:
            self.cache = self.mask = self.positions = self.pending = self.offsets = None
        for job in done:
            if job.on_done:
                job.on_done(job)

    def fail(self, error: str) -> None:
        """A bug in a step: every running job says what failed and is answered."""
        for job in self.jobs:
            job.error = error
            if job.on_done:
                job.on_done(job)
        self.jobs, self.generators = [], []
        self.cache = self.mask = self.positions = self.pending = self.offsets = None


def _left_pad(t: torch.Tensor, width: int, dim: int = 1) -> torch.Tensor:
    """`t` grown to `width` along `dim` with zeros on the left (masked out: never attended to)."""
    extra = width - t.shape[dim]
    if extra <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = extra
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def decode_batch(handle: ModelHandle, jobs: list[Job]) -> None:
    """Decode `jobs` together from the same start to their ends (the engine admits later jobs as they come);
    fills each job's tokens, logprobs, finish_reason and routing, calling on_token as tokens appear."""
    running = Running(handle)
    running.admit(jobs)
    while running.jobs:
        running.step()


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

    def _next(self, timeout: float | None, handle: ModelHandle | None = None) -> Job | None:
        """A held request (for `handle`'s release, or any when None), else the next from the queue."""
        for job in self._held:  # requests for another release wait until the running sequences end
            if handle is None or job.handle is handle:
                self._held.remove(job)
                return job
        try:
            return self.queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def _run(self) -> None:
        """Continuous batching: while sequences run, new requests for the same release join at each step
        boundary (up to max_batch rows) and finished ones leave at once. From idle, the first request waits up to
        batch_wait_ms for company."""
        running: Running | None = None
        while not self._stop.is_set():
            if running is None or not running.jobs:
                first = self._next(timeout=0.1)
                if first is None:
                    continue
                running, new, deadline = Running(first.handle), [first], time.monotonic() + self.batch_wait
            else:
                new, deadline = [], time.monotonic()  # running: take only what is already waiting
            while len(running.jobs) + len(new) < self.max_batch:
                job = self._next(timeout=max(0.0, deadline - time.monotonic()), handle=running.handle)
                if job is None:
                    break
                if job.cancelled:
                    job.finish_reason = "cancelled"
                    if job.on_done:
                        job.on_done(job)
                    continue
                (new if job.handle is running.handle else self._held).append(job)
            try:
                if new:
                    running.admit(new)
                    self.batches += 1
                running.step()
            except Exception as err:  # noqa: BLE001  (a bug must not kill the server: each job says what failed)
                for job in new:
                    job.error = job.error or f"{type(err).__name__}: {err}"
                    if job not in running.jobs and job.on_done:
                        job.on_done(job)
                running.fail(f"{type(err).__name__}: {err}")
