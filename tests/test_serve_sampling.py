"""The sampler on logits whose answer is known: greedy is argmax, top-k and top-p keep exactly the tokens they
should, the penalties follow OpenAI's definition, and a stop string ends the text at its first match."""
from __future__ import annotations

import torch

from flexolmo_core.serving.sampling import Sampling, choose, logprobs_of, penalised, stop_at

# probabilities 0.5, 0.25, 0.125, 0.0625, 0.0625
LOGITS = torch.log(torch.tensor([0.5, 0.25, 0.125, 0.0625, 0.0625]))


def draws(sampling: Sampling, n: int = 400) -> set[int]:
    g = sampling.generator()
    return {choose(LOGITS, sampling, [], g) for _ in range(n)}


def test_greedy_is_the_argmax_and_needs_no_generator():
    assert Sampling().generator() is None and choose(LOGITS, Sampling(), [], None) == 0


def test_top_k_and_top_p_keep_exactly_their_tokens():
    assert draws(Sampling(temperature=1, seed=0, top_k=2)) == {0, 1}
    assert draws(Sampling(temperature=1, seed=0, top_p=0.5)) == {0}  # 0.5 reached by the first token alone
    assert draws(Sampling(temperature=1, seed=0, top_p=0.7)) == {0, 1}
    assert draws(Sampling(temperature=1, seed=0)) == {0, 1, 2, 3, 4}


def test_a_seed_fixes_the_draws():
    s = Sampling(temperature=1, seed=11)
    first = [choose(LOGITS, s, [], g) for g in [s.generator()] for _ in range(50)]
    again = [choose(LOGITS, s, [], g) for g in [s.generator()] for _ in range(50)]
    assert first == again and len(set(first)) > 1


def test_penalties_subtract_per_occurrence_and_once_for_presence():
    out = penalised(torch.zeros(5), Sampling(frequency_penalty=0.5, presence_penalty=1.0), [2, 2, 4])
    assert out.tolist() == [0.0, 0.0, -2.0, 0.0, -1.5]


def test_logprobs_are_the_models_and_stop_strings_cut_at_the_first():
    lp, top = logprobs_of(LOGITS, 1, 2)
    assert abs(lp - float(torch.log(torch.tensor(0.25)))) < 1e-6 and [t for t, _ in top] == [0, 1]
    assert stop_at("abc\n\nxyz END", ("END", "\n\n")) == 3 and stop_at("abc", ("x",)) is None
