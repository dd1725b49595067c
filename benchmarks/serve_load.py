"""Load on `flexolmo serve`: N concurrent clients with mixed expert sets for a bounded time.

    python benchmarks/serve_load.py --model outputs/merge/flexolmo --anchor outputs/anchor/model

Starts the server (a subprocess on 127.0.0.1), runs 1, 4 and 16 clients for --seconds each, and prints
generated tokens/s, p50/p95 latency and batched throughput over one-at-a-time throughput. Then, in this
process, the merged model's decode tokens/s (one sequence, greedy) against the dense anchor's, next to the
ratio of their active FLOPs per token (2 x active parameters; attention scores left out at these lengths).

--hostile: the first client count again, alongside one client that sends a 30 MiB prompt, waits --hostile-pause
seconds after each answer and sends it again; prints the normal clients' p95 latency with and without it (the goal: within 2x) and what the hostile
requests got back."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["The history of the", "def load(path):\n    ", "In the morning we", "import numpy as np\n", "The theorem states"]


def expert_sets(domains: list[str]) -> list[dict | None]:
    owners = [d for d in domains if d != "public"]
    return [None, {"only": ["public", owners[0]]}, {"exclude": owners[:1]}, {"only": ["public", *owners[1:3]]},
            {"exclude": owners}]


def run_clients(url: str, clients: int, seconds: float, max_tokens: int, domains: list[str],
                long_tokens: int | None = None) -> dict:
    """`clients` threads asking in a loop for `seconds`; with `long_tokens`, the odd-numbered clients ask for that
    many tokens and the even ones for `max_tokens` (a mix of short and long requests), reported apart."""
    import httpx

    sets, results, errors, stop = expert_sets(domains), [], [], time.monotonic() + seconds

    def client(i: int) -> None:
        n, tokens = i, long_tokens if long_tokens and i % 2 else max_tokens
        with httpx.Client(timeout=300) as http:
            while time.monotonic() < stop:
                body = {"prompt": PROMPTS[n % len(PROMPTS)], "max_tokens": tokens}
                if sets[n % len(sets)]:
                    body["experts"] = sets[n % len(sets)]
                start = time.perf_counter()
                r = http.post(f"{url}/v1/completions", json=body)
                if r.status_code != 200:
                    errors.append(r.status_code)
                else:
                    results.append((time.perf_counter() - start, r.json()["usage"]["completion_tokens"], tokens))
                n += clients

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    wall = time.perf_counter() - start
    row = {"clients": clients, "requests": len(results), "errors": len(errors), "wall_s": round(wall, 2),
           "tokens_per_s": round(sum(t for _, t, _ in results) / wall, 1), **percentiles(results)}
    if long_tokens:
        for kind, asked in (("short", max_tokens), ("long", long_tokens)):
            row[kind] = {"max_tokens": asked, **percentiles([r for r in results if r[2] == asked])}
    return row


def percentiles(results: list[tuple]) -> dict:
    latencies = sorted(lat for lat, *_ in results)
    return {"requests": len(latencies), "p50_s": round(statistics.median(latencies), 3) if latencies else None,
            "p95_s": round(latencies[int(0.95 * (len(latencies) - 1))], 3) if latencies else None}


def hostile_client(url: str, mb: int, pause: float, seconds: float) -> None:
    """Send an `mb` MiB prompt, `pause` s apart, for `seconds`; print one JSON line of (status, seconds) pairs.
    Run as its own process (`--hostile-client`), so that building and sending the bodies does not share the
    normal clients' interpreter."""
    import httpx

    body, got, stop = json.dumps({"prompt": "x" * (mb * 2**20), "max_tokens": 1}).encode(), [], time.monotonic() + seconds
    with httpx.Client(timeout=600) as http:
        while time.monotonic() < stop:
            start = time.perf_counter()
            try:
                r = http.post(f"{url}/v1/completions", content=body, headers={"Content-Type": "application/json"})
                got.append((r.status_code, time.perf_counter() - start))
            except httpx.HTTPError as err:  # the server may close the connection on a refused upload
                got.append((type(err).__name__, time.perf_counter() - start))
            time.sleep(pause)
    print(json.dumps(got))


