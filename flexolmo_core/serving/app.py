"""The HTTP side of `flexolmo serve`: OpenAI-shaped endpoints over the engine, with policies and an audit log.

Expert choice is an extra body field, `experts: {"only": [...]}` or `{"exclude": [...]}`. Experts the
policy forbids are masked when the request did not name them (no `experts` field, or `exclude`); a request
that names a forbidden expert in `only` gets 403 (or, with `on_forbidden: mask`, is served without it).
Every answer carries `flexolmo`: attribution over the generated tokens, the experts allowed, used, masked."""
from __future__ import annotations

import asyncio
import itertools
import json
import queue
import re
import threading
import time
import uuid
from pathlib import Path

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from flexolmo_core.errors import InputError
from flexolmo_core.inference.model import resolve_experts
from flexolmo_core.serving.audit import AuditLog
from flexolmo_core.serving.config import ServeConfig
from flexolmo_core.serving.engine import Engine, Job, ModelHandle, attribution, load_handle
from flexolmo_core.serving.policy import PUBLIC, PolicyFile, Unauthorized
from flexolmo_core.serving.sampling import Sampling, stop_at


class HTTPError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.kind, "param": self.param,
                                       "code": self.status}}, status_code=self.status)


def bearer_key(request: Request) -> str | None:
    """The API key of `Authorization: Bearer <key>`, or None."""
    auth = request.headers.get("authorization", "")
    return auth[7:].strip() if auth.lower().startswith("bearer ") else None


# Every byte but those that open and close a JSON array or object: deleted before counting (strings go first).
_NOT_BRACKETS = bytes(range(256)).translate(None, b"[]{}")
_STEP = [0] * 256
_STEP[ord("[")] = _STEP[ord("{")] = 1
_STEP[ord("]")] = _STEP[ord("}")] = -1
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')


