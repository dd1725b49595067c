"""The record every evaluation data source yields, the error a source raises when its data is not on this
machine, and the round-robin that makes `--limit N` sample every subject. Shared by sources.py and
hub_sources.py (kept apart from both so neither imports the other's module for them)."""
from __future__ import annotations

import json


class DataUnavailable(RuntimeError):
    """The task's data (or judge) is not on this machine; the message is the `not run` reason."""


def doc_record(id, context, *, contexts=(), choices=(), gold=0, gold_continuation="", answers=(), extra=None):
    """One evaluation document in the form every task reads (the tasks' `doc_to_*` use these fields)."""
    return {
        "id": str(id), "context": context, "contexts": list(contexts), "choices": list(choices),
        "gold": int(gold), "gold_continuation": gold_continuation, "answers": [str(a) for a in answers],
        "extra": json.dumps(extra or {}, sort_keys=True),
    }


def interleave(groups: list[list[dict]]) -> list[dict]:
    """Round-robin over sub-sets so that `--limit N` samples every subject, not just the first."""
    out, i = [], 0
    while any(i < len(g) for g in groups):
        out.extend(g[i] for g in groups if i < len(g))
        i += 1
    return out
