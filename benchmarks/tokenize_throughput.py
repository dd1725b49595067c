"""Tokenization throughput of our packing path vs a plain `tokenizers` batch encode of the same text.

    python benchmarks/tokenize_throughput.py [--prepared outputs/prepare] [--tokenizer outputs/tokenizer/tokenizer]

Ours = tokenize_documents (encode_batch_fast + EOS + one uint16 stream), the work the tokenizer stage does
per split. Baseline = Tokenizer.encode_batch on the same documents, ids discarded."""
from __future__ import annotations

import argparse
import json
import time

from tokenizers import Tokenizer

from flexolmo_core.data.packing import tokenize_documents
from flexolmo_core.data.prepare import SPLITS, load_split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prepared", default="outputs/prepare")
    parser.add_argument("--tokenizer", default="outputs/tokenizer/tokenizer")
    parser.add_argument("--domains", nargs="+", default=None, help="default: public + params.yaml's domains")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    if args.domains is None:
        from flexolmo_core.data.config import flexmix_domains
        from flexolmo_core.io.params import read_params

        args.domains = flexmix_domains(read_params("params.yaml")["domains"])
    tok = Tokenizer.from_file(f"{args.tokenizer}/tokenizer.json")
    eos = tok.token_to_id("<|endoftext|>")
    texts = [t for d in args.domains for s in SPLITS for t in load_split(args.prepared, d, s)["text"]]
    chars = sum(map(len, texts))

    def best(fn):
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            n = fn()
            times.append(time.perf_counter() - t0)
        return n, min(times)

    n_base, t_base = best(lambda: sum(len(e.ids) for e in tok.encode_batch(texts, add_special_tokens=False)))
    n_ours, t_ours = best(lambda: len(tokenize_documents(texts, tok, eos)))
    print(json.dumps({
        "documents": len(texts), "characters": chars,
        "baseline_encode_batch": {"tokens": n_base, "seconds": round(t_base, 2), "tokens_per_s": round(n_base / t_base)},
        "ours_pack_stream": {"tokens": n_ours, "seconds": round(t_ours, 2), "tokens_per_s": round(n_ours / t_ours),
                             "note": "tokens include one EOS per document"},
    }, indent=2))


if __name__ == "__main__":
    main()
