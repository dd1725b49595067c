"""The public replay sample (shipped in the anchor folder) and the owner's public mix."""
from __future__ import annotations

import numpy as np
import pytest

from flexolmo_core.training.data import Order, TokenWindows
from flexolmo_core.training.replay import read_public_replay, with_public_mix, write_public_replay


def test_replay_round_trip_and_mix_fraction(tmp_path):
    public = TokenWindows(np.arange(100_000) % 5000, 63)  # 64-token windows with distinct content
    meta = write_public_replay(tmp_path, public, 6400, seed=3)
    assert meta["windows"] == 100 and meta["tokens"] == 6400
    assert sorted(p.name for p in (tmp_path / "public_replay").iterdir()) == ["replay.json", "tokens.safetensors"]
    replay = read_public_replay(tmp_path, 31)  # re-windowed at the owner's sequence length
    assert len(replay) == 6400 // 32
    stored = np.concatenate([np.asarray(replay[i]) for i in range(len(replay))])
    starts = {int(public[i][0]) for i in range(len(public))}
    assert stored[0] in starts  # whole public windows, not a shuffled token soup

    domain = TokenWindows(np.full(30_000, 7), 31)  # a domain whose every token is 7
    mixed = with_public_mix(domain, replay, 0.25)
    order = Order(len(mixed), seed=0)
    drawn = [int(np.asarray(mixed[order(g)])[0] != 7) for g in range(len(mixed))]
    assert abs(np.mean(drawn) - 0.25) < 0.01
    assert with_public_mix(domain, replay, 0.0) is domain


def test_missing_replay_and_bad_fraction_say_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="replay_tokens"):
        read_public_replay(tmp_path, 32)
    with pytest.raises(ValueError, match="public_mix"):
        with_public_mix(TokenWindows(np.zeros(100), 9), TokenWindows(np.zeros(100), 9), 1.0)
