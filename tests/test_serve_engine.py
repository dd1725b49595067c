"""Serving's exactness: a request's answer under an expert set equals, token for token under greedy decoding,
the answer of the model merged with only those experts; also when requests with different expert sets
share one batch (one forward pass per step, a mask per sequence)."""
from __future__ import annotations

PROMPTS = ["def main(args):\n    return", "The history of the city", "import os\nimport", "In 1850 the"]


def reference(model_dir, prompt, max_new_tokens):
    from flexolmo_core.inference import generate, load_flexolmo

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
