"""What one owner's data leaves behind, and what opt-out and DP take back (issue 27, item 4).

On a finished pipeline (`make run`: its anchor, data, router embeddings and the other owners' packages), one
domain's owner plants canaries in its training data (flexolmo audit canaries) and trains its expert three ways:
normally and with DP-SGD at each --epsilons. Each is merged with the other owners' packages. For every model,
the canaries' exposure (mean per repeat count; max log2(candidates + 1) bits), the paper's extraction audit on
the domain's training documents, and bits per byte on the domain's validation documents:
  anchor, dense_expert (the expert alone as a dense model), owner (the 2-expert owner model), flexolmo,
  flexolmo_optout (the merge without the expert), owner_dp_e<E>, flexolmo_dp_e<E>.
The headline tested: opting the expert out brings exposure back to the anchor's (the per-canary difference
and its 95% bootstrap interval).

Every model and every measurement is written as it finishes (W/points/<model>.json) and skipped when found, so
an interrupted study resumes. The record (--name) and a table go to benchmarks/results/privacy/.

    python benchmarks/privacy.py --pipeline DIR --work W [--domain code] [--steps 50] [--epsilons 8,1]
        [--canaries 4] [--repeats 1,4,16] [--candidates 2000] [--prefixes 20] [--val-docs 20] [--chars 2000]
        [--preset smollm2] [--dtype auto] [--owner-docs 20 --owner-chars 2000] [--name tiny]

--owner-docs makes a small owner (its first N training documents): at the presets' owner budgets an owner sees
its whole split a small fraction of one time (tiny: 0.09 epochs), so a canary repeated 16 times is met about
once and nothing is memorised either way; a small owner meets each one several times.

On SmolLM2, DIR is a folder laid out as a pipeline's (outputs/anchor, outputs/prepare, outputs/domain_embedding,
outputs/expert/<other domains>/package: e.g. links into a quality_scaling SmolLM2 point) with --preset smollm2.

bpb here is sum of each document's NLL (first token unscored, audit.canaries.sequence_nll) over its UTF-8
bytes, on the first --chars characters: comparable across these models, not the evaluate stage's figure. Each
document's row is kept, so DP's bpb cost carries a 95% interval paired by document (points measured before the
rows were kept get them on resume; nothing else reruns)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import random
import time
from pathlib import Path

import numpy as np

from benchmarks.machine import recorded_stamp

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks/results/privacy"


def log(message: str) -> None:
    print(f"[privacy {time.strftime('%H:%M:%S')}] {message}", flush=True)


def train_owner(pipeline: Path, work: Path, data: Path, domain: str, canary_docs: Path, steps: int,
                epsilon: float | None, preset: str | None = None, dtype: str = "float32") -> Path:
    """The owner's package: the pipeline's expert settings (its preset, or `preset`) on `data` plus the canaries."""
    from flexolmo_core.training.config import ExpertConfig, load_stage
    from flexolmo_core.training.jobs import ExpertJob, train_expert_job
    from flexolmo_core.training.privacy import DPConfig

    name = "owner" if epsilon is None else f"owner_dp_e{epsilon:g}"
    out = work / name
    if (out / "package/manifest.json").exists():
        return out / "package"
    _, stage, loop = load_stage(ExpertConfig, "expert", pipeline / "params.yaml", domain=domain, preset=preset)
    if epsilon is not None:
        stage = dataclasses.replace(stage, dp=DPConfig(enabled=True, target_epsilon=epsilon, max_grad_norm=1.0,
                                                       delta=1e-5))
    loop = dataclasses.replace(loop, steps=steps, progress=True, dtype=dtype)
    log(f"training {name} ({steps} steps{'' if epsilon is None else f', DP epsilon {epsilon:g}'})")
    emb = pipeline / "outputs/domain_embedding"
    train_expert_job(ExpertJob(pipeline / "outputs/anchor/model", domain,
                               [data, canary_docs], out, stage, loop,
                               public_embedding=emb / "public", domain_embedding=emb / domain))
    return out / "package"


def build_models(pipeline: Path, work: Path, domain: str, packages: dict[str, Path]) -> dict[str, tuple[Path, list]]:
    """{model name: (folder, experts to exclude)}: merges, opt-out, owner models, the dense expert."""
    from flexolmo_core.expert.convert import export_package
    from flexolmo_core.merge.baselines import extract_dense_expert
    from flexolmo_core.merge.merging import expert_domains, merge

    anchor = pipeline / "outputs/anchor/model"
    others = sorted(p.parent for p in (pipeline / "outputs/expert").glob("*/package/manifest.json")
                    if p.parent.parent.name != domain)
    models = {"anchor": (anchor, [])}
    for name, package in packages.items():
        suffix = name.removeprefix("owner")
        merged, owner = work / f"flexolmo{suffix}", work / f"{name}_model"
        if not (merged / "flexolmo.json").exists():
            merge(anchor, [package, *others], merged)
        if not (owner / "flexolmo.json").exists():
            export_package(package, anchor, owner)
        models[f"flexolmo{suffix}"], models[name] = (merged, []), (owner, [])
    plain = work / "flexolmo"
    models["flexolmo_optout"] = (plain, [domain])  # the exact opt-out: the router masks the expert
    dense = work / "dense_expert"
    if not (dense / "flexolmo.json").exists():
        extract_dense_expert(plain, expert_domains(plain).index(domain), dense)
    models["dense_expert"] = (dense, [])
    return models


def validation_rows(model, tokenizer, val_texts: list[str]) -> list[list[float]]:
    """Each validation document's (loglikelihood in nats, UTF-8 bytes): the evaluation's per-document rows for
    held-out bpb, so intervals.value_of pools them and a bootstrap can resample documents."""
    from flexolmo_core.audit.canaries import sequence_nll

    nll = sequence_nll(model, tokenizer, val_texts, batch=4)
    return [[-round(float(n), 4), len(t.encode())] for n, t in zip(nll, val_texts)]


def save_point(path: Path, point: dict) -> dict:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(point, indent=2))
    tmp.replace(path)
    return json.loads(path.read_text())  # as a resumed run reads it (repeat counts as string keys)


def measure(name: str, folder: Path, exclude: list, work: Path, canaries, train_texts, val_texts, args) -> dict:
    from flexolmo_core.audit.canaries import exposure, exposure_table
    from flexolmo_core.audit.extraction import ExtractionConfig, extraction_audit
    from flexolmo_core.cli.commands.audit import scoring_model
    from flexolmo_core.evaluation.intervals import value_of

    path = work / "points" / f"{name}.json"
    settings = {k: getattr(args, k) for k in ("candidates", "prefixes", "val_docs", "chars", "owner_docs", "owner_chars")}
    if path.exists():
        point = json.loads(path.read_text())
        if point.get("settings", settings) != settings:  # points of earlier versions carry none
            raise SystemExit(f"{path}: measured with {point['settings']}, not {settings}: use another --work")
        if "val_docs" not in point:  # measured before per-document rows were kept: add them, nothing else reruns
            log(f"{name}: scoring the validation documents one by one (the point predates per-document rows)")
            point["val_docs"] = validation_rows(*scoring_model(str(folder), exclude, "cpu"), val_texts)
            if round(value_of(np.array(point["val_docs"]), 1.0), 4) != point["val_bpb"]:
                raise SystemExit(f"{path}: val_bpb {point['val_bpb']} is not what its documents give now")
            point = save_point(path, point)
        return point
    log(f"measuring {name}")
    start = time.time()
    model, tokenizer = scoring_model(str(folder), exclude, "cpu")
    exposures = [exposure(model, tokenizer, c, args.candidates, seed=0) for c in canaries]
    log(f"{name}: {len(canaries)} canaries ranked among {args.candidates} candidates ({time.time() - start:.0f} s)")
    extraction = extraction_audit(model, tokenizer, train_texts, ExtractionConfig(prefixes=args.prefixes))
    log(f"{name}: extraction {extraction['extracted']}/{extraction['documents']} ({time.time() - start:.0f} s)")
    rows = validation_rows(model, tokenizer, val_texts)
    return save_point(path, {
        "model": name, "folder": str(folder), "exclude": exclude, "settings": settings, "exposures": exposures,
        "by_repeats": exposure_table(exposures), "extraction": extraction,
        "val_bpb": round(value_of(np.array(rows), 1.0), 4), "val_docs": rows,
        "seconds": round(time.time() - start, 1)})


def difference_interval(a: list[float], b: list[float], draws: int = 10_000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of a - b (paired by canary) and its 95% bootstrap interval."""
    diffs = [x - y for x, y in zip(a, b)]
    rng = random.Random(seed)
    means = sorted(sum(rng.choice(diffs) for _ in diffs) / len(diffs) for _ in range(draws))
    return sum(diffs) / len(diffs), means[int(0.025 * draws)], means[int(0.975 * draws) - 1]


