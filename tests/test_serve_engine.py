"""Serving's exactness: a request's answer under an expert set equals, token for token under greedy decoding,
the answer of the model merged with only those experts; also when requests with different expert sets
share one batch (one forward pass per step, a mask per sequence)."""
from __future__ import annotations

PROMPTS = ["def main(args):\n    return", "The history of the city", "import os\nimport", "In 1850 the"]


def reference(model_dir, prompt, max_new_tokens):
    from flexolmo_core.inference.model import generate, load_flexolmo

    return generate(load_flexolmo(model_dir), prompt, max_new_tokens=max_new_tokens)["token_ids"]


def job(handle, prompt, allowed, max_tokens):
    from flexolmo_core.serving.engine import Job

    return Job(handle=handle, prompt_ids=handle.tokenizer(prompt)["input_ids"], allowed=allowed, max_tokens=max_tokens)


def test_one_batch_mixing_expert_sets_matches_each_smaller_merge(serve_merges):
    from flexolmo_core.serving.engine import decode_batch, load_handle

    handle = load_handle(serve_merges["all"])
    cases = [(PROMPTS[0], ["public", "code", "news"], "all"), (PROMPTS[1], ["public", "code"], "code"),
             (PROMPTS[2], ["public", "news"], "news"), (PROMPTS[3], ["public", "code"], "code")]
    jobs = [job(handle, p, allowed, 6 + i) for i, (p, allowed, _) in enumerate(cases)]
    decode_batch(handle, jobs)  # one batch: different prompt lengths, expert sets and max_tokens
    for i, ((prompt, allowed, ref), j) in enumerate(zip(cases, jobs)):
        want = reference(serve_merges[ref], prompt, 6 + i)
        assert j.tokens == want[:len(j.tokens)] and (len(j.tokens) == len(want)), (allowed, j.tokens, want)
        share = j.attribution()
        assert set(share) == set(allowed) and abs(sum(share.values()) - 1) < 1e-3


def test_a_request_alone_matches_too_and_masked_experts_get_no_routing(serve_merges):
    from flexolmo_core.serving.engine import decode_batch, load_handle

    handle = load_handle(serve_merges["all"])
    alone = job(handle, PROMPTS[1], ["public", "news"], 8)
    decode_batch(handle, [alone])
    assert alone.tokens == reference(serve_merges["news"], PROMPTS[1], 8)
    assert float(alone.routing[handle.domains.index("code")]) == 0.0


