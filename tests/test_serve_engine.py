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


def test_prefix_pooled_batches_decode_as_each_smaller_merge_does_without_the_cache(serve_merges):
    """serve.prefix_pool: the running mean is carried through the KV cache, padding stays out of it, and a
    masked expert is still exactly absent. Reference: greedy decoding with a full forward per token."""
    import torch

    from flexolmo_core.inference.model import load_flexolmo
    from flexolmo_core.serving.engine import decode_batch, load_handle

    def uncached(model_dir, prompt, n):
        loaded = load_flexolmo(model_dir, prefix_pool=0.5)
        ids = loaded.tokenizer(prompt, return_tensors="pt").input_ids
        for _ in range(n):
            with torch.no_grad():
                ids = torch.cat([ids, loaded.model(ids, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
        return ids[0, -n:].tolist()

    handle = load_handle(serve_merges["all"], prefix_pool=0.5)
    cases = [(PROMPTS[0], ["public", "code", "news"], "all"), (PROMPTS[1], ["public", "code"], "code"),
             (PROMPTS[2], ["public", "news"], "news")]
    jobs = [job(handle, p, allowed, 6) for p, allowed, _ in cases]
    jobs[0].handle.eos_ids = lambda: set()  # compare all 6 tokens of each: no early stop
    decode_batch(handle, jobs)
    for (prompt, allowed, ref), j in zip(cases, jobs):
        assert j.tokens == uncached(serve_merges[ref], prompt, 6), allowed
