"""Orchestration end to end on the `smoke` preset in a temporary clone of this working tree:

1. `dvc repro` runs every stage; a second `dvc repro` runs nothing.
2. Changing one domain's params and running the Prefect pipeline flow reruns only that domain's embedding
   and expert (plus the names-only `domains` stage), merge and evaluate; afterwards `dvc status` is clean
   and `dvc repro` runs nothing (the two entry points agree).
3. Adding two domains trains only the new experts, concurrently.
4. An owner flow trains and publishes an expert; the published event triggers the served re-merge
   deployment, which writes a new release containing the new expert. A second re-merge is a no-op.

5. A ninth domain from local files (not a built-in source) flows through prepare -> tokenizer -> embedding ->
   expert -> merge -> evaluate: its held-out bpb, the report's domain and opt-out tables, and the plots.

Tests are independent of their order: `clone` builds the baseline once (`dvc repro`), and every test that
changes params starts from `baseline(clone)`, which restores the baseline params and lets DVC's run cache
check the baseline outputs back out (nothing is retrained).
All flows run under one `prefect_test_harness` (module = session here: every Prefect test is in this file)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.harness import clone_env, dvc, make_clone, repro, scripted_repo, set_domains, stop, wait_for  # noqa: E402

pytestmark = pytest.mark.slow
ALL_STAGES_2 = {"numerics", "domains", "prepare", "tokenizer", "anchor", "public_embedding", "domain_embedding@code",
                "domain_embedding@math", "expert@code", "expert@math", "merge", "router_tune", "btx",
                "unrestricted_moe", "evaluate"}
DOWNSTREAM = {"merge", "router_tune", "btx", "unrestricted_moe", "evaluate"}  # rerun whenever an expert changes


BASELINE = {"code": {}, "math": {}}


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    """A clone at the smoke preset with the baseline domains, every stage run once."""
    dest = make_clone(tmp_path_factory.mktemp("orch") / "repo", list(BASELINE))
    params = dest / "params.yaml"
    import yaml

    data = yaml.safe_load(params.read_text())
    data["evaluate"]["variants"] = ["flexolmo"]  # one variant keeps the smoke evaluation to seconds
    params.write_text(yaml.safe_dump(data, sort_keys=False))
    (dest / ".baseline-params.yaml").write_text(params.read_text())
    first, log = repro(dest)
    assert set(first) == ALL_STAGES_2, log[-3000:]
    yield dest
    from flows.stages import set_root

    set_root(None)
    os.chdir(Path(__file__).resolve().parents[1])


def run_flow(clone: Path, workers: int = 2) -> dict:
    from prefect.task_runners import ThreadPoolTaskRunner

    from flows.pipeline import pipeline
    from flows.stages import set_root

    set_root(clone)
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(clone)  # stage subprocesses import the clone's code
    try:
        return pipeline.with_options(task_runner=ThreadPoolTaskRunner(max_workers=workers))(workers=workers)
    finally:
        os.environ.pop("PYTHONPATH") if old is None else os.environ.__setitem__("PYTHONPATH", old)


def ran(summary: dict) -> set[str]:
    return {name for name, r in summary["stages"].items() if r["ran"]}


def dvc_clean(clone: Path) -> str:
    out = subprocess.run([dvc(), "status"], cwd=clone, env=clone_env(clone), capture_output=True, text=True)
    return out.stdout.strip()


def baseline(clone: Path) -> None:
    """Back to the baseline params and outputs (from DVC's run cache: nothing retrains)."""
    (clone / "params.yaml").write_text((clone / ".baseline-params.yaml").read_text())
    repro(clone)


def test_dvc_repro_twice(clone):
    baseline(clone)
    assert (clone / "reports/results.md").exists() and (clone / "outputs/merge/flexolmo/flexolmo.json").exists()
    merged = json.loads((clone / "outputs/merge/flexolmo/flexolmo.json").read_text())
    assert [e["domain"] for e in merged["experts"]] == ["public", "code", "math"]
    assert sorted(json.loads((clone / "outputs/merge/index.json").read_text())["variants"]) == [
        "flexolmo", "optout_code", "optout_math"]
    second, _ = repro(clone)
    assert second == []
    # the default local remote: push, lose an output, pull it back (offline)
    env = clone_env(clone)
    subprocess.run([dvc(), "push", "-q"], cwd=clone, env=env, check=True)
    import shutil

    shutil.rmtree(clone / "outputs/merge")
    subprocess.run([dvc(), "pull", "-q", "merge"], cwd=clone, env=env, check=True)
    assert json.loads((clone / "outputs/merge/flexolmo/flexolmo.json").read_text()) == merged
    assert dvc_clean(clone) == "Data and pipelines are up to date."


def test_one_domain_change_via_flow_reruns_only_that_domain(clone, harness):
    baseline(clone)
    set_domains(clone, {"code": {"steps": 2}, "math": {}})
    summary = run_flow(clone)
    assert ran(summary) == {"domains", "domain_embedding@code", "expert@code"} | DOWNSTREAM
    assert json.loads((clone / "outputs/expert/code/summary.json").read_text())["steps"] == 2
    assert dvc_clean(clone) == "Data and pipelines are up to date."
    assert repro(clone)[0] == []


def test_artifacts_are_in_the_ui(clone, harness):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    async def latest(key):
        async with get_client() as client:
            found = await client.read_latest_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
            return found[0] if found else None

    import asyncio

    run_flow(clone)  # whatever state the clone is in, a flow run publishes the artifacts
    stages = asyncio.run(latest("flexolmo-stages"))
    assert stages is not None and "expert@code" in str(stages.data)
    assert asyncio.run(latest("flexolmo-outputs")) is not None
    results = asyncio.run(latest("flexolmo-results"))
    assert results is not None and "flexolmo" in results.data
    bpb = asyncio.run(latest("flexolmo-eval-bpb"))  # the smoke clone runs only the held-out bpb suite
    assert bpb is not None and json.loads(bpb.data)[0] == {
        "model": "flexolmo", "held-out bpb (mean over domains)": round(json.loads(
            (clone / "outputs/evaluate/heldout_bpb.json").read_text())["flexolmo"], 4)}


def test_adding_domains_trains_only_the_new_experts_concurrently(clone, harness):
    from flows.pipeline import select
    from flows.stages import load_stages

    baseline(clone)
    set_domains(clone, {**BASELINE, "news": {}, "reddit": {}})
    summary = run_flow(clone)
    assert ran(summary) == {"domains", "prepare", "tokenizer", "domain_embedding@news", "domain_embedding@reddit",
                            "expert@news", "expert@reddit"} | DOWNSTREAM
    # anchor, public embedding and the existing experts were not touched: the data stages are deterministic.
    # Neither new expert waits for the other, so the scheduler runs them side by side (the rendezvous test
    # below proves that of the scheduler; their wall-clock overlap here depends on how long each
    # domain_embedding stage happens to take, so it is not asserted).
    stages = load_stages()
    assert "expert@reddit" not in {s.name for s in select(stages, ["expert@news"])}
    assert "expert@news" not in {s.name for s in select(stages, ["expert@reddit"])}
    merged = json.loads((clone / "outputs/merge/flexolmo/flexolmo.json").read_text())
    assert [e["domain"] for e in merged["experts"]] == ["public", "code", "math", "news", "reddit"]
    assert repro(clone)[0] == []


def automation_exists(name: str) -> bool:
    import asyncio

    from prefect.client.orchestration import get_client

    async def read():
        async with get_client() as client:
            return await client.read_automations_by_name(name)

    return bool(asyncio.run(read()))


def test_publish_event_triggers_remerge(clone, harness, tmp_path, small_texts):
    """owner flow -> registry -> `flexolmo.expert.published` -> served remerge deployment -> new release."""
    from prefect.settings import PREFECT_API_URL

    from flexolmo_core.registry.local import Registry
    from flows.owner import owner, publish
    from flows.remerge import remerge

    anchor, registry, releases = clone / "outputs/anchor/model", tmp_path / "registry", tmp_path / "releases"
    Registry(registry).init(anchor)
    data = tmp_path / "legal.jsonl"  # the owner's closed data: nothing else is passed to the flow
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in small_texts["public"][:60]))
    server_log = tmp_path / "serve.log"
    env = {**clone_env(clone), "PREFECT_API_URL": PREFECT_API_URL.value(), "PYTHONPATH": str(clone),
           "PREFECT_LOGGING_LEVEL": "WARNING"}
    server = subprocess.Popen([sys.executable, "-m", "flows.deploy", "serve", "--registry", str(registry),
                               "--anchor", str(anchor), "--releases", str(releases), "--cron", "",
                               "--no-evaluate"], cwd=clone, env=env, stdout=server_log.open("w"),
                              stderr=subprocess.STDOUT, text=True)  # a file, not a pipe: a full pipe blocks the server
    try:
        # an event emitted before the served deployment's trigger exists matches nothing: wait for the automation
        wait_for(lambda: automation_exists("expert-published"), 300, "the on-publish trigger to be registered")
        result = owner("legal", str(data), str(anchor), str(clone / "outputs/domain_embedding/public"),
                       registry=str(registry), work_dir=str(tmp_path / "owner"), params=str(clone / "params.yaml"))
        assert result["published"]["event_emitted"]
        current = releases / "current.json"
        release = wait_for(lambda: current.exists() and json.loads(current.read_text()), 420, "the triggered re-merge")
        assert set(release["experts"]) == {"legal"}
        merged = json.loads((Path(release["path"]) / "flexolmo.json").read_text())
        assert [e["domain"] for e in merged["experts"]] == ["public", "legal"]
        assert merged["experts"][1]["package_sha256"] == result["sha256"]

        # a second owner publishes (the clone's code package): the event yields release v2 with both experts
        publish(str(clone / "outputs/expert/code/package"), str(registry))
        def v2():
            r = json.loads(current.read_text())
            return r if r["version"] == 2 else None

        release = wait_for(v2, 420, "release v2")
        assert set(release["experts"]) == {"code", "legal"}
        # idempotent: nothing new in the registry -> no new release
        again = remerge(str(registry), str(anchor), str(releases), evaluate=False)
        assert again["changed"] is False and again["version"] == 2
        assert sorted(p.name for p in releases.iterdir() if p.name.startswith("v")) == ["v0001", "v0002"]
    finally:
        stop(server)
        print("---- flows.deploy serve output (tail) ----\n" + server_log.read_text()[-4000:])