def json_depth(raw: bytes) -> int:
    """How deeply the arrays and objects of a JSON text nest, counted without parsing it (a parser recurses once
    per level: 100,000 levels raised RecursionError, a bare 500). Brackets inside strings do not count."""
    brackets = _JSON_STRING.sub(b"", raw).translate(None, _NOT_BRACKETS)
    return max(itertools.accumulate(map(_STEP.__getitem__, brackets)), default=0)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to pass `limit` bytes: by its Content-Length,
    or while it streams in (nothing past the limit is kept)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise HTTPError(413, f"the request body is {int(declared)} bytes; the limit is {limit} (serve.max_body_bytes)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPError(413, f"the request body passes {limit} bytes (serve.max_body_bytes)")
        chunks.append(chunk)
    return b"".join(chunks)


def _int_field(body: dict, name: str, default: int, low: int, high: int) -> int:
    value = body.get(name, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, int):
        raise HTTPError(400, f"{name} must be an integer, got {value!r}", param=name)
    if not low <= value <= high:
        raise HTTPError(400, f"{name} must be between {low} and {high} (serve.max_tokens_cap), got {value}",
                        param=name)
    return value


def _number_field(body: dict, name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise HTTPError(400, f"{name} must be a number, got {value!r}", param=name)
    if not (low < value if low_open else low <= value) or value > high:
        raise HTTPError(400, f"{name} must be in {'(' if low_open else '['}{low}, {high}], got {value}", param=name)
    return float(value)


# OpenAI fields this server does not implement: refused by name rather than silently ignored (the value that
# asks for nothing is accepted).
REFUSED = {"best_of": (1, "best_of is not served (use n)"), "logit_bias": ({}, "logit_bias is not served"),
           "echo": (False, "echo is not served"), "suffix": ("", "suffix (insertion) is not served"),
           "tools": ([], "tool calling is not served"), "functions": ([], "function calling is not served"),
           "response_format": ({"type": "text"}, "response_format is not served (plain text only)")}


def request_sampling(body: dict, chat: bool, max_n: int) -> tuple[Sampling, int]:
    """The request's decoding settings and n, each field checked against its range (400 naming it).
    temperature defaults to 0 here (greedy; OpenAI's default is 1)."""
    for name, (harmless, reason) in REFUSED.items():
        value = body.get(name)
        if value is not None and not (type(value) is type(harmless) and value == harmless):
            raise HTTPError(400, reason, param=name)
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop
    if stop is not None and not (isinstance(stop, list) and len(stop) <= 4 and all(isinstance(x, str) and x for x in stop)):
        raise HTTPError(400, "stop must be a non-empty string or a list of up to 4 of them", param="stop")
    if chat:
        if body.get("logprobs") not in (None, True, False):
            raise HTTPError(400, "logprobs must be true or false", param="logprobs")
        top = body.get("top_logprobs")
        if top is not None and (isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= 20):
            raise HTTPError(400, f"top_logprobs must be an integer in [0, 20], got {top!r}", param="top_logprobs")
        if top is not None and not body.get("logprobs"):
            raise HTTPError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        logprobs = (top or 0) if body.get("logprobs") else None
    else:
        logprobs = body.get("logprobs")
        if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, int) or not 0 <= logprobs <= 5):
            raise HTTPError(400, f"logprobs must be an integer in [0, 5], got {logprobs!r}", param="logprobs")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**62):
        raise HTTPError(400, f"seed must be an integer in [0, 2^62), got {seed!r}", param="seed")
    top_k = body.get("top_k", 0)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise HTTPError(400, f"top_k must be an integer >= 0 (0: all tokens), got {top_k!r}", param="top_k")
    n = body.get("n", 1)
    if n is None:
        n = 1
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= max_n:
        raise HTTPError(400, f"n must be an integer in [1, {max_n}] (serve.max_n), got {n!r}", param="n")
    sampling = Sampling(temperature=_number_field(body, "temperature", 0.0, 0, 2),
                        top_p=_number_field(body, "top_p", 1.0, 0, 1, low_open=True), top_k=top_k, seed=seed,
                        presence_penalty=_number_field(body, "presence_penalty", 0.0, -2, 2),
                        frequency_penalty=_number_field(body, "frequency_penalty", 0.0, -2, 2),
                        stop=tuple(stop or ()), logprobs=logprobs)
    return sampling, n


