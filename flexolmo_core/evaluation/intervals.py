"""95% bootstrap intervals over documents for every number the report derives, paired across models.

Each draw resamples, for every task, its documents with replacement (the same documents for every model:
paired), recomputes each task's value from its per-document values (`runner.doc_values`: a mean, or for held-out
bpb the ratio -sum(loglikelihood) / sum(bytes) / ln 2, lm-eval's own aggregation), and hands the resampled
results to the same code that made the point estimates. So a group Avg., a domain mean, an opt-out share or a
check ("A beats B") gets its interval without a second implementation of it.

A check is PASS when it holds in at least 97.5% of the draws, FAIL when it holds in at most 2.5%, and
inconclusive otherwise: for a comparison with one threshold that is exactly "the 95% interval excludes the
threshold". Tasks without per-document values (results written before they were recorded) keep their point
value in every draw, which understates the uncertainty; `coverage` says how many tasks had them."""
from __future__ import annotations

import math

import numpy as np

import flexolmo_core.evaluation.suite as suite

ITERS = 1000  # draws: the 2.5% and 97.5% quantiles move by about 0.01 of the interval from one seed to another
LEVEL = 0.95
LN2 = math.log(2)


def task_ids(results: dict[str, dict]) -> dict[str, list]:
    """task -> the document ids some model scored (the union: models normally score the same documents)."""
    ids: dict[str, set] = {}
    for res in results.values():
        for name, rec in res.get("tasks", {}).items():
            if rec.get("docs"):
                ids.setdefault(name, set()).update(d[0] for d in rec["docs"])
    return {name: sorted(found) for name, found in ids.items()}


def value_of(docs: np.ndarray, scale: float) -> float | None:
    """A task's value from its per-document rows (columns after the id): mean x scale, or held-out bpb."""
    if len(docs) == 0 or np.isnan(docs).any():
        return None
    if docs.shape[1] == 2:  # (loglikelihood, bytes): bits per byte over the pooled bytes, as lm-eval aggregates
        return float(-docs[:, 0].sum() / docs[:, 1].sum() / LN2)
    return float(docs[:, 0].mean() * scale)


def aligned(results: dict[str, dict], ids: dict[str, list]) -> dict[tuple[str, str], tuple[np.ndarray, float]]:
    """(model, task) -> (rows in the order of `ids[task]`, NaN where that model lacks a document; scale)."""
    out = {}
    for model, res in results.items():
        for name, rec in res.get("tasks", {}).items():
            if name not in ids or not rec.get("docs") or rec.get("value") is None:
                continue
            by_id = {d[0]: d[1:] for d in rec["docs"]}
            width = len(rec["docs"][0]) - 1
            rows = np.array([by_id.get(i, [math.nan] * width) for i in ids[name]], dtype=float)
            scale = 100.0 if suite.spec_of(name)[1] == "primary" else 1.0  # accuracies are reported 0-100 (runner)
            out[model, name] = (rows, scale)
    return out


def draws(results: dict[str, dict], iters: int = ITERS, seed: int = 0):
    """Yield `iters` resampled versions of `results` (only the tasks' values change). One object is reused: a
    draw is valid until the next one is made, so read it (e.g. `report.summarize`) before asking for more."""
    ids = task_ids(results)
    rows = aligned(results, ids)
    rng = np.random.default_rng(seed)
    draw = {m: {**res, "tasks": {n: dict(r) for n, r in res.get("tasks", {}).items()}} for m, res in results.items()}
    for _ in range(iters):
        picks = {name: rng.integers(0, len(found), len(found)) for name, found in ids.items()}
        for (model, name), (table, scale) in rows.items():
            draw[model]["tasks"][name]["value"] = value_of(table[picks[name]], scale)
        yield draw


def coverage(results: dict[str, dict]) -> tuple[int, int]:
    """(tasks with per-document values, tasks that ran), over every model."""
    ran = [rec for res in results.values() for rec in res.get("tasks", {}).values() if rec.get("value") is not None]
    return sum(bool(rec.get("docs")) for rec in ran), len(ran)


def interval(values: list[float | None]) -> tuple[float, float] | None:
    """The central LEVEL interval of the draws' values (None when any draw had no value)."""
    if not values or any(v is None for v in values):
        return None
    tail = (1 - LEVEL) / 2 * 100
    lo, hi = np.percentile(np.asarray(values, dtype=float), [tail, 100 - tail])
    return float(lo), float(hi)


def verdict(point: bool | None, held: list[bool | None]) -> tuple[str, float | None]:
    """(PASS / FAIL / inconclusive / n/a, share of draws in which the check held). A draw in which the check
    could not be decided (e.g. no gain to lose) counts as not holding; n/a when the point estimate itself
    cannot decide it."""
    if point is None or not held:
        return "n/a", None
    share = sum(bool(h) for h in held) / len(held)
    tail = (1 - LEVEL) / 2
    return ("PASS" if share >= 1 - tail else "FAIL" if share <= tail else "inconclusive"), share