def run_hostile(url: str, clients: int, seconds: float, max_tokens: int, domains: list[str], mb: int,
                pause: float) -> dict:
    """run_clients beside a hostile client process that sends an `mb` MiB prompt, `pause` s apart."""
    proc = subprocess.Popen([sys.executable, __file__, "--hostile-client", url, "--hostile-mb", str(mb),
                             "--hostile-pause", str(pause), "--seconds", str(seconds)], stdout=subprocess.PIPE, text=True)
    row = run_clients(url, clients, seconds, max_tokens, domains)
    got = json.loads(proc.communicate()[0].strip().splitlines()[-1])
    statuses = sorted({str(status) for status, _ in got})
    return {**row, "hostile_requests": len(got), "hostile_answers": statuses,
            "hostile_max_s": round(max((s for _, s in got), default=0), 3)}


def decode_speed(model, tokenizer, new_tokens: int, repeats: int = 3) -> float:
    import torch

    ids = tokenizer("The history of the", return_tensors="pt")
    best = float("inf")
    with torch.no_grad():
        for _ in range(repeats):
            start = time.perf_counter()
            model.generate(**ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                           pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
            best = min(best, time.perf_counter() - start)
    return new_tokens / best


def active_params(model) -> tuple[int, int]:
    """(total, active per token): an MoE uses top_k of its experts' FFN weights per token."""
    total = sum(p.numel() for p in model.parameters())
    cfg = model.config
    experts = getattr(cfg, "num_experts", None)
    if not experts:
        return total, total
    per_expert = sum(layer.mlp.experts.gate_up_proj[0].numel() + layer.mlp.experts.down_proj[0].numel()
                     for layer in model.model.layers)
    return total, total - (experts - cfg.num_experts_per_tok) * per_expert


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="outputs/merge/flexolmo", help="merged FlexOlmo checkpoint")
    parser.add_argument("--anchor", default="outputs/anchor/model", help="the dense anchor it was merged from")
    parser.add_argument("--clients", default="1,4,16", help="comma-separated client counts")
    parser.add_argument("--seconds", type=float, default=20.0, help="load time per client count")
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens per request")
    parser.add_argument("--mixed", type=int, default=0, metavar="LONG_TOKENS",
                        help="also a mixed load at the largest client count: half the clients ask for --max-tokens, "
                             "half for LONG_TOKENS; p50/p95 reported for each kind")
    parser.add_argument("--decode-tokens", type=int, default=64, help="tokens for the decode-speed comparison")
    parser.add_argument("--hostile", action="store_true", help="also run the first client count beside a client "
                        "sending 30 MB prompts, and compare the normal clients' p95")
    parser.add_argument("--hostile-mb", type=int, default=30, help="size of each hostile prompt, in MiB")
    parser.add_argument("--hostile-pause", type=float, default=1.0,
                        help="seconds the hostile client waits after each answer (0: a flood)")
    parser.add_argument("--no-decode", action="store_true", help="skip the merged vs dense decode-speed comparison")
    parser.add_argument("--hostile-client", metavar="URL", help=argparse.SUPPRESS)  # the hostile process itself
    args = parser.parse_args(argv)
    if args.hostile_client:
        hostile_client(args.hostile_client, args.hostile_mb, args.hostile_pause, args.seconds)
        return 0
    import httpx

    from benchmarks.harness import free_port, stop, wait_for
    from benchmarks.machine import machine

    print("machine:", json.dumps(machine()))
    port, tmp = free_port(), Path(tempfile.mkdtemp(prefix="serve-load-"))
    proc = subprocess.Popen([sys.executable, "-m", "flexolmo_core.cli.main", "serve", "--model", args.model, "--port",
                             str(port), "--audit-log", str(tmp / "audit.jsonl"), "--queue-depth", "256",
                             "--max-batch", "16"], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=(tmp / "serve.log").open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        def up():
            try:
                return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return proc.poll() is not None and sys.exit((tmp / "serve.log").read_text())

        wait_for(up, 180, "the server")
        domains = httpx.get(f"{url}/healthz").json()["experts"]
        print(f"server: {args.model} ({len(domains)} experts: {', '.join(domains)}), max_batch 16, "
              f"{args.max_tokens} tokens per request, mixed expert sets: {expert_sets(domains)}")
        rows = []
        for n in [int(c) for c in args.clients.split(",")]:
            rows.append(run_clients(url, n, args.seconds, args.max_tokens, domains))
            print(json.dumps(rows[-1]), flush=True)
        if args.mixed:
            n = max(int(c) for c in args.clients.split(","))
            mixed = run_clients(url, n, args.seconds, args.max_tokens, domains, long_tokens=args.mixed)
            print(json.dumps(mixed), flush=True)
        if args.hostile:
            n = int(args.clients.split(",")[0])
            hostile = run_hostile(url, n, args.seconds, args.max_tokens, domains, args.hostile_mb, args.hostile_pause)
            print(json.dumps(hostile), flush=True)
        batches = httpx.get(f"{url}/healthz").json()["batches"]
    finally:
        stop(proc)
    one = next((r for r in rows if r["clients"] == 1), None)
    print("\n| clients | requests | errors | tokens/s | p50 s | p95 s | vs 1 client |\n|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = f"{r['tokens_per_s'] / one['tokens_per_s']:.2f}x" if one and one["tokens_per_s"] else "n/a"
        print(f"| {r['clients']} | {r['requests']} | {r['errors']} | {r['tokens_per_s']} | {r['p50_s']} | "
              f"{r['p95_s']} | {ratio} |")
    print(f"(the engine admitted requests {batches} times)")
    if args.mixed:
        print(f"\nmixed load, {mixed['clients']} clients (half {args.max_tokens} tokens, half {args.mixed}): "
              f"{mixed['tokens_per_s']} tokens/s")
        print("| requests | count | p50 s | p95 s |\n|---|---|---|---|")
        for kind in ("short", "long"):
            k = mixed[kind]
            print(f"| {kind} ({k['max_tokens']} tokens) | {k['requests']} | {k['p50_s']} | {k['p95_s']} |")
    if args.hostile:
        calm = next(r for r in rows if r["clients"] == hostile["clients"])
        ratio = hostile["p95_s"] / calm["p95_s"] if calm["p95_s"] and hostile["p95_s"] else float("nan")
        print(f"\nhostile mix: {hostile['clients']} normal clients beside one sending {args.hostile_mb} MiB prompts "
              f"{args.hostile_pause} s apart "
              f"({hostile['hostile_requests']} sent, answered {', '.join(hostile['hostile_answers'])}, slowest "
              f"{hostile['hostile_max_s']} s): normal p95 {calm['p95_s']} -> {hostile['p95_s']} s ({ratio:.2f}x; "
              f"goal <= 2x), tokens/s {calm['tokens_per_s']} -> {hostile['tokens_per_s']}")
    if args.no_decode:
        return 0

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from flexolmo_core.inference.model import load_flexolmo

    merged = load_flexolmo(args.model)
    dense = AutoModelForCausalLM.from_pretrained(args.anchor, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.anchor)
    moe_speed, dense_speed = decode_speed(merged.model, merged.tokenizer, args.decode_tokens), \
        decode_speed(dense, tokenizer, args.decode_tokens)
    (moe_total, moe_active), (dense_total, _) = active_params(merged.model), active_params(dense)
    print(f"\ndecode, one sequence, greedy, {args.decode_tokens} tokens, best of 3 (torch threads "
          f"{torch.get_num_threads()}):")
    print(f"  merged FlexOlmo: {moe_speed:.1f} tokens/s ({moe_total:,} parameters, {moe_active:,} active per token)")
    print(f"  dense anchor:    {dense_speed:.1f} tokens/s ({dense_total:,} parameters)")
    print(f"  speed ratio dense/merged {dense_speed / moe_speed:.2f}x; active FLOPs ratio merged/dense "
          f"{moe_active / dense_total:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
