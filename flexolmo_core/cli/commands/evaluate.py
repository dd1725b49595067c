"""`flexolmo evaluate`: run a suite on one model variant by hand, or build the report from result JSONs."""
from __future__ import annotations

import json
from pathlib import Path

from flexolmo_core.anchor.families import is_moe
from flexolmo_core.cli.config import add_out, add_stage_args
from flexolmo_core.data.config import flexmix_domains
from flexolmo_core.errors import InputError, MissingInput
from flexolmo_core.evaluation import report, runner, suite, variants
from flexolmo_core.io.params import read_params
from flexolmo_core.merge.merging import MERGED_MANIFEST, read_manifest


def register(subparsers) -> None:
    p = subparsers.add_parser("evaluate", help="evaluate one model dir on a suite (offline lm-eval); or --report")
    p.add_argument("--model", help="HF checkpoint dir (a dense Olmo2/Llama model or a FlexOlmo/Mixtral MoE)")
    p.add_argument("--kind", default="hf", choices=["hf", "btm", "prompt_routing"],
                   help="hf: the model itself; btm: --model and --expert dirs are dense experts; "
                        "prompt_routing: --model is a merged FlexOlmo dir")
    p.add_argument("--expert", action="append", default=[], metavar="DIR", help="more dense experts for --kind btm")
    p.add_argument("--suite", default="smoke", help="flexolmo31 | flexolmo31_bpb | domains | all | smoke | task,task")
    add_out(p, "write the result JSON here (default: print it)", default=None)
    p.add_argument("--name", default=None, help="variant name in the result (default: the model dir name)")
    p.add_argument("--report", nargs=2, metavar=("RESULTS_DIR", "REPORT_DIR"),
                   help="instead: build results.md, plots and metrics from a directory of result JSONs")
    add_stage_args(p, ("evaluate",), runner.EvalConfig, "evaluate", params_default="params.yaml")
    p.set_defaults(func=cmd_evaluate)


def cmd_evaluate(args) -> int:
    if args.report:
        summary = report.write_report(args.report[0], args.report[1])
        print(f"report for {len(summary)} variants in {args.report[1]}/results.md")
        return 0
    if not args.model:
        raise InputError("--model is required (or --report RESULTS_DIR REPORT_DIR)")
    cfg = args.stage
    if cfg.domains is None:
        cfg.domains = _domains(args.model, args.params)
    paths = [args.model, *args.expert]
    missing = [p for p in paths if not (Path(p) / "config.json").exists()]
    if missing:
        raise MissingInput(f"not an HF checkpoint dir (no config.json): {missing}")
    variant = variants.Variant(args.name or Path(args.model).name, args.kind, paths,
                               flexolmo=is_moe(json.loads((Path(args.model) / "config.json").read_text())))
    result = variants.evaluate_variant(variant, suite.resolve_suite(args.suite, cfg.domains), cfg, out_json=args.out)
    if not args.out:
        print(json.dumps(result, indent=2))
    else:
        ran = sum(r["status"] == "ok" for r in result["tasks"].values())
        print(f"{variant.name}: {ran}/{len(result['tasks'])} tasks ran in {result['seconds']} s -> {args.out}")
    return 0


def _domains(model: str, params: str) -> list[str]:
    """The `domains` suite's domains: a merged model's experts, else public + params.yaml's domains."""
    experts = read_manifest(model).get("experts") if (Path(model) / MERGED_MANIFEST).exists() else None
    if experts:
        return [e["domain"] for e in sorted(experts, key=lambda e: e["index"])]
    if Path(params).exists() and read_params(params).get("domains"):
        return flexmix_domains(read_params(params)["domains"])
    return []
