"""What a stage shows in the Prefect UI, on a scripted DVC pipeline (no model):

- a stage's output is logged on its own flow run (not on the parent's task run), progress bars are left out,
  and its `[k/N]` lines drive a progress artifact on that run;
- a failing stage fails the pipeline at once: the sibling still running is cancelled (its command killed),
  the stages after it are never started, no task run is left Pending, and the traceback is logged once."""
from __future__ import annotations

import asyncio

from benchmarks.harness import scripted_repo  # noqa: E402

COUNTING = """import time
for k in range(1, 7):
    print(f"counting: [{k}/6] step {k}", flush=True)
    time.sleep(0.2)
print("  50%|#####     | 5/10 [00:01<00:01,  4.00it/s]", flush=True)  # a bar that ignored TQDM_DISABLE
open("counted.txt", "w").write("6")
"""
SLOW = """import time
for k in range(1, 121):
    print(f"slow: [{k}/120]", flush=True)
    if k == 2:  # progress has been reported: `broken` may fail now (without this, a race the test could lose)
        open("slow_started", "w").write("")
    time.sleep(0.5)
open("slow.txt", "w").write("done")
"""
BROKEN = """import atexit, os, time
atexit.register(lambda: print("[stage-time] broken start=0 end=2 seconds=2", flush=True))  # as tasks/ print
for _ in range(600):  # fail only once `slow` runs and has reported progress (at most 60 s)
    if os.path.exists("slow_started"):
        break
    time.sleep(0.1)
time.sleep(1)
rows = {}
rows["row 7"]
"""
DVC_YAML = """stages:
  counting:
    cmd: python counting.py
    deps: [counting.py]
    outs: [counted.txt]
  slow:
    cmd: python slow.py
    deps: [slow.py, counted.txt]
    outs: [slow.txt]
  broken:
    cmd: python broken.py
    deps: [broken.py, counted.txt]
    outs: [never.txt]
  after:
    cmd: cat never.txt slow.txt > after.txt
    deps: [never.txt, slow.txt]
    outs: [after.txt]
"""


async def _runs_logs_artifacts(parent_id):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterParentFlowRunId,
        LogFilter,
        LogFilterFlowRunId,
        TaskRunFilter,
        TaskRunFilterFlowRunId,
    )

    async with get_client() as client:
        children = await client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent_id])))
        tasks = await client.read_task_runs(task_run_filter=TaskRunFilter(
            flow_run_id=TaskRunFilterFlowRunId(any_=[parent_id])))
        ids = [parent_id, *(c.id for c in children)]
        logs = await client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=ids)), limit=200)
        artifacts = await client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=ids)))
    return {c.name: c for c in children}, tasks, logs, artifacts


def test_stage_pages_and_a_failure_that_cancels_the_rest(tmp_path, harness):
    from prefect.logging.handlers import APILogHandler
    from prefect.task_runners import ThreadPoolTaskRunner

    from flows.pipeline import pipeline
    from flows.stages import set_root

    repo = scripted_repo(tmp_path / "repo", DVC_YAML, {"counting.py": COUNTING, "slow.py": SLOW, "broken.py": BROKEN})
    set_root(repo)
    try:
        state = pipeline.with_options(task_runner=ThreadPoolTaskRunner(max_workers=2))(workers=2, return_state=True)
    finally:
        set_root(None)
    APILogHandler().flush()  # the logs are sent in batches
    assert state.is_failed() and "pipeline failed at ['broken']" in state.message, state.message
    assert "cancelled ['after', 'slow']" in state.message
    assert not (repo / "slow.txt").exists(), "the running sibling was not stopped"
    children, tasks, logs, artifacts = asyncio.run(_runs_logs_artifacts(state.state_details.flow_run_id))

    assert {n: c.state.type.value for n, c in children.items()} == {
        "counting": "COMPLETED", "broken": "FAILED", "slow": "CANCELLED"}  # `after` was never started
    assert not [t.name for t in tasks if t.state.type.value in ("PENDING", "SCHEDULED", "RUNNING")]

    counting_logs = [entry.message for entry in logs if entry.flow_run_id == children["counting"].id]
    assert "counting: [3/6] step 3" in counting_logs and not [m for m in counting_logs if "it/s]" in m]
    on_tasks = [entry.message for entry in logs if entry.task_run_id is not None and "counting: [" in entry.message]
    assert not on_tasks, "stage output landed on the parent's task run"
    progress = {a.flow_run_id: a for a in artifacts if a.type == "progress"}
    assert float(progress[children["counting"].id].data) == 100.0
    assert 0 < float(progress[children["slow"].id].data) < 100.0

    tracebacks = [entry for entry in logs if "Traceback (most recent call last)" in entry.message]
    assert len(tracebacks) == 1 and tracebacks[0].flow_run_id == children["broken"].id, \
        [(t.flow_run_id, t.message[:200]) for t in tracebacks]
    assert any("KeyError: 'row 7'" in entry.message and entry.flow_run_id == state.state_details.flow_run_id
               for entry in logs), "the pipeline's own log does not name the failure"
