"""The audit log: one JSON line per request, appended and flushed to disk before the answer leaves, so a
crash loses at most the request in flight. Data owners read it to see how their expert was used."""
from __future__ import annotations

import json
import os
import threading
import time
from collections import defaultdict
from pathlib import Path

from flexolmo_core.errors import InputError, MissingInput


class AuditLog:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        # O_APPEND: every write lands at the end, whole, even with other writers
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)

    def write(self, record: dict) -> None:
        line = (json.dumps({"time": round(time.time(), 3), **record}, sort_keys=True) + "\n").encode()
        with self._lock:
            os.write(self._fd, line)
            os.fsync(self._fd)

    def close(self) -> None:
        os.close(self._fd)


def read_log(path: str | os.PathLike) -> list[dict]:
    path = Path(path)
    if not path.exists():
        raise MissingInput(f"{path}: no audit log here")
    records, lines = [], path.read_text().splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if n == len(lines):
                continue  # a last line cut by a crash
            raise InputError(f"{path}:{n}: not a JSON line ({err.msg})") from err
    return records


def usage_table(records: list[dict], by: str = "expert") -> list[dict]:
    """Per expert: requests that used it, generated tokens routed to it (attribution share x tokens),
    requests that asked for it but were refused or masked. Per principal: requests, tokens, statuses."""
    rows = defaultdict(lambda: defaultdict(float))
    for r in records:
        if by == "expert":
            for expert, share in (r.get("attribution") or {}).items():
                rows[expert]["requests using it"] += share > 0
                rows[expert]["tokens (share-weighted)"] += share * (r.get("completion_tokens") or 0)
            for expert in r.get("masked") or []:
                rows[expert]["masked"] += 1
            for expert in r.get("forbidden") or []:
                rows[expert]["refused"] += 1
        else:
            row = rows[r.get("principal") or "(none)"]
            row["requests"] += 1
            row["completion tokens"] += r.get("completion_tokens") or 0
            row[f"status {r.get('status')}"] += 1
    columns = sorted({c for row in rows.values() for c in row})
    return [{by: name, **{c: round(row.get(c, 0), 1) for c in columns}} for name, row in sorted(rows.items())]
