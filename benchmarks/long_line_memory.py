"""Peak memory of reading one huge single-line document into training windows (issue: a 50 MB line once
cost 8 GB in `expert train`). Each path runs in a fresh process; ru_maxrss is its peak resident memory.

    python benchmarks/long_line_memory.py [--mb 50] [--tokenizer DIR]

`ours` = open_windows on a .txt file (the expert-train path: document_pieces + tokenize_documents);
`whole` = the same text through the transformers tokenizer in one call, as the old path did (skip with
--no-whole: it needs several GB)."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.machine import machine

CHILD = r"""
import resource, sys, time
from pathlib import Path
path, tokenizer, how = sys.argv[1:4]
t0 = time.perf_counter()
if how == "ours":
    from flexolmo_core.training.data import open_windows
    n = len(open_windows([Path(path)], 256, tokenizer).tokens)
else:
    from transformers import AutoTokenizer
    n = len(AutoTokenizer.from_pretrained(tokenizer)(Path(path).read_text(), add_special_tokens=False)["input_ids"])
print(n, time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=50.0)
    ap.add_argument("--tokenizer", default="outputs/tokenizer/tokenizer")
    ap.add_argument("--no-whole", action="store_true")
    args = ap.parse_args()
    words = ("the quick brown fox jumps over the lazy dog 1234 ; " * 64)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "line.txt"
        with open(path, "w") as f:
            for _ in range(int(args.mb * 2**20 / len(words))):
                f.write(words)
            f.write("\n")
        rows = {}
        for how in ("ours",) + (() if args.no_whole else ("whole",)):
            out = subprocess.run([sys.executable, "-c", CHILD, str(path), args.tokenizer, how], capture_output=True,
                                 text=True)
            if out.returncode:
                rows[how] = {"error": out.stderr.strip().splitlines()[-1] if out.stderr else out.returncode}
                continue
            tokens, seconds, peak_mb = out.stdout.split()
            rows[how] = {"tokens": int(tokens), "seconds": round(float(seconds), 2), "peak_rss_mb": round(float(peak_mb), 1)}
    print(json.dumps({"document_mb": args.mb, "paths": rows, "machine": machine()}, indent=2))


if __name__ == "__main__":
    main()
