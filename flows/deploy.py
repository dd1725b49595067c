"""Deployments: the maintainer's re-merge (on a schedule and on every published expert) and one owner
deployment per data owner on that owner's own work pool.

    python -m flows.deploy serve --registry runs/registry --anchor outputs/anchor/model [--cron "0 * * * *"]
        serves `remerge/scheduled` (cron) and `remerge/on-publish` (a DeploymentEventTrigger on
        `flexolmo.expert.published`) from this process; stop it with SIGTERM.
    python -m flows.deploy owners --domains code,math --anchor ... --public-embedding ... --registry ...
        creates a process work pool `owner-<domain>` per owner and registers `owner/owner-<domain>` on it;
        each owner then runs `prefect worker start --pool owner-<domain>` on their own machine and starts
        the run with their data path: `prefect deployment run owner/owner-code -p data=/private/code`.

Both need a Prefect server (`make ui` starts one on 127.0.0.1; set PREFECT_API_URL to it)."""
from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from prefect import serve
from prefect.events import DeploymentEventTrigger

import flows  # noqa: F401  (offline environment defaults, before prefect is imported)
from flexolmo_core.registry.remote import registry_id
from flows.owner import PUBLISHED_EVENT, owner
from flows.remerge import remerge

ROOT = Path(__file__).resolve().parents[1]


def remerge_deployments(registry: str, anchor: str, releases: str, cron: str | None, evaluate: bool = True,
                        params: str = "params.yaml") -> list:
    parameters = {"registry": registry_id(registry), "anchor": str(Path(anchor).resolve()),
                  "releases": str(Path(releases).resolve()), "evaluate": evaluate,
                  "params": str(Path(params).resolve())}
    trigger = DeploymentEventTrigger(
        name="expert-published",
        expect={PUBLISHED_EVENT},
        match={"flexolmo.registry": parameters["registry"]},  # only this registry's publications
        parameters=parameters,
    )
    deployments = [remerge.to_deployment(name="on-publish", triggers=[trigger], parameters=parameters,
                                         description="re-merge when an expert is published")]
    if cron:
        deployments.append(remerge.to_deployment(name="scheduled", cron=cron, parameters=parameters,
                                                 description="re-merge on a schedule (catches manual publishes)"))
    return deployments


async def ensure_work_pool(name: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists

    async with get_client() as client:
        try:
            await client.create_work_pool(WorkPoolCreate(name=name, type="process"))
        except ObjectAlreadyExists:
            pass


def deploy_owners(domains: list[str], anchor: str, public_embedding: str, registry: str,
                  source: str = str(ROOT)) -> list[str]:
    """One deployment per owner, each on its own process work pool; the data path is the owner's input."""
    ids = []
    for domain in domains:
        pool = f"owner-{domain.replace('_', '-')}"
        asyncio.run(ensure_work_pool(pool))
        deployment_id = owner.from_source(source=source, entrypoint="flows/owner.py:owner").deploy(
            name=f"owner-{domain.replace('_', '-')}", work_pool_name=pool, build=False, push=False,
            parameters={"domain": domain, "anchor": anchor, "public_embedding": public_embedding,
                        "registry": registry},
            description=f"{domain}'s owner trains and publishes the {domain} expert (data path given at run time)",
            print_next_steps=False)
        ids.append(str(deployment_id))
    return ids


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Serve the re-merge deployments or register owner deployments.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="serve remerge/on-publish (event trigger) and remerge/scheduled (cron)")
    p.add_argument("--registry", default="runs/registry")
    p.add_argument("--anchor", default="outputs/anchor/model")
    p.add_argument("--releases", default="runs/releases")
    p.add_argument("--cron", default="0 * * * *", help="'' to disable the schedule")
    p.add_argument("--no-evaluate", action="store_true")
    p.add_argument("--params", default="params.yaml")
    p = sub.add_parser("owners", help="a work pool and a deployment per owner")
    p.add_argument("--domains", required=True, help="comma-separated")
    p.add_argument("--anchor", default="outputs/anchor/model")
    p.add_argument("--public-embedding", default="outputs/domain_embedding/public")
    p.add_argument("--registry", default="runs/registry")
    args = parser.parse_args(argv)
    if args.command == "serve":
        serve(*remerge_deployments(args.registry, args.anchor, args.releases, args.cron or None,
                                   not args.no_evaluate, args.params))
    else:
        ids = deploy_owners([d for d in args.domains.split(",") if d], str(Path(args.anchor).resolve()),
                            str(Path(args.public_embedding).resolve()), registry_id(args.registry))
        print("\n".join(ids))
    return 0


if __name__ == "__main__":
    sys.exit(main())