def bpb_difference(a: list[list[float]], b: list[list[float]], draws: int = 10_000, seed: int = 0) -> dict:
    """Pooled bpb of a minus b over the same documents (rows as validation_rows), and its 95% bootstrap
    interval: each draw resamples documents, the same for both models."""
    from flexolmo_core.evaluation.intervals import interval, value_of

    a, b = np.array(a), np.array(b)
    rng = np.random.default_rng(seed)
    picks = (rng.integers(0, len(a), len(a)) for _ in range(draws))
    low, high = interval([value_of(a[p], 1.0) - value_of(b[p], 1.0) for p in picks])
    return {"mean": value_of(a, 1.0) - value_of(b, 1.0), "low": low, "high": high}


def table(points: dict[str, dict], repeats: list[int]) -> list[str]:
    head = "| model | " + " | ".join(f"exposure x{r} (bits)" for r in repeats) + \
        " | extracted [95% interval] | mean similarity | val bpb | epsilon |"
    rows = [head, "|---" * (len(repeats) + 5) + "|"]
    for name, p in points.items():
        ex = p["extraction"]
        low, high = ex["interval_95"]
        eps = p.get("epsilon")
        rows.append(f"| {name} | " + " | ".join(f"{p['by_repeats'][str(r)]['mean_exposure']}" for r in repeats)
                    + f" | {ex['extracted']}/{ex['documents']} [{100 * low:.1f}%, {100 * high:.1f}%] | "
                    f"{ex['mean_similarity']} | {p['val_bpb']} | {'-' if eps is None else eps} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", required=True, help="a finished `make run` folder (anchor, data, packages)")
    parser.add_argument("--work", required=True, help="the study's folder (resumed when it exists)")
    parser.add_argument("--domain", default="code", help="the owner whose data gets the canaries")
    parser.add_argument("--steps", type=int, default=50, help="owner training steps (tiny's expert steps: 50)")
    parser.add_argument("--epsilons", default="8,1", help="DP variants' target epsilons (delta 1e-5)")
    parser.add_argument("--canaries", type=int, default=4, help="canaries per repeat count")
    parser.add_argument("--repeats", default="1,4,16", help="how often each canary is planted")
    parser.add_argument("--candidates", type=int, default=2000, help="random secrets each canary is ranked among")
    parser.add_argument("--prefixes", type=int, default=20, help="training documents in the extraction audit")
    parser.add_argument("--val-docs", type=int, default=20, help="validation documents for bpb")
    parser.add_argument("--chars", type=int, default=2000, help="characters of each validation document")
    parser.add_argument("--preset", default=None, help="the expert stage's preset (default: the pipeline's own; "
                        "smollm2 for a pipeline folder whose anchor is the imported SmolLM2)")
    parser.add_argument("--owner-docs", type=int, default=0,
                        help="a small owner: only the first N training documents, each cut at --owner-chars "
                             "(0: the whole split), so the owner's steps see each canary several times")
    parser.add_argument("--owner-chars", type=int, default=2000)
    parser.add_argument("--name", default="tiny", help="the record: benchmarks/results/privacy/NAME.json")
    parser.add_argument("--dtype", default="float32", help="owners' loop.dtype (auto: what the loop measures fastest)")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    from flexolmo_core.audit.canaries import plant, read_canaries, write_canaries
    from flexolmo_core.data.readers import read_texts

    pipeline, work = Path(args.pipeline), Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    repeats = [int(r) for r in args.repeats.split(",")]
    anchor = pipeline / "outputs/anchor/model"
    if not (work / "canaries/canaries.json").exists():
        write_canaries(plant(args.canaries, repeats, seed=0, tokenizer=AutoTokenizer.from_pretrained(anchor)),
                       work / "canaries")
    canaries = read_canaries(work / "canaries")
    epsilons = [float(e) for e in args.epsilons.split(",") if e.strip()]
    canary_docs = work / "canaries/documents.txt"
    train_texts = read_texts([pipeline / f"outputs/prepare/{args.domain}/train"])
    owner_data = pipeline / f"outputs/prepare/{args.domain}/train"
    if args.owner_docs:
        train_texts = [t[:args.owner_chars] for t in train_texts[:args.owner_docs]]
        owner_data = work / "owner_data/documents.jsonl"
        if not owner_data.exists():
            owner_data.parent.mkdir(parents=True, exist_ok=True)
            tmp = owner_data.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps({"text": t}) + "\n" for t in train_texts))
            tmp.replace(owner_data)
    packages = {"owner": train_owner(pipeline, work, owner_data, args.domain, canary_docs, args.steps, None,
                                     args.preset, args.dtype)}
    for eps in epsilons:
        packages[f"owner_dp_e{eps:g}"] = train_owner(pipeline, work, owner_data, args.domain, canary_docs, args.steps,
                                                     eps, args.preset, args.dtype)
    models = build_models(pipeline, work, args.domain, packages)
    val_texts = [t[:args.chars] for t in read_texts([pipeline / f"outputs/prepare/{args.domain}/validation"])[:args.val_docs]]
    points = {name: measure(name, folder, exclude, work, canaries, train_texts, val_texts, args)
              for name, (folder, exclude) in models.items()}
    owners = {}
    for name, package in packages.items():  # the guarantee each package records, and what training cost
        training = json.loads((package / "manifest.json").read_text())["training"]
        dp = training.get("dp")
        for model in (name, f"flexolmo{name.removeprefix('owner')}"):
            points[model]["epsilon"] = dp and dp["epsilon"]
        owners[name] = {k: training.get(k) for k in ("steps", "tokens", "dtype", "train_loss", "tokens_per_s",
                                                     "public_mix", "global_batch", "seq_len", "dp")}
    def scores(model: str, repeats: int | None) -> list[float]:  # canaries in planting order: paired across models
        return [e["exposure"] for e in points[model]["exposures"] if repeats in (None, e["repeats"])]

    top = max(repeats)
    headline = {}
    for model in [m for m in points if m != "anchor"]:  # each model against the anchor, which never saw them
        for subset, label in ((None, "all canaries"), (top, f"x{top} canaries")):
            headline[f"{model} - anchor ({label})"] = dict(zip(
                ("mean", "low", "high"), difference_interval(scores(model, subset), scores("anchor", subset))))
    dp_cost = {f"{model} - {plain}": bpb_difference(points[model]["val_docs"], points[plain]["val_docs"])
               for name in owners if name != "owner"
               for model, plain in ((name, "owner"), (f"flexolmo{name.removeprefix('owner')}", "flexolmo"))}
    record = {"recorded": recorded_stamp(), "args": vars(args), "points": points, "owners": owners,
              "exposure_difference": headline, "bpb_difference": dp_cost}
    RESULTS.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS / f"{args.name}.json.tmp"
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(RESULTS / f"{args.name}.json")
    print("\n".join(table(points, repeats)))
    for pair, v in headline.items():
        print(f"exposure {pair}: {v['mean']:+.3f} bits [{v['low']:+.3f}, {v['high']:+.3f}]")
    for pair, v in dp_cost.items():
        print(f"val bpb {pair}: {v['mean']:+.4f} [{v['low']:+.4f}, {v['high']:+.4f}]")


if __name__ == "__main__":
    main()
