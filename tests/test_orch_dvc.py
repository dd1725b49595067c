"""dvc.yaml as a contract, checked statically through DVC's own parser (fast; the runs are in
tests/test_orch_pipeline.py)."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def stages():
    from flows.stages import load_stages, set_root

    set_root(ROOT)
    try:
        return {s.name: s for s in load_stages()}
    finally:
        set_root(None)


@pytest.fixture(scope="module")
def params():
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_every_domain_fans_out(stages, params):
    domains = sorted(params["domains"])
    for family in ("domain_embedding", "expert"):
        assert sorted(n.split("@")[1] for n in stages if n.startswith(family + "@")) == domains
    order = list(stages)
    assert order.index("anchor") < order.index("public_embedding") < order.index(f"expert@{domains[0]}")
    assert order.index("merge") < order.index("evaluate") == len(order) - 1


def test_stage_name_module_section_and_output_folder_agree(stages, params):
    for stage in stages.values():
        module = stage.cmd.split()[2]  # python -m tasks.<module> ...
        assert (ROOT / (module.replace(".", "/") + ".py")).exists(), stage.cmd
        if stage.name == "public_embedding":  # the public row: the domain_embedding module on `public`
            assert module == "tasks.domain_embedding" and stage.outs == ["outputs/domain_embedding/public"]
            continue
        assert module == f"tasks.{stage.family}"
        assert stage.family in params, f"params.yaml has no section for stage {stage.family}"
        for out in stage.outs:
            assert out.startswith(f"outputs/{stage.family}") or out == "reports", (stage.name, out)


def test_expert_stage_sees_only_its_own_domain(stages, params):
    """Data isolation is structural: expert@d depends on d's data, the anchor and the router rows only."""
    domains = set(params["domains"])
    for name, stage in stages.items():
        if not name.startswith("expert@"):
            continue
        mine = name.split("@")[1]
        data_deps = [d for d in stage.deps if d.startswith(("outputs/prepare", "outputs/tokenizer"))]
        assert data_deps and all(d.split("/")[2] == mine for d in data_deps), data_deps
        others = {d.split("/")[2] for d in stage.deps if d.startswith("outputs/domain_embedding/")} - {mine, "public"}
        assert not others & domains, others


def test_artifacts_cover_every_domain_and_a_local_remote_is_default(params):
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    artifacts = spec["artifacts"]
    assert artifacts["anchor"]["path"] == "outputs/anchor/model"
    assert artifacts["flexolmo"]["path"] == "outputs/merge/flexolmo"
    for domain in params["domains"]:
        assert artifacts[f"expert-{domain}"]["path"] == f"outputs/expert/{domain}/package"
    from dvc.config import Config

    config = Config(str(ROOT / ".dvc"), validate=False).load_one("repo")
    remote = config["core"]["remote"]
    assert "://" not in config["remote"][remote]["url"]  # a local directory: push/pull work offline


def test_metrics_and_plots_are_declared(params):
    """Evaluation's held-out bpb is the only stage-level metric (so it leads `dvc exp show`); every training
    stage's metrics.json is a top-level metric and written by its stage; every curve is a top-level plot."""
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    stages = spec["stages"]
    assert [list(m)[0] for m in stages["evaluate"]["metrics"]] == ["outputs/evaluate/heldout_bpb.json"]
    assert not [n for n, s in stages.items() if n != "evaluate" and ("metrics" in s or "metrics" in s.get("do", {}))]
    assert any("outputs/evaluate/plots" in p for p in stages["evaluate"]["plots"])
    training = ["outputs/anchor", *(f"outputs/expert/{d}" for d in params["domains"]), "outputs/router_tune"]
    assert spec["metrics"] == [f"{t}/metrics.json" for t in training]
    outs = {next(iter(o)) if isinstance(o, dict) else o for s in stages.values()
            for o in s.get("outs", s.get("do", {}).get("outs", []))}
    for t in ["outputs/anchor", "outputs/expert/${key}", "outputs/router_tune"]:
        assert f"{t}/metrics.json" in outs, t
    curves = {name: list(p[name]["y"]) for p in spec["plots"] for name in p}
    assert set(curves) == {"loss", "lr", "tokens_per_s"}
    labels = ["anchor", *(f"expert_{d}" for d in params["domains"]), "router_tune"]  # the loop's dvclive labels
    for metric, files in curves.items():
        assert files == [f"{t}/run/dvclive/plots/metrics/{label}/{metric}.tsv" for t, label in zip(training, labels)]
    assert (ROOT / ".dvc/plots" / f"{spec['plots'][0]['loss']['template']}.json").exists()