def test_transient_failures_are_retried_and_errors_are_not(tmp_path, harness):
    """A stage killed by a signal is retried (and then succeeds); a stage that exits 1 is not retried."""
    from prefect.task_runners import ThreadPoolTaskRunner

    from flows.pipeline import pipeline
    from flows.stages import set_root

    flaky = ("import os, signal, pathlib; n = pathlib.Path('attempts'); n.write_text(n.read_text() + 'x' "
             "if n.exists() else 'x'); os.kill(os.getpid(), signal.SIGKILL) if len(n.read_text()) == 1 else "
             "pathlib.Path('out.txt').write_text('ok')")
    repo = scripted_repo(tmp_path / "repo", "stages:\n  flaky:\n    cmd: python flaky.py\n    deps: [flaky.py]\n"
                         "    outs: [out.txt]\n  broken:\n    cmd: python -c 'raise SystemExit(1)'\n"
                         "    deps: [out.txt]\n    outs: [never.txt]\n", {"flaky.py": flaky})  # after flaky: a
    # failure cancels the stages still running, and this test is about retries
    set_root(repo)
    try:
        state = pipeline.with_options(task_runner=ThreadPoolTaskRunner(max_workers=2))(workers=2, return_state=True)
        assert state.is_failed() and "pipeline failed at ['broken']" in state.message
        assert (repo / "attempts").read_text() == "xx" and (repo / "out.txt").read_text() == "ok"
        lock = (repo / "dvc.lock").read_text()
        assert "flaky" in lock and "broken" not in lock  # the retried stage was committed, the broken one not
    finally:
        set_root(None)


