"""The re-merge flow with evaluation, as the UI shows it: its release artifact carries the release's held-out
bpb next to the previous release's, and its log holds the flow's own story (no progress bars, no chatter)."""
from __future__ import annotations

import asyncio
import json
import re

import yaml

CHATTER = re.compile(r"it/s\]|\d+%\|| LOAD_| RESUME | RETURN_VALUE|Running loglikelihood")


async def _logs_and_release(flow_run_id):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, LogFilter, LogFilterFlowRunId

    async with get_client() as client:
        logs = await client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
        release = await client.read_latest_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["flexolmo-release"])))
    return logs, release[0]


def test_release_artifact_compares_held_out_bpb_and_the_log_stays_quiet(tmp_path, harness, smoke_anchor, packages,
                                                                        small_texts):
    from prefect.logging.handlers import APILogHandler

    from flexolmo_core.registry.local import Registry
    from flows.remerge import remerge
    from flows.stages import ROOT

    held_out = tmp_path / "held_out"
    held_out.mkdir()
    for domain, texts in (("code", small_texts["code"][-6:]), ("news", small_texts["public"][-6:])):
        (held_out / f"{domain}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["evaluate"] = {**params["evaluate"], "domains_dir": str(held_out), "domain_limit": 2,
                          "domain_max_chars": 300, "batch_size": 4, "presets": {}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    registry, releases = tmp_path / "registry", tmp_path / "releases"
    Registry(registry).init(smoke_anchor)
    Registry(registry).publish(packages["code"])
    first = remerge(str(registry), str(smoke_anchor), str(releases), params=str(tmp_path / "params.yaml"))
    Registry(registry).publish(packages["news"])
    state = remerge(str(registry), str(smoke_anchor), str(releases), params=str(tmp_path / "params.yaml"),
                    return_state=True)
    second = state.result()
    APILogHandler().flush()  # the logs are sent in batches
    assert first["heldout_domains"] == ["code"] and second["heldout_domains"] == ["code", "news"]
    assert json.loads((releases / "current.json").read_text())["heldout_bpb"] == second["heldout_bpb"]
    logs, release = asyncio.run(_logs_and_release(state.state_details.flow_run_id))
    assert f"| v2 (this) | {second['heldout_bpb']:.4f} | code, news |" in release.data
    assert f"| v1 (previous) | {first['heldout_bpb']:.4f} | code |" in release.data
    noisy = [entry.message[:120] for entry in logs if CHATTER.search(entry.message)]
    assert not noisy, noisy
    assert len(logs) < 40, "\n".join(entry.message[:120] for entry in logs)
