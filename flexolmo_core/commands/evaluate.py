"""`flexolmo evaluate`: run a suite on one model variant by hand, or build the report from result JSONs."""
from __future__ import annotations

import json
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser("evaluate", help="evaluate one model dir on a suite (offline lm-eval); or --report")
    p.add_argument("--model", help="HF checkpoint dir (Olmo2ForCausalLM or FlexOlmoForCausalLM)")
    p.add_argument("--kind", default="hf", choices=["hf", "btm", "prompt_routing"],
                   help="hf: the model itself; btm: --model and --expert dirs are dense experts; "
                        "prompt_routing: --model is a merged FlexOlmo dir")
    p.add_argument("--expert", action="append", default=[], metavar="DIR", help="more dense experts for --kind btm")
    p.add_argument("--suite", default="smoke", help="flexolmo31 | flexolmo31_bpb | domains | all | smoke | task,task")
    p.add_argument("--limit", type=int, default=None, help="docs per task (default: params.yaml evaluate.limit)")
    p.add_argument("--top-k", type=int, default=None, help="FlexOlmo experts per token")
    p.add_argument("--domains-dir", default=None, help="held-out domain texts (<dir>/<domain>/test)")
    p.add_argument("--allow-code-execution", action="store_true", help="run generated code (HumanEval/MBPP)")
    p.add_argument("--params", default="params.yaml", help="read defaults from this file's `evaluate` section")
    p.add_argument("--out", default=None, help="write the result JSON here (default: print it)")
    p.add_argument("--name", default=None, help="variant name in the result (default: the model dir name)")
    p.add_argument("--report", nargs=2, metavar=("RESULTS_DIR", "REPORT_DIR"),
                   help="instead: build results.md, plots and metrics from a directory of result JSONs")
    p.set_defaults(func=cmd_evaluate)


def cmd_evaluate(args) -> int:
    from flexolmo_core.evaluation import report, runner, suite, variants
    from flexolmo_core.params import load_section

    if args.report:
        summary = report.write_report(args.report[0], args.report[1])
        print(f"report for {len(summary)} variants in {args.report[1]}/results.md")
        return 0
    if not args.model:
        raise ValueError("--model is required (or --report RESULTS_DIR REPORT_DIR)")
    cfg = load_section(runner.EvalConfig, "evaluate", args.params) if Path(args.params).exists() else runner.EvalConfig()
    if args.limit is not None:
        cfg.limit = cfg.gen_limit = cfg.domain_limit = args.limit
    if args.top_k is not None:
        cfg.top_k = args.top_k
    if args.domains_dir:
        cfg.domains_dir = args.domains_dir
    cfg.allow_code_execution = cfg.allow_code_execution or args.allow_code_execution
    paths = [args.model, *args.expert]
    missing = [p for p in paths if not (Path(p) / "config.json").exists()]
    if missing:
        raise FileNotFoundError(f"not an HF checkpoint dir (no config.json): {missing}")
    variant = variants.Variant(args.name or Path(args.model).name, args.kind, paths,
                               flexolmo="num_experts" in json.loads((Path(args.model) / "config.json").read_text()))
    result = variants.evaluate_variant(variant, suite.resolve_suite(args.suite), cfg, out_json=args.out)
    if not args.out:
        print(json.dumps(result, indent=2))
    else:
        ran = sum(r["status"] == "ok" for r in result["tasks"].values())
        print(f"{variant.name}: {ran}/{len(result['tasks'])} tasks ran in {result['seconds']} s -> {args.out}")
    return 0
