"""Registry commands: `flexolmo publish PKG --registry DIR` and `flexolmo registry init|list|remove|verify|gc`.

Publishing by hand does not emit the Prefect event; `python -m flows.owner publish ...` does, or the
scheduled re-merge (flows/deploy.py) picks the package up on its next tick."""
from __future__ import annotations

import json

from flexolmo_core.registry.remote import open_registry, writable_registry

DEFAULT_REGISTRY = "runs/registry"
# The core CLI does not talk to Prefect (flexolmo_core is orchestration-free), so it says so instead of emitting.
NO_EVENT = ("no event was sent: the scheduled re-merge (python -m flows.deploy serve --cron ...) picks this "
            "expert up on its next run; `python -m flows.owner publish PKG --registry REG` publishes and emits "
            "flexolmo.expert.published, which starts the on-publish re-merge at once")


REGISTRY_HELP = "a registry folder or URL (file://, s3://, any fsspec URL)"


def register(subparsers) -> None:
    p = subparsers.add_parser("publish", help="validate an expert package and add it to a registry (atomic)")
    p.add_argument("package", metavar="PKG", help="expert package directory")
    p.add_argument("--registry", default=DEFAULT_REGISTRY, help=f"registry directory or fsspec URL, e.g. s3://bucket/registry (default {DEFAULT_REGISTRY})")
    p.add_argument("--replace", action="store_true", help="replace this domain's published package")
    p.set_defaults(func=cmd_publish)

    reg = subparsers.add_parser("registry", help="create, list, verify or edit an expert registry")
    sub = reg.add_subparsers(dest="registry_command", required=True, metavar="ACTION")
    p = sub.add_parser("init", help="create a registry for one anchor")
    p.add_argument("registry", help=REGISTRY_HELP)
    p.add_argument("--anchor", required=True, help="anchor checkpoint directory")
    p.set_defaults(func=cmd_init)
    p = sub.add_parser("list", help="published experts (JSON)")
    p.add_argument("registry", help=REGISTRY_HELP)
    p.set_defaults(func=cmd_list)
    p = sub.add_parser("verify", help="re-validate every published package")
    p.add_argument("registry", help=REGISTRY_HELP)
    p.set_defaults(func=cmd_verify)
    p = sub.add_parser("gc", help="list (or with --apply remove) what killed publishes and removed domains left")
    p.add_argument("registry", help=REGISTRY_HELP)
    p.add_argument("--apply", action="store_true", help="remove it (default: a dry run that only lists it)")
    p.set_defaults(func=cmd_gc)
    p = sub.add_parser("remove", help="unpublish a domain (its owner opts out)")
    p.add_argument("registry", help=REGISTRY_HELP)
    p.add_argument("domain", help="the domain whose expert leaves the registry")
    p.set_defaults(func=cmd_remove)


def cmd_publish(args) -> None:
    entry = writable_registry(args.registry).publish(args.package, replace=args.replace)
    print(json.dumps({"registry": args.registry, "domain": entry.domain, "sha256": entry.sha256,
                      "path": str(entry.path), "version": entry.version, "event_emitted": False,
                      "remerge": NO_EVENT}))


def cmd_init(args) -> None:
    index = writable_registry(args.registry).init(args.anchor)
    print(json.dumps({"registry": args.registry, "anchor_fingerprint": index["anchor_fingerprint"],
                      "experts": sorted(index["experts"])}))


def cmd_list(args) -> None:
    registry = open_registry(args.registry)
    index = registry.index()
    print(json.dumps({"anchor_fingerprint": index["anchor_fingerprint"], "version": index["version"],
                      "experts": {d: {"sha256": e.sha256, "path": str(e.path), "version": e.version,
                                      "privacy": e.privacy or "not trained with DP"}
                                  for d, e in registry.entries().items()}}, indent=2))


def cmd_verify(args) -> int:
    report = open_registry(args.registry).verify()
    print(json.dumps(report, indent=2))
    return 0 if all(v == "ok" for v in report.values()) else 1


def cmd_remove(args) -> None:
    writable_registry(args.registry).remove(args.domain)
    print(json.dumps({"registry": args.registry, "removed": args.domain}))


def cmd_gc(args) -> None:
    found = writable_registry(args.registry).gc(apply=args.apply)
    print(json.dumps({"registry": args.registry, "removed" if args.apply else "would_remove": found,
                      "bytes": sum(f["bytes"] for f in found),
                      **({} if args.apply or not found else {"hint": "run again with --apply to remove these"})},
                     indent=2))
