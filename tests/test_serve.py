"""`flexolmo serve` as a real server on 127.0.0.1 (a subprocess), driven by the official `openai` client and
by raw HTTP: expert choice, exactness against smaller merges, streaming, policies (401/403/mask/withdrawn,
reload without restart), the audit log (one line per request), and bad input that must not stop it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

from benchmarks.harness import free_port, stop, wait_for

ROOT = Path(__file__).resolve().parents[1]
KEYS = {"alice": "key-alice", "bob": "key-bob"}


def write_policy(path: Path, experts: dict, on_forbidden: str = "refuse") -> None:
    from flexolmo_core.serving.policy import hash_key

    data = {"on_forbidden": on_forbidden, "keys": [
        {"sha256": hash_key(KEYS["alice"]), "principal": "alice", "groups": ["clinic"]},
        {"sha256": hash_key(KEYS["bob"]), "principal": "bob"}], "experts": experts}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(data))
    os.replace(tmp, path)  # what an editor's save does: the server never reads half a file


def start_server(tmp_path: Path, *args: str, log_name: str = "serve.log") -> tuple[subprocess.Popen, str, Path]:
    port, audit = free_port(), tmp_path / f"audit-{log_name}.jsonl"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "flexolmo_core.cli.main", "serve", *args, "--port", str(port),
                             "--audit-log", str(audit), "--poll-seconds", "0.2", "--queue-depth", "8",
                             "--max-prompt-tokens", "64", "--max-tokens-cap", "32", "--max-body-bytes", "65536"],
                            env=env, cwd=tmp_path, stdout=(tmp_path / log_name).open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def up():
        assert proc.poll() is None, (tmp_path / log_name).read_text()[-3000:]
        try:
            return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(up, 120, "flexolmo serve to answer /healthz", poll=0.3)
    except AssertionError:
        stop(proc)
        raise
    return proc, url, audit


@pytest.fixture(scope="module")
def server(tmp_path_factory, serve_merges):
    tmp = tmp_path_factory.mktemp("served")
    policy = tmp / "policy.yaml"
    write_policy(policy, {"code": {"allow": ["group:clinic"]}, "news": {"allow": ["*"]}})
    proc, url, audit = start_server(tmp, "--model", str(serve_merges["all"]), "--policy", str(policy))
    yield {"url": url, "audit": audit, "policy": policy, "proc": proc, "dir": tmp}
    stop(proc)


def client(server, key="alice"):
    import openai

    return openai.OpenAI(base_url=f"{server['url']}/v1", api_key=KEYS.get(key, key), max_retries=0)


def reference(model_dir, prompt, n):
    from flexolmo_core.inference.model import generate, load_flexolmo

    loaded = load_flexolmo(model_dir)
    return loaded.tokenizer.decode(generate(loaded, prompt, max_new_tokens=n)["token_ids"], skip_special_tokens=True)


def audit_lines(server) -> list[dict]:
    return [json.loads(line) for line in server["audit"].read_text().splitlines()]


def test_the_openai_client_gets_answers_equal_to_smaller_merges(server, serve_merges):
    c = client(server)
    for experts, ref in (({"only": ["public", "code"]}, "code"), ({"exclude": ["code"]}, "news"), (None, "all")):
        extra = {"experts": experts} if experts else {}
        resp = c.completions.create(model="flexolmo", prompt="def main(args):\n    return", max_tokens=8,
                                    extra_body=extra)
        assert resp.choices[0].text == reference(serve_merges[ref], "def main(args):\n    return", 8), experts
        info = resp.model_extra["flexolmo"]
        assert set(info["attribution"]) == set(info["allowed"]) and resp.usage.completion_tokens <= 8
        assert abs(sum(info["attribution"].values()) - 1) < 1e-3
    models = c.models.list()
    assert models.data[0].model_extra["experts"] == ["public", "code", "news"]


def test_requests_with_different_expert_sets_in_flight_together_stay_exact(server, serve_merges):
    c = client(server)
    cases = [({"only": ["public", "code"]}, "code", "import os\nimport"), ({"only": ["public", "news"]}, "news",
             "The history of the city"), ({}, "all", "In 1850 the"), ({"exclude": ["news"]}, "code", "x = 1\n")] * 2
    answers = [None] * len(cases)

    def ask(i, experts, prompt):
        answers[i] = c.completions.create(model="flexolmo", prompt=prompt, max_tokens=10,
                                          extra_body={"experts": experts}).choices[0].text

    threads = [threading.Thread(target=ask, args=(i, e, p)) for i, (e, _, p) in enumerate(cases)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert answers == [reference(serve_merges[ref], p, 10) for _, ref, p in cases]


def test_streaming_matches_the_whole_answer_and_carries_attribution(server):
    c = client(server)
    whole = c.completions.create(model="flexolmo", prompt="The history of", max_tokens=12).choices[0].text
    chunks = list(c.completions.create(model="flexolmo", prompt="The history of", max_tokens=12, stream=True))
    assert "".join(ch.choices[0].text for ch in chunks) == whole
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    assert set(chunks[-1].model_extra["flexolmo"]["attribution"]) == {"public", "code", "news"}


def test_the_openai_client_samples_with_n_seed_stop_and_logprobs(server):
    """Sampled completions through the official client: n choices, each reproducible from the seed, usage and
    finish_reason right, logprobs in the completions form; streamed, the same n texts arrive chunk by chunk."""
    c = client(server)
    ask = dict(model="flexolmo", prompt="The history of the city", max_tokens=10, n=3, temperature=1.0, top_p=0.95,
               seed=5, logprobs=2)
    first, again = c.completions.create(**ask), c.completions.create(**ask)
    texts = [ch.text for ch in sorted(first.choices, key=lambda ch: ch.index)]
    assert texts == [ch.text for ch in sorted(again.choices, key=lambda ch: ch.index)] and len(set(texts)) > 1
    assert first.usage.completion_tokens == sum(len(ch.logprobs.tokens) for ch in first.choices)
    assert first.usage.total_tokens == first.usage.prompt_tokens + first.usage.completion_tokens
    for ch in first.choices:
        assert ch.finish_reason in ("length", "stop") and "".join(ch.logprobs.tokens).startswith(ch.text[:1])
        assert all(lp <= 0 for lp in ch.logprobs.token_logprobs) and all(len(t) == 2 for t in ch.logprobs.top_logprobs)
        assert ch.finish_reason == "stop" or len(ch.logprobs.tokens) == 10
    stop = texts[0][2:4]
    cut = c.completions.create(**{**ask, "n": 1, "stop": [stop]}).choices[0]
    assert cut.finish_reason == "stop" and cut.text == texts[0][:texts[0].find(stop)]
    chunks = list(c.completions.create(**ask, stream=True))
    streamed = ["".join(ch.choices[0].text for ch in chunks if ch.choices[0].index == i) for i in range(3)]
    assert streamed == texts
    assert {ch.choices[0].finish_reason for ch in chunks if ch.choices[0].finish_reason} <= {"length", "stop"}
    streamed_lp = [lp for ch in chunks if ch.choices[0].index == 0 and ch.choices[0].logprobs
                   for lp in ch.choices[0].logprobs.token_logprobs]
    assert streamed_lp == first.choices[[ch.index for ch in first.choices].index(0)].logprobs.token_logprobs


def test_chat_without_a_template_is_a_400_naming_the_other_endpoint(server):
    import openai

    with pytest.raises(openai.BadRequestError, match="no chat template; use /v1/completions"):
        client(server).chat.completions.create(model="flexolmo", messages=[{"role": "user", "content": "hi"}])


def test_policies_keys_forbidden_experts_and_reload(server):
    import openai

    with pytest.raises(openai.AuthenticationError, match="unknown API key"):
        client(server, key="wrong").completions.create(model="flexolmo", prompt="a", max_tokens=2)
    r = httpx.post(f"{server['url']}/v1/completions", json={"prompt": "a"})
    assert r.status_code == 401 and "missing API key" in r.json()["error"]["message"]
    bob = client(server, "bob")
    with pytest.raises(openai.PermissionDeniedError, match=r"bob may not use expert\(s\) \['code'\]"):
        bob.completions.create(model="flexolmo", prompt="a", max_tokens=2, extra_body={"experts": {"only": ["code"]}})
    # not named: the forbidden expert is masked, and the answer says so
    info = bob.completions.create(model="flexolmo", prompt="a", max_tokens=3).model_extra["flexolmo"]
    assert info["masked"] == ["code"] and set(info["allowed"]) == {"public", "news"} and "code" not in info["attribution"]
    # news's owner withdraws: the next request no longer gets it, with no restart
    write_policy(server["policy"], {"code": {"allow": ["group:clinic"]}, "news": {"withdrawn": True}})

    def withdrawn():
        info = client(server).completions.create(model="flexolmo", prompt="a", max_tokens=2).model_extra["flexolmo"]
        return info["masked"] == ["news"] and info["allowed"] == ["public", "code"]

    wait_for(withdrawn, 10, "the policy reload", poll=0.3)
    assert httpx.get(f"{server['url']}/healthz").json()["policy_error"] is None
    write_policy(server["policy"], {"code": {"allow": ["group:clinic"]}, "news": {"allow": ["*"]}})


@pytest.mark.parametrize("broken, message", [
    ("keys: [\n  - sha256: 'unclosed", "not valid YAML"),
    ("principals:\n  - {sha256: " + "a" * 64 + ", principal: carol}\n", "unknown field(s) ['principals']"),
])
def test_a_broken_policy_edit_is_loud_at_once_and_the_last_good_one_stays(server, broken, message):
    """With no request coming, /healthz and the log show a broken edit within a poll (0.2 s here; it once still
    said `policy_error: null` 3 s after an edit to invalid YAML), and requests keep the last good policy."""

    def serving_the_good_policy():  # the one an earlier test restored may still be on its way in
        info = client(server).completions.create(model="flexolmo", prompt="a", max_tokens=1).model_extra["flexolmo"]
        return info["masked"] == []

    wait_for(serving_the_good_policy, 10, "the good policy", poll=0.3)
    good = server["policy"].read_text()
    tmp = server["policy"].with_suffix(".tmp")
    tmp.write_text(broken)
    os.replace(tmp, server["policy"])
    edited = time.monotonic()
    try:
        wait_for(lambda: (server["dir"] / "serve.log").read_text().count(message) == 1, 5, "the log line", poll=0.1)
        assert time.monotonic() - edited < 3
        error = httpx.get(f"{server['url']}/healthz").json()["policy_error"]
        assert error and message in error and str(server["policy"]) in error
        info = client(server).completions.create(model="flexolmo", prompt="a", max_tokens=2).model_extra["flexolmo"]
        assert info["masked"] == [] and info["allowed"] == ["public", "code", "news"]  # alice, under the last good one
    finally:
        tmp.write_text(good)
        os.replace(tmp, server["policy"])
    wait_for(lambda: httpx.get(f"{server['url']}/healthz").json()["policy_error"] is None, 5, "the fixed policy")
    assert "reloaded; it is valid again" in (server["dir"] / "serve.log").read_text()


def test_a_policy_refuses_fields_it_does_not_know():
    from flexolmo_core.errors import InputError
    from flexolmo_core.serving.policy import parse_policy

    with pytest.raises(InputError, match=r"p.yaml: unknown field\(s\) \['principals'\]; expected on_forbidden, default"):
        parse_policy({"principals": []}, "p.yaml")
    with pytest.raises(InputError, match=r"p.yaml: keys\[0\]: unknown field\(s\) \['group'\]; expected sha256"):
        parse_policy({"keys": [{"sha256": "a" * 64, "principal": "x", "group": ["g"]}]}, "p.yaml")


BAD = [  # (what, raw body or json, status, message part)
    ("malformed JSON", b'{"prompt": "a", ', 400, "not JSON"),
    ("an array body", [1, 2], 400, "JSON object"),
    ("an unknown expert", {"prompt": "a", "experts": {"only": ["legal"]}}, 400, "unknown expert(s) ['legal']"),
    ("experts of the wrong shape", {"prompt": "a", "experts": ["code"]}, 400, "experts must be"),
    ("max_tokens 0", {"prompt": "a", "max_tokens": 0}, 400, "max_tokens must be between 1 and 32"),
    ("max_tokens -5", {"prompt": "a", "max_tokens": -5}, 400, "max_tokens must be between 1 and 32"),
    ("max_tokens huge", {"prompt": "a", "max_tokens": 10 ** 12}, 400, "max_tokens must be between 1 and 32"),
    ("max_tokens a string", {"prompt": "a", "max_tokens": "8"}, 400, "max_tokens must be an integer"),
    ("a prompt over the limit", {"prompt": "word " * 200}, 400, "the limit is 64 (serve.max_prompt_tokens)"),
    ("an empty prompt", {"prompt": ""}, 400, "empty prompt"),
    ("no prompt", {"max_tokens": 2}, 400, "prompt must be a string"),
    ("temperature 3", {"prompt": "a", "temperature": 3}, 400, "temperature must be in [0, 2], got 3"),
    ("temperature a string", {"prompt": "a", "temperature": "hot"}, 400, "temperature must be a number"),
    ("top_p 0", {"prompt": "a", "top_p": 0}, 400, "top_p must be in (0, 1], got 0"),
    ("top_k -1", {"prompt": "a", "top_k": -1}, 400, "top_k must be an integer >= 0"),
    ("a negative seed", {"prompt": "a", "seed": -1}, 400, "seed must be an integer in [0, 2^62)"),
    ("presence_penalty 5", {"prompt": "a", "presence_penalty": 5}, 400, "presence_penalty must be in [-2, 2]"),
    ("frequency_penalty -3", {"prompt": "a", "frequency_penalty": -3}, 400, "frequency_penalty must be in [-2, 2]"),
    ("five stop strings", {"prompt": "a", "stop": list("abcde")}, 400, "a list of up to 4"),
    ("an empty stop string", {"prompt": "a", "stop": [""]}, 400, "stop must be"),
    ("n over serve.max_n", {"prompt": "a", "n": 9}, 400, "n must be an integer in [1, 4] (serve.max_n), got 9"),
    ("n 0", {"prompt": "a", "n": 0}, 400, "n must be an integer in [1, 4]"),
    ("logprobs 6", {"prompt": "a", "logprobs": 6}, 400, "logprobs must be an integer in [0, 5], got 6"),
    ("echo", {"prompt": "a", "echo": True}, 400, "echo is not served"),
    ("best_of", {"prompt": "a", "best_of": 2}, 400, "best_of is not served"),
    ("logit_bias", {"prompt": "a", "logit_bias": {"5": 10}}, 400, "logit_bias is not served"),
    # refused before parsing or tokenizing (a bare 500 with a RecursionError; a 30 MB prompt tokenized for 142 s)
    ("deeply nested JSON", b"[" * 60_000, 400, "nests 60000 levels deep; the limit is 32 (serve.max_json_depth)"),
    ("a body over the limit", {"prompt": "x" * 70_000}, 413, "the limit is 65536 (serve.max_body_bytes)"),
    ("a prompt longer in characters than the limit can hold", {"prompt": "x" * 60_000}, 400,
     "characters each can hold; the limit is 64 (serve.max_prompt_tokens)"),
    ("a chat too long in characters", None, 400, "characters each can hold"),
]


@pytest.mark.parametrize("what, body, status, message", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_a_clear_4xx_and_the_server_keeps_serving(server, what, body, status, message):
    headers = {"Authorization": f"Bearer {KEYS['alice']}"}
    if body is None:  # the chat endpoint checks the length before its template (this model has none)
        r = httpx.post(f"{server['url']}/v1/chat/completions", headers=headers,
                       json={"messages": [{"role": "user", "content": "y" * 30_000}] * 2})
        assert r.status_code == status and message in r.json()["error"]["message"], r.text
        return
    if isinstance(body, bytes):
        r = httpx.post(f"{server['url']}/v1/completions", content=body, headers={**headers, "Content-Type": "application/json"})
    else:
        r = httpx.post(f"{server['url']}/v1/completions", json=body, headers=headers)
    assert r.status_code == status and message in r.json()["error"]["message"], r.text
    assert httpx.get(f"{server['url']}/healthz").status_code == 200


def test_excluding_every_owner_expert_serves_the_public_expert_alone(server):
    info = client(server).completions.create(model="flexolmo", prompt="a", max_tokens=3,
                                             extra_body={"experts": {"exclude": ["code", "news"]}}).model_extra["flexolmo"]
    assert info["allowed"] == ["public"] and info["attribution"] == {"public": 1.0}


def test_a_hammer_of_requests_gets_429s_past_the_queue_a_disconnect_and_one_audit_line_each(server):
    before = len(audit_lines(server))
    headers = {"Authorization": f"Bearer {KEYS['alice']}"}
    statuses = []

    def hit(i):
        body = {"prompt": f"request {i}", "max_tokens": 24}
        if i % 7 == 0:
            body = b"not json"
        try:
            r = (httpx.post(f"{server['url']}/v1/completions", content=body, headers=headers, timeout=120)
                 if isinstance(body, bytes) else httpx.post(f"{server['url']}/v1/completions", json=body,
                                                             headers=headers, timeout=120))
            statuses.append(r.status_code)
        except httpx.HTTPError as err:  # a failure to answer is a failure of the server
            statuses.append(repr(err))

    threads = [threading.Thread(target=hit, args=(i,)) for i in range(200)]
    [t.start() for t in threads]
    # one client walks away in the middle of a stream
    with httpx.stream("POST", f"{server['url']}/v1/completions", headers=headers,
                      json={"prompt": "stream and leave", "max_tokens": 30, "stream": True}, timeout=120) as r:
        streamed = r.status_code  # 429 too, when the hammer has filled the queue
        for _ in r.iter_lines():
            break
    [t.join() for t in threads]
    assert set(statuses) <= {200, 400, 429} and 429 in statuses and 200 in statuses, statuses
    assert server["proc"].poll() is None and httpx.get(f"{server['url']}/healthz").status_code == 200
    # every request wrote its line: 200 hammer requests, the stream (200, 429 or 499), nothing else meanwhile
    wait_for(lambda: len(audit_lines(server)) - before == 201, 60, "one audit line per request", poll=0.5)
    lines = audit_lines(server)[before:]
    assert {line["status"] for line in lines} <= {200, 400, 429, 499}
    assert sum(line["status"] == 429 for line in lines) == statuses.count(429) + (streamed == 429)
    assert all("prompt" not in line and "completion" not in line for line in lines)  # no text unless log_text
    ok = [line for line in lines if line["status"] == 200]
    assert all(line["principal"] == "alice" and line["completion_tokens"] >= 1 and line["attribution"] for line in ok)


def test_usage_summarises_the_audit_log(server, capsys):
    from flexolmo_core.cli.main import main

    client(server, "bob").completions.create(model="flexolmo", prompt="a", max_tokens=2)  # code masked for bob
    client(server).completions.create(model="flexolmo", prompt="a", max_tokens=2)
    assert main(["usage", "--log", str(server["audit"]), "--by", "expert", "--json"]) == 0
    rows = {r["expert"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["public"]["requests using it"] >= 1 and "masked" in rows["code"]
    assert main(["usage", "--log", str(server["audit"]), "--by", "principal"]) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0].startswith("principal") and "alice" in table and "bob" in table


def test_a_real_remerge_is_swapped_in_while_a_client_loops(tmp_path, smoke_anchor, packages, harness):
    """The re-merge flow publishes v1 (public + code); the server serves it; while a client loops, an owner
    publishes news and the re-merge flow writes v2; the server loads v2 beside v1, switches, and no request fails."""
    from flexolmo_core.registry.local import Registry
    from flows.remerge import remerge

    registry, releases = tmp_path / "registry", tmp_path / "releases"
    Registry(registry).init(smoke_anchor)
    Registry(registry).publish(packages["code"])
    seen, failures, stop_loop = [], [], threading.Event()
    assert remerge(str(registry), str(smoke_anchor), str(releases), evaluate=False)["version"] == 1
    proc, url, audit = start_server(tmp_path, "--releases", str(releases), log_name="swap")

    def loop():
        while not stop_loop.is_set():
            r = httpx.post(f"{url}/v1/completions", json={"prompt": "import os", "max_tokens": 4}, timeout=60)
            (seen.append(r.json()["flexolmo"]["model"]) if r.status_code == 200 else failures.append(r.text))

    worker = threading.Thread(target=loop)
    worker.start()
    try:
        wait_for(lambda: len(seen) >= 3, 60, "answers from v1")
        Registry(registry).publish(packages["news"])
        assert remerge(str(registry), str(smoke_anchor), str(releases), evaluate=False)["version"] == 2
        wait_for(lambda: seen and seen[-1] == "flexolmo-v0002", 120, "the switch to v2", poll=0.3)
        count = len(seen)
        wait_for(lambda: len(seen) >= count + 3, 60, "answers from v2")
        health = httpx.get(f"{url}/healthz").json()
    finally:
        stop_loop.set()
        worker.join()
        stop(proc)
    assert not failures, failures[:3]
    assert seen[0] == "flexolmo-v0001" and set(seen[seen.index("flexolmo-v0002"):]) == {"flexolmo-v0002"}
    assert health["experts"] == ["public", "code", "news"] and health["swaps"][-1].startswith("v2: serving")
    assert len(audit.read_text().splitlines()) == len(seen)  # one line per request, across the swap


def test_chat_uses_the_tokenizers_chat_template(tmp_path, serve_merges):
    """With a chat template (a copy of the merge with one added), chat answers what a completion of the rendered
    template answers, streamed or not."""
    import shutil

    model = tmp_path / "chat-model"
    shutil.copytree(serve_merges["all"], model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["chat_template"] = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}assistant:{% endif %}")
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    proc, url, _ = start_server(tmp_path, "--model", str(model), log_name="chat")
    try:
        import openai

        c = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        messages = [{"role": "user", "content": "Tell me about the city"}]
        chat = c.chat.completions.create(model="m", messages=messages, max_tokens=8,
                                         extra_body={"experts": {"only": ["public", "news"]}})
        plain = c.completions.create(model="m", prompt="user: Tell me about the city\nassistant:", max_tokens=8,
                                     extra_body={"experts": {"only": ["public", "news"]}})
        assert chat.choices[0].message.content == plain.choices[0].text and chat.choices[0].message.role == "assistant"
        assert chat.model_extra["flexolmo"]["allowed"] == ["public", "news"]
        parts = list(c.chat.completions.create(model="m", messages=messages, max_tokens=8, stream=True,
                                               extra_body={"experts": {"only": ["public", "news"]}}))
        assert "".join(p.choices[0].delta.content or "" for p in parts) == chat.choices[0].message.content
        sampled = c.chat.completions.create(model="m", messages=messages, max_tokens=6, n=2, temperature=0.9, seed=2,
                                            logprobs=True, top_logprobs=3)
        assert len(sampled.choices) == 2 and sampled.usage.completion_tokens == sum(
            len(ch.logprobs.content) for ch in sampled.choices)
        for ch in sampled.choices:
            assert all(len(t.top_logprobs) == 3 and t.logprob <= 0 for t in ch.logprobs.content)
            assert "".join(t.token for t in ch.logprobs.content).startswith(ch.message.content[:1])
        parts = list(c.chat.completions.create(model="m", messages=messages, max_tokens=6, n=2, temperature=0.9,
                                               seed=2, logprobs=True, top_logprobs=3, stream=True))
        for ch in sampled.choices:  # streamed with the same seed: the same two answers, the same logprobs
            mine = [p.choices[0] for p in parts if p.choices and p.choices[0].index == ch.index]
            assert "".join(m.delta.content or "" for m in mine) == ch.message.content
            assert [t.logprob for m in mine if m.logprobs for t in m.logprobs.content] == \
                [t.logprob for t in ch.logprobs.content]
            assert mine[-1].finish_reason == ch.finish_reason
    finally:
        stop(proc)