class Server:
    """Everything one running server holds: the engine, the policy file, the audit log, the release watcher."""

    def __init__(self, cfg: ServeConfig, handle: ModelHandle, policy: str | None = None, releases: str | None = None):
        self.cfg = cfg
        self.engine = Engine(handle, cfg.max_batch, cfg.batch_wait_ms, cfg.queue_depth)
        self.policy = PolicyFile(policy, cfg.poll_seconds)
        self.audit = AuditLog(cfg.audit_log)
        self.releases = Path(releases) if releases else None
        self.swaps: list[str] = []
        self._stop = threading.Event()
        if self.releases is not None:
            threading.Thread(target=self._watch_releases, name="flexolmo-releases", daemon=True).start()
        if policy is not None:
            threading.Thread(target=self._watch_policy, name="flexolmo-policy", daemon=True).start()

    def _watch_policy(self) -> None:
        """Reload the policy every poll even when no request comes, so that a broken edit is in the log at once."""
        while not self._stop.wait(self.cfg.poll_seconds):
            self.policy.current()

    # ---- releases -------------------------------------------------------------------------------------
    def _watch_releases(self) -> None:
        """Load a new current release beside the old one, then switch; requests on the old one finish there."""
        current = self.engine.handle.release or {}
        while not self._stop.wait(self.cfg.poll_seconds):
            try:
                release = json.loads((self.releases / "current.json").read_text())
            except (OSError, json.JSONDecodeError):
                continue  # not there yet, or being replaced: the next poll sees it
            if release.get("version") == current.get("version"):
                continue
            try:
                handle = load_handle(release["path"], self.cfg.top_k, release=release, device=self.cfg.device,
                                     prefix_pool=self.cfg.prefix_pool)
            except Exception as err:  # noqa: BLE001  (a bad release must not stop the one being served)
                self.swaps.append(f"v{release.get('version')}: not loaded ({type(err).__name__}: {err})")
                current = release
                continue
            self.engine.swap(handle)
            self.swaps.append(f"v{release['version']}: serving {release['path']}")
            current = release

    def close(self) -> None:
        self._stop.set()
        self.engine.stop()
        self.audit.close()

    # ---- one request ----------------------------------------------------------------------------------
    def admit(self, request: Request, body: dict, chat: bool) -> tuple[list[Job], dict]:
        """Authenticate, validate and resolve the experts; returns the request's n jobs (not yet submitted) and
        the audit record so far. Raises HTTPError."""
        policy = self.policy.current()  # this request keeps this policy to its end
        try:
            who = policy.principal(bearer_key(request))
        except Unauthorized as err:
            raise HTTPError(401, str(err), "authentication_error") from err
        record = {"principal": who.name, "endpoint": "chat" if chat else "completions"}
        handle = self.engine.handle
        record.update(model=handle.name, release=(handle.release or {}).get("version"))
        ids = self._prompt_ids(handle, body, chat)
        record["prompt_tokens"] = len(ids)
        max_tokens = _int_field(body, "max_tokens", self.cfg.default_max_tokens, 1, self.cfg.max_tokens_cap)
        sampling, n = request_sampling(body, chat, self.cfg.max_n)
        record.update(n=n, temperature=sampling.temperature, seed=sampling.seed)
        choice = body.get("experts") or {}
        if not isinstance(choice, dict) or set(choice) - {"only", "exclude"}:
            raise HTTPError(400, 'experts must be {"only": [...]} or {"exclude": [...]}', param="experts")
        only, exclude = choice.get("only"), choice.get("exclude") or []
        for name, value in (("only", only), ("exclude", exclude)):
            if value is not None and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
                raise HTTPError(400, f"experts.{name} must be a list of expert names", param=f"experts.{name}")
        record["experts_requested"] = choice
        try:
            wanted = resolve_experts(handle.domains, exclude, only)
        except InputError as err:
            raise HTTPError(400, str(err), param="experts") from err
        forbidden = [d for d in wanted if not policy.may_use(who, d)]
        named = [d for d in forbidden if only is not None and d in only]
        record["forbidden"] = named
        if named and policy.on_forbidden == "refuse":
            raise HTTPError(403, f"{who.name} may not use expert(s) {named} (policy {policy.source})",
                            "permission_error", param="experts")
        allowed = [d for d in wanted if d not in forbidden]
        if not allowed:
            allowed = [PUBLIC]  # every expert it named is masked: the public expert (always allowed) serves alone
        record.update(allowed=allowed, masked=forbidden)
        if self.cfg.log_text:
            record["prompt"] = body.get("prompt") if not chat else body.get("messages")
        return [Job(handle=handle, prompt_ids=ids, allowed=allowed, max_tokens=max_tokens, sampling=sampling, index=i)
                for i in range(n)], record

    def _refuse_by_length(self, handle: ModelHandle, chars: int, param: str) -> None:
        """A prompt that cannot fit max_prompt_tokens whatever its tokens: refused before tokenizing (a 30 MB prompt
        once took 142 s to tokenize, and nothing else was served meanwhile)."""
        limit, per_token = self.cfg.max_prompt_tokens, handle.max_token_chars
        if chars > limit * per_token:
            raise HTTPError(400, f"prompt is {chars} characters, more than {limit} tokens of at most {per_token} "
                                 f"characters each can hold; the limit is {limit} (serve.max_prompt_tokens)", param=param)

    def _prompt_ids(self, handle: ModelHandle, body: dict, chat: bool) -> list[int]:
        tok = handle.tokenizer
        if chat:
            messages = body.get("messages")
            if not (isinstance(messages, list) and messages and all(
                    isinstance(m, dict) and isinstance(m.get("content"), str) and isinstance(m.get("role"), str)
                    for m in messages)):
                raise HTTPError(400, "messages must be a non-empty list of {role, content} objects", param="messages")
            self._refuse_by_length(handle, sum(len(m["content"]) for m in messages), "messages")
            if not getattr(tok, "chat_template", None):
                raise HTTPError(400, f"model {handle.name} has no chat template; use /v1/completions", param="messages")
            ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                prompt = prompt[0]
            if not isinstance(prompt, str):
                raise HTTPError(400, "prompt must be a string (one prompt per request)", param="prompt")
            self._refuse_by_length(handle, len(prompt), "prompt")
            ids = tok(prompt)["input_ids"]
        if not ids:
            raise HTTPError(400, "empty prompt", param="prompt" if not chat else "messages")
        if len(ids) > self.cfg.max_prompt_tokens:
            raise HTTPError(400, f"prompt is {len(ids)} tokens; the limit is {self.cfg.max_prompt_tokens} "
                                 "(serve.max_prompt_tokens)", param="prompt" if not chat else "messages")
        return ids

    def answer_fields(self, jobs: list[Job], record: dict) -> dict:
        share = attribution(jobs)
        used = [d for d, s in share.items() if s > 0]
        record.update(completion_tokens=sum(len(j.tokens) for j in jobs), attribution=share, used=used,
                      finish_reason=[j.finish_reason for j in jobs] if len(jobs) > 1 else jobs[0].finish_reason)
        return {"attribution": share, "allowed": jobs[0].allowed, "used": used, "masked": record.get("masked", []),
                "release": record.get("release"), "model": jobs[0].handle.name}

    def text(self, job: Job) -> str:
        """The job's text, ended before the first stop string."""
        text = job.handle.tokenizer.decode(job.tokens, skip_special_tokens=True)
        return text if job.text_end is None else text[:job.text_end]


