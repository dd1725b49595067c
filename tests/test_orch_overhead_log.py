"""benchmarks/pipeline_overhead.py --from-log: orchestration share from the stages' [stage-time] lines."""
from __future__ import annotations

from benchmarks.pipeline_overhead import from_log  # noqa: E402


def test_overlapping_stages_count_once(tmp_path):
    log = tmp_path / "run.log"
    log.write_text("\n".join([
        "Running stage 'anchor':",
        "[stage-time] tasks.anchor start=100.000 end=110.000 seconds=10.00",
        "12:00:01 | INFO | Task run 'expert@a' - [stage-time] tasks.expert start=111.000 end=121.000 seconds=10.00",
        "12:00:02 | INFO | Task run 'expert@b' - [stage-time] tasks.expert start=115.000 end=125.000 seconds=10.00",
        "[stage-time] tasks.evaluate start=127.000 end=130.000 seconds=3.00"]))
    report = from_log(log, wall=32.0)
    assert report["stages"] == {"anchor": 10.0, "expert": 20.0, "evaluate": 3.0}
    assert report["inside_stages"] == 27.0  # 10 + [111, 125] + 3: the two experts overlap
    assert report["outside_stages"] == 5.0 and report["overhead_vs_inside"] == round(5 / 27, 4)
