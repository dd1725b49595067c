"""`flexolmo serve` (the policy-aware OpenAI-compatible server) and `flexolmo usage` (the audit log's summary)."""
from __future__ import annotations

import json

from flexolmo_core.cli.config import add_stage_args
from flexolmo_core.serving.audit import read_log, usage_table
from flexolmo_core.serving.config import ServeConfig
from flexolmo_core.serving.policy import hash_key


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve a merged model over an OpenAI-compatible API with per-request "
                                            "expert choice, owners' policies and an audit log")
    p.add_argument("--model", default=None, help="a merged FlexOlmo checkpoint folder")
    p.add_argument("--releases", default=None, metavar="DIR",
                   help="instead of --model: the re-merge flow's releases folder; serves current.json's release and "
                        "switches to each new one without downtime")
    p.add_argument("--policy", default=None, metavar="YAML",
                   help="owners' access policy (keys as sha256, who may use which expert); reloaded when it "
                        "changes; omitted: no keys, every expert open")
    p.add_argument("--hash-key", default=None, metavar="KEY", help="print KEY's sha256 for a policy file and exit")
    add_stage_args(p, ("serve",), ServeConfig, "serve", params_default="params.yaml")
    p.set_defaults(func=cmd_serve)

    p = subparsers.add_parser("usage", help="summarise a serve audit log: how each expert (or principal) was used")
    p.add_argument("--log", required=True, help="the audit log (serve.audit_log)")
    p.add_argument("--by", choices=["expert", "principal"], default="expert", help="one row per expert or per principal")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_usage)


def cmd_serve(args) -> int:
    if args.hash_key is not None:
        print(hash_key(args.hash_key))
        return 0
    from flexolmo_core.serving.app import run

    run(args.stage, model=args.model, releases=args.releases, policy=args.policy)
    return 0


def cmd_usage(args) -> int:
    rows = usage_table(read_log(args.log), by=args.by)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"{args.log}: no requests")
        return 0
    columns = list(rows[0])
    widths = [max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(str(r.get(c, "")).ljust(w) for c, w in zip(columns, widths)))
    return 0
