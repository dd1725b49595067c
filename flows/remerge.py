"""Re-merge when the registry changed: compare the registry with the current release's manifest; if they
differ, merge the anchor with every published package into a new version, check and evaluate it, and
make it current. Idempotent: with nothing new it does nothing, and concurrent runs serialise on a lock.

    python -m flows.remerge --registry runs/registry --anchor outputs/anchor/model --releases runs/releases

    <releases>/v0001/, v0002/, ...   merged FlexOlmo checkpoints (flexolmo.json records the release)
    <releases>/current.json         {"version", "path", "experts": {domain: sha256}, ...}; replaced atomically"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from prefect import flow, get_run_logger, task

import flows  # noqa: F401  (offline environment defaults, before prefect is imported)
from flows import artifacts

CURRENT = "current.json"


def releases_lock(releases: Path):
    from flexolmo_core.io.atomic import locked

    return locked(releases / ".lock")


def current_release(releases: Path) -> dict | None:
    path = releases / CURRENT
    return json.loads(path.read_text()) if path.exists() else None


@task
def merge_release(anchor: str, packages: list[str], out: str, top_k: int | None, extra: dict) -> dict:
    from flexolmo_core.merge.merging import merge

    return merge(anchor, packages, out, top_k=top_k, extra_manifest=extra)


@task
def check_release(model: str, experts: list[str]) -> str:
    """Load the release with plain transformers through the core's loader and generate a few tokens with
    every expert enabled: the release must load, run and report attribution over exactly its experts."""
    from flexolmo_core.inference.model import generate, load_flexolmo

    result = generate(load_flexolmo(model), "The", max_new_tokens=4)
    seen = sorted(result["attribution"])
    if seen != sorted(experts):
        raise RuntimeError(f"{model}: attribution over {seen}, expected {sorted(experts)}")
    return f"generated {len(result['text'])} chars; attribution over {', '.join(seen)}"


@task(log_prints=False)  # dill (through datasets) prints a disassembly into a captured stdout that log_prints steals
def evaluate_release(model: str, out_json: str, params: str, suites: list[str]) -> dict | None:
    """The evaluation stage's own functions on the release (held-out domain bpb by default)."""
    from flexolmo_core.evaluation import runner, suite, variants
    from flexolmo_core.io.params import load_section

    cfg = load_section(runner.EvalConfig, "evaluate", params)
    if cfg.domains_dir and not Path(cfg.domains_dir).exists() and "domains" in suites:
        get_run_logger().warning(f"evaluation not run: held-out data {cfg.domains_dir} is not here")
        return None
    from flexolmo_core.merge.merging import expert_domains

    tasks_ = [t for s in suites for t in suite.resolve_suite(s, cfg.domains or expert_domains(model))]
    variant = variants.Variant("flexolmo", "hf", [model], flexolmo=True, note="release")
    return variants.evaluate_variant(variant, tasks_, cfg, out_json=out_json)


def heldout_bpb(result: dict | None) -> dict:
    """The release's mean held-out bpb over the domains it was evaluated on (what the report calls domain bpb)."""
    from flexolmo_core.evaluation.report import summarize

    if result is None:
        return {}
    s = summarize({"release": result})["release"]
    ran = sorted(d for d, v in s["domains_bpb"].items() if v is not None)
    return {"heldout_bpb": s["domains_bpb_avg"], "heldout_domains": ran} if ran else {}


@flow(name="remerge", log_prints=True)
def remerge(registry: str, anchor: str, releases: str = "runs/releases", top_k: int | None = None,
            evaluate: bool = True, params: str = "params.yaml", suites: list[str] | None = None) -> dict:
    """Merge a new release if the registry differs from the current one; returns what happened."""
    from flexolmo_core.io.atomic import write_json
    from flexolmo_core.merge.merging import read_manifest
    from flexolmo_core.registry.local import merged_contents
    from flexolmo_core.registry.remote import open_registry

    log = get_run_logger()
    reg, rel = open_registry(registry), Path(releases).resolve()  # a URL is pulled into its local mirror
    with releases_lock(rel):
        wanted, current = reg.contents(), current_release(rel)
        if current is not None:
            have = merged_contents(read_manifest(current["path"]))
            if have == wanted:
                log.info(f"release v{current['version']} already holds the registry's {len(wanted)} expert(s); nothing to do")
                return {"changed": False, **current}
        if not wanted:
            log.info("the registry is empty; nothing to merge")
            return {"changed": False, "version": None}
        index = reg.index()
        version = (current["version"] if current else 0) + 1
        out = rel / f"v{version:04d}"
        extra = {"release": version, "registry_version": index["version"], "registry_digest": reg.digest()}
        manifest = merge_release(str(anchor), [str(p) for p in reg.package_paths()], str(out), top_k, extra)
        if merged_contents(manifest) != wanted:  # the registry moved while we merged: the next run catches up
            log.warning("registry changed during the merge; this release holds the earlier set")
        check = check_release(str(out), ["public", *merged_contents(manifest)])
        release = {"version": version, "path": str(out), "experts": merged_contents(manifest),
                   "anchor_fingerprint": manifest["anchor_fingerprint"], "registry_version": index["version"],
                   "top_k": manifest["top_k"], "check": check}
        if evaluate:
            result = evaluate_release(str(out), str(rel / f"v{version:04d}.eval.json"), params, suites or ["domains"])
            release["evaluation"] = None if result is None else str(rel / f"v{version:04d}.eval.json")
            release.update(heldout_bpb(result))
        write_json(rel / CURRENT, release)  # the release becomes current in one rename
    log.info(f"release v{version}: {', '.join(release['experts'])} -> {out}")
    artifacts.publish_release(release, previous=current)
    return {"changed": True, **release}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Merge a new release if the registry changed.")
    parser.add_argument("--registry", required=True)
    parser.add_argument("--anchor", required=True)
    parser.add_argument("--releases", default="runs/releases")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--no-evaluate", action="store_true")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    result = remerge(args.registry, args.anchor, args.releases, args.top_k, not args.no_evaluate, args.params)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
