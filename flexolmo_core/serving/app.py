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
from flexolmo_core.serving.engine import Engine, Job, ModelHandle, load_handle
from flexolmo_core.serving.policy import PUBLIC, PolicyFile, Unauthorized


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
    def admit(self, request: Request, body: dict, chat: bool) -> tuple[Job, dict]:
        """Authenticate, validate and resolve the experts; returns the job (not yet submitted) and the audit
        record so far. Raises HTTPError."""
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
        if body.get("temperature") not in (None, 0, 0.0):
            raise HTTPError(400, "only greedy decoding is served: temperature must be 0 or absent", param="temperature")
        if body.get("n", 1) != 1:
            raise HTTPError(400, "n must be 1", param="n")
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
        return Job(handle=handle, prompt_ids=ids, allowed=allowed, max_tokens=max_tokens), record

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

    def answer_fields(self, job: Job, record: dict) -> dict:
        attribution = job.attribution()
        used = [d for d, s in attribution.items() if s > 0]
        record.update(completion_tokens=len(job.tokens), attribution=attribution, used=used,
                      finish_reason=job.finish_reason)
        return {"attribution": attribution, "allowed": job.allowed, "used": used, "masked": record.get("masked", []),
                "release": record.get("release"), "model": job.handle.name}

    def text(self, job: Job) -> str:
        return job.handle.tokenizer.decode(job.tokens, skip_special_tokens=True)


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
            job, record = server.admit(request, body, chat)
        except HTTPError as err:
            finish(record, start, err.status, err.message)
            return err.response()
        loop, stream = asyncio.get_running_loop(), bool(body.get("stream"))
        done, tokens = loop.create_future(), asyncio.Queue()
        job.on_done = lambda j: loop.call_soon_threadsafe(lambda: done.done() or done.set_result(j))
        if stream:
            job.on_token = lambda j, t: loop.call_soon_threadsafe(tokens.put_nowait, t)
        try:
            server.engine.submit(job)
        except queue.Full:
            err = HTTPError(429, f"the server is busy ({server.cfg.queue_depth} requests waiting; serve.queue_depth)",
                            "rate_limit_error")
            finish(record, start, 429, err.message)
            return err.response()
        rid, created, name = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time()), job.handle.name
        if not stream:
            try:
                await done
            except asyncio.CancelledError:
                job.cancelled = True
                finish(record, start, 499, "client went away")
                raise
            if job.error:
                finish(record, start, 500, job.error)
                return HTTPError(500, f"generation failed: {job.error}", "server_error").response()
            text, extra = server.text(job), server.answer_fields(job, record)
            if server.cfg.log_text:
                record["completion"] = text
            finish(record, start, 200)
            usage = {"prompt_tokens": len(job.prompt_ids), "completion_tokens": len(job.tokens),
                     "total_tokens": len(job.prompt_ids) + len(job.tokens)}
            choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": job.finish_reason}
                      if chat else {"index": 0, "text": text, "logprobs": None, "finish_reason": job.finish_reason})
            return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
                    "model": name, "choices": [choice], "usage": usage, "flexolmo": extra}

        async def events():
            shown = ""
            kind = "chat.completion.chunk" if chat else "text_completion"

            def chunk(delta: str, finish_reason=None, extra=None) -> str:
                piece = ({"index": 0, "delta": {"content": delta} if delta or not finish_reason else {},
                          "finish_reason": finish_reason} if chat else
                         {"index": 0, "text": delta, "logprobs": None, "finish_reason": finish_reason})
                data = {"id": rid, "object": kind, "created": created, "model": name, "choices": [piece]}
                if extra is not None:
                    data["flexolmo"] = extra
                return f"data: {json.dumps(data)}\n\n"

            try:
                if chat:
                    first = {"id": rid, "object": kind, "created": created, "model": name,
                             "choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]}
                    yield f"data: {json.dumps(first)}\n\n"
                got: list[int] = []
                while not (done.done() and tokens.empty()):
                    waiter = asyncio.ensure_future(tokens.get())
                    finished, _ = await asyncio.wait({waiter, done}, return_when=asyncio.FIRST_COMPLETED)
                    if waiter not in finished:
                        waiter.cancel()
                        continue
                    got.append(waiter.result())
                    text = job.handle.tokenizer.decode(got, skip_special_tokens=True)
                    if text.startswith(shown) and not text.endswith("\ufffd"):  # whole characters only
                        delta, shown = text[len(shown):], text
                        if delta:
                            yield chunk(delta)
                if job.error:
                    finish(record, start, 500, job.error)
                    yield f"data: {json.dumps({'error': {'message': job.error, 'type': 'server_error'}})}\n\n"
                    return
                text, extra = server.text(job), server.answer_fields(job, record)
                if len(text) > len(shown) and text.startswith(shown):
                    yield chunk(text[len(shown):])
                if server.cfg.log_text:
                    record["completion"] = text
                finish(record, start, 200)
                yield chunk("", job.finish_reason, extra)
                yield "data: [DONE]\n\n"
            except (asyncio.CancelledError, GeneratorExit):
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
