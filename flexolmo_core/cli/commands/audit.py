"""`flexolmo audit canaries` (plant canaries in an owner's data; measure a model's exposure to them) and
`flexolmo audit extraction` (the paper's extraction audit); `--exclude` measures the model with those experts
opted out."""
from __future__ import annotations

import json
from pathlib import Path

from flexolmo_core.anchor.families import is_moe
from flexolmo_core.audit.canaries import exposure, exposure_table, plant, read_canaries, write_canaries
from flexolmo_core.audit.extraction import ExtractionConfig, extraction_audit
from flexolmo_core.cli.config import add_out
from flexolmo_core.data.readers import read_texts
from flexolmo_core.errors import InputError, read_json
from flexolmo_core.inference.model import load_flexolmo
from flexolmo_core.io.dtypes import inference_dtype, resolve_device
from flexolmo_core.merge.merging import MERGED_MANIFEST


def register(subparsers) -> None:
    audit = subparsers.add_parser("audit", help="what an owner's data leaves behind in a model")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True, metavar="AUDIT")
    p = audit_sub.add_parser("canaries", help="plant canaries (--plant) or measure a model's exposure to them (--model)")
    p.add_argument("--plant", type=int, default=None, metavar="N", help="write N canaries per repeat count to --out")
    p.add_argument("--repeats", default="1,4,16", help="how many times each canary appears in the documents")
    p.add_argument("--tokenizer", default=None, metavar="ANCHOR",
                   help="with --plant: the anchor folder, whose tokenizer picks secrets of the most common length "
                        "(recommended: exposure ranks a secret among candidates of its own token count)")
    add_out(p, "with --plant: the canary folder to write (canaries.json, documents.txt)", default=None)
    p.add_argument("--model", default=None, help="a merged, dense or anchor checkpoint folder to measure")
    p.add_argument("--canaries", default=None, help="the canary folder --plant wrote")
    p.add_argument("--exclude", default="", help="experts to opt out, comma-separated (merged models only)")
    p.add_argument("--candidates", type=int, default=100_000, help="random secrets each canary is ranked among")
    p.add_argument("--seed", type=int, default=0, help="seed for the secrets and the candidates")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--json", action="store_true", help="print the per-canary results as JSON")
    p.set_defaults(func=cmd_canaries)

    p = audit_sub.add_parser("extraction", help="the paper's extraction audit: can the model reproduce training "
                                                "documents from their first tokens?")
    p.add_argument("--model", required=True, help="a merged, dense or anchor checkpoint folder")
    p.add_argument("--data", nargs="+", required=True, help="the domain's training documents (.txt/.jsonl files or "
                                                            "folders, or the prepare stage's split)")
    p.add_argument("--exclude", default="", help="experts to opt out, comma-separated (merged models only)")
    p.add_argument("--only", default=None, help="keep only these experts, comma-separated (merged models only)")
    p.add_arguments(ExtractionConfig, dest="audit")  # one flag per field, its comment as help
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--json", action="store_true", help="print the result (per document too) as JSON")
    p.set_defaults(func=cmd_extraction)


def cmd_extraction(args) -> int:
    names = lambda text: [e for e in (text or "").split(",") if e.strip()]  # noqa: E731
    model, tokenizer = scoring_model(args.model, names(args.exclude), args.device, names(args.only) or None)
    result = extraction_audit(model, tokenizer, read_texts(args.data), args.audit)
    if args.json:
        print(json.dumps({"model": args.model, "exclude": args.exclude, "only": args.only, **result}))
        return 0
    low, high = result["interval_95"]
    print(f"| model | documents | extracted | rate [95% interval] | mean similarity | max |\n|---|---|---|---|---|---|\n"
          f"| {args.model}{' without ' + args.exclude if args.exclude else ''} | {result['documents']} | "
          f"{result['extracted']} | {100 * result['rate']:.1f}% [{100 * low:.1f}, {100 * high:.1f}] | "
          f"{result['mean_similarity']} | {result['max_similarity']} |")
    return 0


def cmd_canaries(args) -> int:
    if (args.plant is None) == (args.model is None):
        raise InputError("give --plant N (with --out) to write canaries, or --model M (with --canaries) to measure")
    if args.plant is not None:
        if not args.out:
            raise InputError("--plant needs --out, the folder to write the canaries to")
        try:
            repeats = [int(r) for r in args.repeats.split(",") if r.strip()]
        except ValueError:
            raise InputError(f"--repeats must be comma-separated integers, got {args.repeats!r}") from None
        tokenizer = None
        if args.tokenizer:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
        canaries = plant(args.plant, repeats, args.seed, tokenizer)
        write_canaries(canaries, args.out, args.seed)
        print(f"wrote {len(canaries)} canaries to {args.out}/ (mix documents.txt into the owner's training data)")
        return 0
    if not args.canaries:
        raise InputError("--model needs --canaries, the folder --plant wrote")
    if args.candidates < 1:
        raise InputError(f"--candidates must be >= 1, got {args.candidates}")
    model, tokenizer = scoring_model(args.model, [e for e in args.exclude.split(",") if e.strip()], args.device)
    results = [exposure(model, tokenizer, c, args.candidates, args.seed) for c in read_canaries(args.canaries)]
    table = exposure_table(results)
    if args.json:
        print(json.dumps({"model": args.model, "exclude": args.exclude, "canaries": results, "by_repeats": table}))
        return 0
    print(f"exposure of {args.model}{' without ' + args.exclude if args.exclude else ''} "
          f"({args.candidates} candidates each; at most {max(r['exposure'] for r in results) if results else 0} "
          "bits seen)")
    print("| repeats | canaries | mean exposure (bits) | max |\n|---|---|---|---|")
    for r, row in table.items():
        print(f"| {r} | {row['canaries']} | {row['mean_exposure']} | {row['max_exposure']} |")
    return 0


def scoring_model(path: str, exclude: list[str], device: str, only: list[str] | None = None):
    """(model, tokenizer): a merged model through the inference loader (so --exclude is the exact opt-out), or
    any other causal LM checkpoint as transformers loads it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (Path(path) / MERGED_MANIFEST).exists() and is_moe(read_json(Path(path) / "config.json", what="model config")):
        loaded = load_flexolmo(path, exclude=exclude, only=only, device=device)
        return loaded.model, loaded.tokenizer
    if exclude or only:
        raise InputError(f"{path}: --exclude/--only need a merged model (a mixture of experts with {MERGED_MANIFEST}); "
                         "this one has no experts")
    where = resolve_device(device)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=inference_dtype(where, path)).to(where).eval()
    return model, AutoTokenizer.from_pretrained(path)