RENDEZVOUS = """import pathlib, sys, time
me, other = sys.argv[1], sys.argv[2]
pathlib.Path(me + '.started').touch()
deadline = time.time() + 120
while not pathlib.Path(other + '.started').exists():
    if time.time() > deadline:
        raise SystemExit(me + ' waited 120 s for ' + other + ': the two stages did not run at the same time')
    time.sleep(0.05)
pathlib.Path(me + '.txt').write_text('met')
"""


def test_independent_stages_run_at_the_same_time(tmp_path, harness):
    """Each stage waits until the other has started, so the pipeline completes only if it runs two
    independent stages at once (with one worker both would wait and fail)."""
    from prefect.task_runners import ThreadPoolTaskRunner

    from flows.pipeline import pipeline
    from flows.stages import set_root

    stage = "  {0}:\n    cmd: python meet.py {0} {1}\n    deps: [meet.py]\n    outs: [{0}.txt]\n"
    repo = scripted_repo(tmp_path / "repo", "stages:\n" + stage.format("a", "b") + stage.format("b", "a"),
                         {"meet.py": RENDEZVOUS})
    set_root(repo)
    try:
        state = pipeline.with_options(task_runner=ThreadPoolTaskRunner(max_workers=2))(workers=2, return_state=True)
        assert state.is_completed(), state.message
        assert (repo / "a.txt").read_text() == (repo / "b.txt").read_text() == "met"
    finally:
        set_root(None)