def logprobs_field(job: Job, start: int, end: int, chat: bool) -> dict | None:
    """OpenAI's logprobs object for the job's tokens [start, end): completions' legacy form or chat's `content`."""
    if job.sampling.logprobs is None:
        return None
    tok = job.handle.tokenizer
    piece = lambda token_id: tok.decode([token_id])  # noqa: E731
    tokens, records = job.tokens[start:end], job.logprobs[start:end]
    if chat:
        entry = lambda i, lp: {"token": piece(i), "logprob": lp, "bytes": list(piece(i).encode())}  # noqa: E731
        return {"content": [{**entry(t, lp), "top_logprobs": [entry(i, v) for i, v in top]}
                            for t, (lp, top) in zip(tokens, records)]}
    pieces = [piece(t) for t in tokens]
    before = len(tok.decode(job.tokens[:start], skip_special_tokens=True)) if start else 0
    offsets = list(itertools.accumulate([before, *(len(p) for p in pieces[:-1])])) if pieces else []
    return {"tokens": pieces, "token_logprobs": [lp for lp, _ in records],
            "top_logprobs": [{piece(i): v for i, v in top} for _, top in records], "text_offset": offsets}


def create_app(server: Server) -> FastAPI:
    app = FastAPI(title="flexolmo serve", docs_url=None, redoc_url=None)

    def finish(record: dict, start: float, status: int, error: str | None = None) -> None:
        record.update(status=status, seconds=round(time.perf_counter() - start, 4))
        if error:
            record["error"] = error
        server.audit.write(record)

    @app.get("/healthz")
    def healthz():
        server.policy.current()  # a poll is due: a broken edit shows here at once, not at the next request
        handle, policy = server.engine.handle, server.policy
        return {"status": "ok", "model": handle.name, "experts": handle.domains, "queued": server.engine.queue.qsize(),
                "batches": server.engine.batches, "policy": policy.policy.source, "policy_error": policy.error,
                "swaps": server.swaps}

    @app.get("/v1/models")
    def models(request: Request):
        try:
            server.policy.current().principal(bearer_key(request))
        except Unauthorized as err:
            return HTTPError(401, str(err), "authentication_error").response()
        handle = server.engine.handle
        return {"object": "list", "data": [{"id": handle.name, "object": "model", "created": 0, "owned_by": "flexolmo",
                                            "experts": handle.domains}]}

    async def complete(request: Request, chat: bool):
        start, record = time.perf_counter(), {"endpoint": "chat" if chat else "completions"}
        try:
            raw = await read_body(request, server.cfg.max_body_bytes)
            depth = json_depth(raw)
            if depth > server.cfg.max_json_depth:
                raise HTTPError(400, f"the request body nests {depth} levels deep; the limit is "
                                     f"{server.cfg.max_json_depth} (serve.max_json_depth)")
            try:
                body = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise HTTPError(400, f"the request body is not JSON ({err})") from err
            if not isinstance(body, dict):
                raise HTTPError(400, "the request body must be a JSON object")
            jobs, record = server.admit(request, body, chat)
        except HTTPError as err:
            finish(record, start, err.status, err.message)
            return err.response()
        loop, stream = asyncio.get_running_loop(), bool(body.get("stream"))
        dones, tokens = [loop.create_future() for _ in jobs], asyncio.Queue()
        for job, done in zip(jobs, dones):
            job.on_done = lambda j, done=done: loop.call_soon_threadsafe(lambda: done.done() or done.set_result(j))
            if stream:
                job.on_token = lambda j, t: loop.call_soon_threadsafe(tokens.put_nowait, (j.index, t))
        try:
            for job in jobs:
                server.engine.submit(job)
        except queue.Full:
            for job in jobs:
                job.cancelled = True  # all n or none: the ones already queued are dropped
            err = HTTPError(429, f"the server is busy ({server.cfg.queue_depth} requests waiting; serve.queue_depth)",
                            "rate_limit_error")
            finish(record, start, 429, err.message)
            return err.response()
        all_done = asyncio.gather(*dones)
        rid, created, name = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time()), jobs[0].handle.name
        failed = lambda: next((j.error for j in jobs if j.error), None)  # noqa: E731
        if not stream:
            try:
                await all_done
            except asyncio.CancelledError:
                for job in jobs:
                    job.cancelled = True
                finish(record, start, 499, "client went away")
                raise
            if failed():
                finish(record, start, 500, failed())
                return HTTPError(500, f"generation failed: {failed()}", "server_error").response()
            texts, extra = [server.text(j) for j in jobs], server.answer_fields(jobs, record)
            if server.cfg.log_text:
                record["completion"] = texts if len(texts) > 1 else texts[0]
            finish(record, start, 200)
            completion = sum(len(j.tokens) for j in jobs)
            usage = {"prompt_tokens": len(jobs[0].prompt_ids), "completion_tokens": completion,
                     "total_tokens": len(jobs[0].prompt_ids) + completion}
            choices = [{"index": j.index, **({"message": {"role": "assistant", "content": text}} if chat else
                                             {"text": text}),
                        "logprobs": logprobs_field(j, 0, len(j.tokens), chat), "finish_reason": j.finish_reason}
                       for j, text in zip(jobs, texts)]
            return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
                    "model": name, "choices": choices, "usage": usage, "flexolmo": extra}

        stops = jobs[0].sampling.stop
        hold = max((len(x) for x in stops), default=1) - 1  # text that may yet turn out to start a stop string

        async def events():
            kind = "chat.completion.chunk" if chat else "text_completion"
            shown, sent = ["" for _ in jobs], [0 for _ in jobs]  # text streamed, tokens whose logprobs went with it

            def chunk(index: int, delta: str, finish_reason=None, extra=None, upto: int | None = None) -> str:
                job = jobs[index]
                upto = len(job.tokens) if upto is None else upto
                logprobs = logprobs_field(job, sent[index], upto, chat) if upto > sent[index] else None
                sent[index] = max(sent[index], upto)
                piece = ({"index": index, "delta": {"content": delta} if delta or not finish_reason else {},
                          "logprobs": logprobs, "finish_reason": finish_reason} if chat else
                         {"index": index, "text": delta, "logprobs": logprobs, "finish_reason": finish_reason})
                data = {"id": rid, "object": kind, "created": created, "model": name, "choices": [piece]}
                if extra is not None:
                    data["flexolmo"] = extra
                return f"data: {json.dumps(data)}\n\n"

            try:
                if chat:
                    for job in jobs:
                        first = {"id": rid, "object": kind, "created": created, "model": name,
                                 "choices": [{"index": job.index, "delta": {"role": "assistant"}, "finish_reason": None}]}
                        yield f"data: {json.dumps(first)}\n\n"
                got: list[list[int]] = [[] for _ in jobs]
                while not (all_done.done() and tokens.empty()):
                    waiter = asyncio.ensure_future(tokens.get())
                    finished, _ = await asyncio.wait({waiter, all_done}, return_when=asyncio.FIRST_COMPLETED)
                    if waiter not in finished:
                        waiter.cancel()
                        continue
                    index, token = waiter.result()
                    got[index].append(token)
                    text = jobs[index].handle.tokenizer.decode(got[index], skip_special_tokens=True)
                    cut = stop_at(text, stops)
                    visible = text[:cut] if cut is not None else text[:len(text) - hold]
                    if visible.startswith(shown[index]) and len(visible) > len(shown[index]) \
                            and not visible.endswith("\ufffd"):  # whole characters only
                        delta, shown[index] = visible[len(shown[index]):], visible
                        yield chunk(index, delta, upto=len(got[index]))
                if failed():
                    finish(record, start, 500, failed())
                    yield f"data: {json.dumps({'error': {'message': failed(), 'type': 'server_error'}})}\n\n"
                    return
                texts, extra = [server.text(j) for j in jobs], server.answer_fields(jobs, record)
                for job, text in zip(jobs, texts):
                    if len(text) > len(shown[job.index]) and text.startswith(shown[job.index]):
                        yield chunk(job.index, text[len(shown[job.index]):])
                if server.cfg.log_text:
                    record["completion"] = texts if len(texts) > 1 else texts[0]
                finish(record, start, 200)
                for job in jobs:
                    yield chunk(job.index, "", job.finish_reason, extra if job is jobs[-1] else None)
                yield "data: [DONE]\n\n"
            except (asyncio.CancelledError, GeneratorExit):
                for job in jobs:
                    job.cancelled = True  # the client disconnected mid-stream: stop generating for it
                if "status" not in record:
                    finish(record, start, 499, "client disconnected mid-stream")
                raise

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await complete(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await complete(request, chat=True)

    return app


def run(cfg: ServeConfig, model: str | None = None, releases: str | None = None, policy: str | None = None) -> None:
    """Load the model (or the releases folder's current release) and serve until interrupted."""
    import uvicorn

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if (model is None) == (releases is None):
        raise InputError("give exactly one of --model DIR or --releases DIR")
    release = None
    if releases is not None:
        current = Path(releases) / "current.json"
        if not current.exists():
            raise InputError(f"{current}: no current release yet (the re-merge flow publishes it)")
        release = json.loads(current.read_text())
        model = release["path"]
    server = Server(cfg, load_handle(model, cfg.top_k, release=release, device=cfg.device, prefix_pool=cfg.prefix_pool), policy=policy,
                    releases=releases)
    print(f"flexolmo serve: {server.engine.handle.name} ({', '.join(server.engine.handle.domains)}) on "
          f"http://{cfg.host}:{cfg.port}/v1; policy {server.policy.policy.source}; audit log {cfg.audit_log}", flush=True)
    try:
        uvicorn.run(create_app(server), host=cfg.host, port=cfg.port, log_level="warning")
    finally:
        server.close()