def uncached(model_dir, prompt, n):
    """Greedy decoding with prefix pooling and a full forward per token (no KV cache, no running state)."""
    import torch

    from flexolmo_core.inference.model import load_flexolmo

    loaded = load_flexolmo(model_dir, prefix_pool=0.5)
    ids = loaded.tokenizer(prompt, return_tensors="pt").input_ids.to(loaded.model.device)
    for _ in range(n):
        with torch.no_grad():
            ids = torch.cat([ids, loaded.model(ids, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
    return ids[0, -n:].tolist()


def test_prefix_pooled_batches_decode_as_each_smaller_merge_does_without_the_cache(serve_merges):
    """serve.prefix_pool: the running mean is carried through the KV cache, padding stays out of it, and a
    masked expert is still exactly absent. Reference: greedy decoding with a full forward per token."""
    from flexolmo_core.serving.engine import decode_batch, load_handle

    handle = load_handle(serve_merges["all"], prefix_pool=0.5)
    cases = [(PROMPTS[0], ["public", "code", "news"], "all"), (PROMPTS[1], ["public", "code"], "code"),
             (PROMPTS[2], ["public", "news"], "news")]
    jobs = [job(handle, p, allowed, 6) for p, allowed, _ in cases]
    jobs[0].handle.eos_ids = lambda: set()  # compare all 6 tokens of each: no early stop
    decode_batch(handle, jobs)
    for (prompt, allowed, ref), j in zip(cases, jobs):
        assert j.tokens == uncached(serve_merges[ref], prompt, 6), allowed


def sampled(handle, prompt, allowed, max_tokens, **settings):
    from flexolmo_core.serving.sampling import Sampling

    j = job(handle, prompt, allowed, max_tokens)
    j.sampling = Sampling(**settings)
    return j


def test_a_seeded_request_samples_the_same_tokens_alone_and_in_any_batch(serve_merges):
    from flexolmo_core.serving.engine import decode_batch, load_handle

    handle = load_handle(serve_merges["all"])
    handle.eos_ids = lambda: set()  # all 12 tokens of each, no early stop
    settings = dict(temperature=1.0, top_p=0.95, seed=7)
    alone = sampled(handle, PROMPTS[1], ["public", "code"], 12, **settings)
    decode_batch(handle, [alone])
    neighbours = [sampled(handle, PROMPTS[0], ["public", "news"], 5, temperature=0.8, seed=1),
                  job(handle, PROMPTS[2], ["public", "code", "news"], 12)]
    batched = sampled(handle, PROMPTS[1], ["public", "code"], 12, **settings)
    decode_batch(handle, [neighbours[0], batched, neighbours[1]])
    assert batched.tokens == alone.tokens
    other_seed = sampled(handle, PROMPTS[1], ["public", "code"], 12, temperature=1.0, top_p=0.95, seed=8)
    decode_batch(handle, [other_seed])
    assert other_seed.tokens != alone.tokens  # the seed is what fixes them (12 tokens of a 2k vocabulary)


def test_logprobs_are_those_of_the_model_merged_without_the_masked_expert(serve_merges):
    """Served with news masked, each token's logprob (and its top alternatives) is the log-softmax of a plain
    forward pass of the merge that never had news, over the prompt and the tokens before it."""
    import torch

    from flexolmo_core.inference.model import load_flexolmo
    from flexolmo_core.serving.engine import decode_batch, load_handle

    handle = load_handle(serve_merges["all"])
    served = sampled(handle, PROMPTS[0], ["public", "code"], 6, temperature=0.9, seed=3, logprobs=3)
    decode_batch(handle, [served, job(handle, PROMPTS[3], ["public", "news"], 6)])
    smaller = load_flexolmo(serve_merges["code"]).model
    ids = torch.tensor([served.prompt_ids + served.tokens], device=smaller.device)
    with torch.no_grad():
        logp = torch.log_softmax(smaller(ids).logits[0].float(), dim=-1)
    start = len(served.prompt_ids) - 1
    for i, (token, (lp, top)) in enumerate(zip(served.tokens, served.logprobs)):
        assert abs(lp - float(logp[start + i, token])) < 1e-4, (i, lp, float(logp[start + i, token]))
        want = logp[start + i].topk(3)
        assert [t for t, _ in top] == want.indices.tolist()
        assert max(abs(v - w) for (_, v), w in zip(top, want.values.tolist())) < 1e-4


def test_stop_strings_end_the_text_and_penalties_change_the_choice(serve_merges):
    from flexolmo_core.serving.engine import decode_batch, load_handle

    handle = load_handle(serve_merges["all"])
    handle.eos_ids = lambda: set()
    free = job(handle, PROMPTS[0], ["public", "code", "news"], 10)
    decode_batch(handle, [free])
    text = handle.tokenizer.decode(free.tokens, skip_special_tokens=True)
    stop = text[len(text) // 2:len(text) // 2 + 2]  # two characters from the middle of the greedy answer
    cut = sampled(handle, PROMPTS[0], ["public", "code", "news"], 10, stop=(stop,))
    decode_batch(handle, [cut])
    assert cut.finish_reason == "stop" and len(cut.tokens) < 10 and cut.tokens == free.tokens[:len(cut.tokens)]
    assert cut.text_end == text.find(stop)
    repeated = len(free.tokens) - len(set(free.tokens))
    penalised = sampled(handle, PROMPTS[0], ["public", "code", "news"], 10, frequency_penalty=2.0, presence_penalty=2.0)
    decode_batch(handle, [penalised])
    assert repeated > 0 and len(penalised.tokens) - len(set(penalised.tokens)) < repeated


def test_requests_that_join_and_leave_mid_decode_stay_exact(serve_merges):
    """Continuous batching: a request joins after the first has run some steps (a shorter prompt, then a longer
    one than the running cache is wide), rows leave when done; each sequence still equals the merge with only
    its experts, and a seeded sampled one equals itself decoded alone."""
    from flexolmo_core.serving.engine import Running, decode_batch, load_handle

    handle = load_handle(serve_merges["all"])
    handle.eos_ids = lambda: set()
    long = job(handle, PROMPTS[1], ["public", "code", "news"], 14)
    short = job(handle, "x", ["public", "code"], 3)
    wide = job(handle, PROMPTS[0] + " " + PROMPTS[2] + " " + PROMPTS[3], ["public", "news"], 6)
    seeded = sampled(handle, PROMPTS[2], ["public", "code"], 8, temperature=1.0, seed=4)
    running = Running(handle)
    running.admit([long])
    for _ in range(3):
        running.step()
    running.admit([short, seeded])  # prompts shorter than the running rows' width
    running.step()
    running.step()
    running.admit([wide])  # a prompt wider than the running cache
    assert len(running.jobs) == 3  # `short` has already left
    while running.jobs:
        running.step()
    for j, ref in ((long, "all"), (short, "code"), (wide, "news")):
        want = reference(serve_merges[ref], handle.tokenizer.decode(j.prompt_ids), j.max_tokens)
        assert j.tokens == want and j.finish_reason == "length", (ref, j.tokens, want)
    alone = sampled(handle, PROMPTS[2], ["public", "code"], 8, temperature=1.0, seed=4)
    decode_batch(handle, [alone])
    assert seeded.tokens == alone.tokens


def test_a_short_request_is_answered_while_a_long_one_still_runs(monkeypatch):
    """The engine loop admits a request beside running ones and hands it back as soon as it is done, not when the
    longest is (the rows themselves are `Running`, tested above; here a stand-in takes 5 ms per step)."""
    import threading
    import time

    import flexolmo_core.serving.engine as engine

    class SlowRunning:
        def __init__(self, handle):
            self.handle, self.jobs = handle, []

        def admit(self, jobs):
            self.jobs += jobs

        def step(self):
            time.sleep(0.005)
            for j in list(self.jobs):
                j.tokens.append(0)
                if len(j.tokens) >= j.max_tokens:
                    j.finish_reason = "length"
                    self.jobs.remove(j)
                    j.on_done(j)

    monkeypatch.setattr(engine, "Running", SlowRunning)
    answered = threading.Event()
    seen = {}

    def on_done(j):
        seen[j.max_tokens] = len(long.tokens)  # how far the long one had got when this one was answered
        answered.set() if j.max_tokens == 3 else None

    handle = object()
    long = engine.Job(handle=handle, prompt_ids=[1], allowed=["public"], max_tokens=400, on_done=on_done)
    short = engine.Job(handle=handle, prompt_ids=[1], allowed=["public"], max_tokens=3, on_done=on_done)
    eng = engine.Engine(handle, max_batch=4, batch_wait_ms=0)
    try:
        eng.submit(long)
        while not long.tokens:
            time.sleep(0.001)
        eng.submit(short)
        assert answered.wait(10)
    finally:
        eng.stop()
    assert 3 <= seen[3] < 400  # answered after its own 3 tokens, long before the long one's 400


def test_prefix_pooled_rows_that_join_mid_decode_keep_their_own_running_mean(serve_merges):
    """Continuous batching with serve.prefix_pool: the joining rows' prefill starts their sums, the running rows'
    sums stay theirs, and a row that leaves takes its sums with it. Checked on the logprobs (to 1e-4), which any
    mix-up of the running means would move, against a full forward of the smaller merge with pooling."""
    import torch

    from flexolmo_core.inference.model import load_flexolmo
    from flexolmo_core.serving.engine import Running, load_handle

    handle = load_handle(serve_merges["all"], prefix_pool=0.5)
    handle.eos_ids = lambda: set()
    first = sampled(handle, PROMPTS[0], ["public", "code", "news"], 8, logprobs=0)
    gone = sampled(handle, "x", ["public", "news"], 2, logprobs=0)
    late = sampled(handle, PROMPTS[1], ["public", "code"], 5, logprobs=0)
    running = Running(handle)
    running.admit([first, gone])
    running.step()  # `gone` leaves here
    running.step()
    running.admit([late])
    while running.jobs:
        running.step()
    for j, ref in ((first, "all"), (gone, "news"), (late, "code")):
        assert j.tokens == uncached(serve_merges[ref], handle.tokenizer.decode(j.prompt_ids), j.max_tokens), ref
        model = load_flexolmo(serve_merges[ref], prefix_pool=0.5).model
        with torch.no_grad():
            ids = torch.tensor([j.prompt_ids + j.tokens], device=model.device)
            logp = torch.log_softmax(model(ids, use_cache=False).logits[0].float(), -1)
        start = len(j.prompt_ids) - 1
        got = [lp for lp, _ in j.logprobs]
        want = [float(logp[start + i, t]) for i, t in enumerate(j.tokens)]
        assert max(abs(a - b) for a, b in zip(got, want)) < 1e-4, (ref, got, want)
