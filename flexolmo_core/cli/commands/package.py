"""`flexolmo package import|export|split`: published 2-expert models in, our packages out."""
from __future__ import annotations

import json

from flexolmo_core.cli.config import add_out
from flexolmo_core.expert.convert import export_package, import_package, split_merged


def register(subparsers) -> None:
    pkg = subparsers.add_parser("package", help="convert between expert packages and standalone MoE checkpoints")
    sub = pkg.add_subparsers(dest="package_command", required=True, metavar="ACTION")
    p = sub.add_parser("import", help="a 2-expert FlexOlmo or Mixtral checkpoint (expert 0 = the public FFN, "
                                      "expert 1 = the domain) as an expert package for ANCHOR")
    p.add_argument("--from", dest="source", required=True, metavar="DIR", help="the checkpoint folder (safetensors)")
    p.add_argument("--anchor", required=True, help="the anchor it was trained against (checked tensor by tensor)")
    p.add_argument("--domain", default=None, help="the domain name (default: from the checkpoint's flexolmo.json)")
    p.add_argument("--expert", type=int, default=1, help="which expert of the checkpoint to import (1..N-1)")
    add_out(p, "the package folder to write (atomically)")
    p.set_defaults(func=cmd_import)
    p = sub.add_parser("export", help="a package as a standalone 2-expert model (the anchor + that expert, top-2)")
    p.add_argument("package", help="the expert package folder")
    p.add_argument("--anchor", required=True, help="the anchor the package was trained against")
    add_out(p, "the model folder to write (atomically)")
    p.set_defaults(func=cmd_export)
    p = sub.add_parser("split", help="a merged N-expert model of ours back into N-1 packages, OUT/<domain>")
    p.add_argument("merged", help="the merged model folder (with flexolmo.json)")
    p.add_argument("--anchor", required=True, help="the anchor it was merged from")
    add_out(p, "the folder to write the packages into (atomically)")
    p.set_defaults(func=cmd_split)


def cmd_import(args) -> None:
    manifest = import_package(args.source, args.anchor, args.out, domain=args.domain, expert=args.expert)
    print(json.dumps({"package": args.out, "domain": manifest["domain"], "anchor_fingerprint": manifest["anchor_fingerprint"],
                      "max_abs_difference_from_anchor": manifest["training"]["max_abs_difference_from_anchor"]}))


def cmd_export(args) -> None:
    manifest = export_package(args.package, args.anchor, args.out)
    print(json.dumps({"model": args.out, "experts": [e["domain"] for e in manifest["experts"]], "top_k": manifest["top_k"]}))


def cmd_split(args) -> None:
    print(json.dumps({"packages": split_merged(args.merged, args.anchor, args.out)}))