def test_owner_deployments_use_one_work_pool_per_owner(tmp_path, harness):
    import asyncio

    from prefect.client.orchestration import get_client

    from flows.deploy import deploy_owners

    ids = deploy_owners(["legal", "med_notes"], str(tmp_path / "anchor"), str(tmp_path / "public"),
                        str(tmp_path / "registry"))

    async def read():
        async with get_client() as client:
            return [await client.read_deployment(i) for i in ids]

    deployments = asyncio.run(read())
    assert [d.work_pool_name for d in deployments] == ["owner-legal", "owner-med-notes"]
    assert [d.parameters["domain"] for d in deployments] == ["legal", "med_notes"]
    assert all("data" not in d.parameters for d in deployments)  # each owner supplies their own data path


def test_dask_runner_runs_the_changed_stages(clone, harness):
    """`python -m flows.pipeline --dask` (prefect-dask, a local cluster of worker processes), started from
    another directory: the stages run in the given repository and DVC agrees afterwards."""
    from prefect.settings import PREFECT_API_URL

    set_domains(clone, {"code": {"steps": 3}, "math": {}, "news": {}, "reddit": {}})
    env = {**clone_env(clone), "PREFECT_API_URL": PREFECT_API_URL.value(), "PYTHONPATH": str(clone)}
    done = subprocess.run([sys.executable, "-m", "flows.pipeline", "--dask", "--workers", "2", "--root", str(clone)],
                          cwd=clone.parent, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert "Creating a new Dask cluster" in done.stdout + done.stderr
    assert json.loads((clone / "outputs/expert/code/summary.json").read_text())["steps"] == 3
    assert dvc_clean(clone) == "Data and pipelines are up to date."


def test_a_ninth_domain_flows_through_every_stage(clone, harness):
    """A domain the code has never heard of, from a local .jsonl folder: params.yaml is the only change."""
    import yaml

    from flexolmo_core.data.builtin_sources import BUILTINS

    baseline(clone)
    folder = clone.parent / "legal_data"  # the owner's files (real text: speeches, not a built-in of this run)
    folder.mkdir(exist_ok=True)
    pairs = BUILTINS["sotu_speeches"].reader(None)
    (folder / "part-0.jsonl").write_text("".join(json.dumps({"text": text}) + "\n" for _, text in pairs))
    params = yaml.safe_load((clone / "params.yaml").read_text())
    params["domains"]["legal"] = {}
    params["prepare"]["sources"]["legal"] = [{"kind": "jsonl", "path": str(folder), "license": "public domain"}]
    params["evaluate"]["variants"] = ["public", "flexolmo", "optout_legal"]
    (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    ran_now, log = repro(clone)
    assert {"prepare", "tokenizer", "domain_embedding@legal", "expert@legal", "merge", "evaluate"} <= set(ran_now), log[-2000:]
    assert "expert@code" not in ran_now and "anchor" not in ran_now  # the others are untouched
    merged = json.loads((clone / "outputs/merge/flexolmo/flexolmo.json").read_text())
    assert [e["domain"] for e in merged["experts"]] == ["public", "code", "legal", "math"]  # merge order: sorted
    result = json.loads((clone / "outputs/evaluate/results/flexolmo.json").read_text())
    assert result["tasks"]["flexolmo_domain_legal"]["status"] == "ok"
    assert "legal" in result["routing_share"]["domains"]
    report = (clone / "reports/results.md").read_text()
    domain_table = report.split("## Held-out bits per byte per FlexMix domain")[1].split("##")[0]
    header = next(line for line in domain_table.splitlines() if line.startswith("| model"))
    assert [c.strip() for c in header.strip("|").split("|")] == ["model", "public", "code", "legal", "math", "mean"]
    opt_out_table = report.split("## Opt-out: each domain's bpb with and without its expert")[1].split("##")[0]
    assert any(line.startswith("| legal ") for line in opt_out_table.splitlines()), opt_out_table
    assert (clone / "outputs/evaluate/plots/opt_out.png").exists()
    baseline(clone)


def test_an_imported_llama_anchor_runs_every_stage(clone, harness):
    """`anchor.source` = a published Llama-family checkpoint (GQA, tied embeddings): the tokenizer stage packs
    with its tokenizer, the anchor stage imports it, and the experts merge into a Mixtral model."""
    import torch
    import yaml
    from published import SHAPE, save, token_ids
    from transformers import LlamaConfig, LlamaForCausalLM

    baseline(clone)
    tokenizer = clone / "outputs/tokenizer/tokenizer"
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SHAPE, **token_ids(tokenizer), tie_word_embeddings=True))
    published = save(model, tokenizer, clone.parent / "published_llama")
    params = yaml.safe_load((clone / "params.yaml").read_text())
    params["anchor"]["source"] = str(published)
    params["evaluate"]["variants"] = ["public", "flexolmo", "optout_code"]
    (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    ran_now, log = repro(clone)
    assert {"tokenizer", "anchor", "expert@code", "expert@math", "merge", "router_tune", "evaluate"} <= set(ran_now), log[-2000:]
    card = json.loads((clone / "outputs/tokenizer/card.json").read_text())
    assert card["origin"].startswith("the imported anchor's own tokenizer")
    summary = json.loads((clone / "outputs/anchor/summary.json").read_text())
    assert (summary["family"], summary["imported_from"]) == ("llama", str(published))
    for model_dir in ("outputs/merge/flexolmo", "outputs/merge/optout_code", "outputs/router_tune/model"):
        config = json.loads((clone / model_dir / "config.json").read_text())
        assert (config["model_type"], config["architectures"]) == ("mixtral", ["MixtralForCausalLM"]), model_dir
    for variant in ("public", "flexolmo", "optout_code"):
        result = json.loads((clone / f"outputs/evaluate/results/{variant}.json").read_text())
        assert result["tasks"]["flexolmo_domain_code"]["status"] == "ok", variant
    baseline(clone)
