"""A data owner's flow, run on the owner's own machine: embed, train, validate, publish one expert.

    python -m flows.owner run --domain code --data /private/code --anchor outputs/anchor/model \\
        --public-embedding outputs/domain_embedding/public --registry runs/registry
    python -m flows.owner publish PKG --registry runs/registry     # an already trained package

The flow is given one data path and nothing else of anyone's data: the published anchor (and its public
router embedding) are the only shared inputs. Publishing validates the package against the registry's
anchor and emits the Prefect event `flexolmo.expert.published`, which the re-merge deployment
(flows/deploy.py) is triggered by."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.events import emit_event

import flows  # noqa: F401  (offline environment defaults, before prefect is imported)

PUBLISHED_EVENT = "flexolmo.expert.published"


@task(task_run_name="embed-{domain}")
def embed(domain: str, data: str, anchor: str, out: str, params: str, preset: str | None,
          public_embedding: str | None = None) -> str:
    from flexolmo_core.training.config import DomainEmbeddingConfig, load_stage
    from flexolmo_core.training.jobs import EmbeddingJob, embed_domain_job

    _, cfg, _ = load_stage(DomainEmbeddingConfig, "domain_embedding", params, domain=domain, preset=preset)
    embed_domain_job(EmbeddingJob(anchor, domain, data, out, cfg, public_embedding))
    return out


@task(task_run_name="train-{domain}", retries=1, retry_delay_seconds=10)
def train(domain: str, data: str, anchor: str, public_embedding: str, own_embedding: str, out: str, params: str,
          preset: str | None, val_data: str | None) -> dict:
    """The training stage's own function; a retry resumes from the run's last checkpoint."""
    from flexolmo_core.training.config import ExpertConfig, load_stage
    from flexolmo_core.training.jobs import ExpertJob, train_expert_job

    _, cfg, loop = load_stage(ExpertConfig, "expert", params, domain=domain, preset=preset)
    return train_expert_job(ExpertJob(anchor, domain, data, out, cfg, loop, val_data=val_data,
                                      public_embedding=public_embedding, domain_embedding=own_embedding))


@task(task_run_name="validate-{package}")
def validate(package: str, anchor: str) -> dict:
    from flexolmo_core.anchor.model import read_fingerprint
    from flexolmo_core.expert.package import load_package
    from flexolmo_core.registry.local import anchor_shapes_of

    pkg = load_package(package, anchor_fingerprint=read_fingerprint(anchor), anchor_shapes=anchor_shapes_of(anchor))
    return {"domain": pkg.domain, "sha256": pkg.sha256, "path": str(pkg.path)}


@task(task_run_name="publish-{package}")
def publish_package(package: str, registry: str, replace: bool) -> dict:
    from flexolmo_core.registry.remote import open_registry, registry_id, writable_registry

    before = open_registry(registry).contents().get(json.loads((Path(package) / "manifest.json").read_text())["domain"])
    entry = writable_registry(registry).publish(package, replace=replace)
    changed = before != entry.sha256
    if changed:  # publishing the same package twice is a no-op and triggers nothing
        emit_event(event=PUBLISHED_EVENT,
                   resource={"prefect.resource.id": f"flexolmo.expert.{entry.domain}",
                             "flexolmo.domain": entry.domain, "flexolmo.sha256": entry.sha256,
                             "flexolmo.registry": registry_id(registry)},
                   payload={"version": entry.version, "path": str(entry.path)})
    return {"domain": entry.domain, "sha256": entry.sha256, "version": entry.version, "path": str(entry.path),
            "event_emitted": changed}


@flow(name="publish-expert", flow_run_name="publish-{package}", log_prints=True)
def publish(package: str, registry: str, replace: bool = False) -> dict:
    """Validate (inside the registry) and publish an existing package; emits the published event."""
    result = publish_package(package, registry, replace)
    get_run_logger().info(f"published {result['domain']} ({result['sha256'][:16]}) as registry version "
                          f"{result['version']}; event emitted: {result['event_emitted']}")
    return result


@flow(name="owner", flow_run_name="owner-{domain}", log_prints=True)
def owner(domain: str, data: str, anchor: str, public_embedding: str, registry: str | None = None,
          work_dir: str = "runs/owner", params: str = "params.yaml", preset: str | None = None,
          val_data: str | None = None, replace: bool = False) -> dict:
    """Train `domain`'s expert on `data` (this owner's data only) and publish it to `registry`."""
    work = Path(work_dir) / domain
    emb = embed(domain, data, anchor, str(work / "domain_embedding"), params, preset, public_embedding)
    summary = train(domain, data, anchor, public_embedding, emb, str(work / "expert"), params, preset, val_data)
    package = str(work / "expert" / "package")
    checked = validate(package, anchor)
    result = {"domain": domain, "package": package, "sha256": checked["sha256"], "training": summary}
    if registry:
        result["published"] = publish_package(package, registry, replace)
    create_markdown_artifact(
        key=f"flexolmo-owner-{domain.replace('_', '-')}",
        markdown=f"# Expert `{domain}`\n\nPackage: `{Path(package).resolve()}`\n\nsha256: `{checked['sha256']}`\n\n"
                 f"Published: {json.dumps(result.get('published'))}",
        description=f"expert package of {domain}")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="A data owner's flows.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="embed + train + validate (+ publish) one expert")
    p.add_argument("--domain", required=True)
    p.add_argument("--data", required=True, help="this owner's training data (packed shards, .txt/.jsonl or a folder)")
    p.add_argument("--val-data", default=None)
    p.add_argument("--anchor", required=True, help="the published anchor checkpoint")
    p.add_argument("--public-embedding", required=True, help="the anchor's public router embedding")
    p.add_argument("--registry", default=None, help="publish here when given")
    p.add_argument("--work-dir", default="runs/owner")
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--preset", default=None)
    p.add_argument("--replace", action="store_true")
    p = sub.add_parser("publish", help="publish an existing package (emits the event)")
    p.add_argument("package")
    p.add_argument("--registry", required=True)
    p.add_argument("--replace", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "publish":
        result = publish(args.package, args.registry, args.replace)
    else:
        result = owner(args.domain, args.data, args.anchor, args.public_embedding, args.registry, args.work_dir,
                       args.params, args.preset, args.val_data, args.replace)
    print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
