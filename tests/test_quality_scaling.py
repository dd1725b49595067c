"""benchmarks/quality_scaling.py: the per-point measures (merged vs owner, against BTM and soup, opt-out gain lost)
computed from held-out bpb, and the report (tables and a plot) from the points a grid wrote."""
from __future__ import annotations

import json

import pytest

from benchmarks import quality_scaling as qs  # noqa: E402

DOMAINS = ["code", "math"]


def bpb(flex_code=1.0, flex_math=2.0) -> dict:
    """Held-out bpb per variant and domain, as bpb_of(variant_results(...)) returns them."""
    return {
        "public": {"public": 1.0, "code": 1.5, "math": 3.0},
        "owner_code": {"public": 1.0, "code": 0.9, "math": 3.0},
        "owner_math": {"public": 1.0, "code": 1.5, "math": 1.6},
        "soup": {"public": 1.1, "code": 1.2, "math": 2.5},
        "btm": {"public": 1.0, "code": 0.95, "math": 1.8},
        "flexolmo": {"public": 1.0, "code": flex_code, "math": flex_math},
        "optout_code": {"public": 1.0, "code": 1.4, "math": 2.02},
        "optout_math": {"public": 1.0, "code": 1.0, "math": 3.2},
    }


def test_point_metrics_follow_the_definitions():
    m = qs.point_metrics(bpb(), DOMAINS)
    code, math_ = m["per_domain"]["code"], m["per_domain"]["math"]
    assert code["merged_vs_owner"] == pytest.approx(1.0 / 0.9 - 1)
    assert math_["merged_vs_owner"] == pytest.approx(2.0 / 1.6 - 1)
    assert code["vs_btm"] == pytest.approx(1.0 / 0.95 - 1) and math_["vs_soup"] == pytest.approx(2.0 / 2.5 - 1)
    # removing code takes 0.4 of its 0.5 gain over public; removing math takes 1.2 of 1.0 (worse than public)
    assert code["gain_lost"] == pytest.approx(0.8) and math_["gain_lost"] == pytest.approx(1.2)
    assert code["max_other_change"] == pytest.approx(0.01)  # math moved 2.0 -> 2.02
    assert m["mean"]["gain_lost"] == pytest.approx(1.0)
    assert m["mean"]["max_other_change"] == pytest.approx(0.01)
    assert m["mean"]["bpb_flexolmo"] == pytest.approx((1.0 + 1.0 + 2.0) / 3)  # public text counts in the mean
    assert m["mean"]["bpb_owner_own"] == pytest.approx((0.9 + 1.6) / 2)


def test_no_gain_means_no_share_lost():
    m = qs.point_metrics(bpb(flex_code=1.6), DOMAINS)  # FlexOlmo worse than public on code: nothing to lose
    assert m["per_domain"]["code"]["gain_lost"] is None
    assert m["mean"]["gain_lost"] == pytest.approx(1.2)  # the mean is over the domains that had a gain


def test_report_tables_and_plot_from_the_points(tmp_path):
    points = tmp_path / "points"
    points.mkdir()
    for name, anchor, steps, flex in (("a250_s25", "tiny anchor, 250 steps", 25, 1.3),
                                      ("a250_s100", "tiny anchor, 250 steps", 100, 1.1),
                                      ("smollm2_s40", "SmolLM2-135M (pretrained)", 40, 0.95)):
        b = bpb(flex_code=flex)
        (points / f"{name}.json").write_text(json.dumps({
            "name": name, "anchor": anchor, "owner_steps": steps, "owner_tokens": steps * 4096, "domains": DOMAINS,
            "seconds": 1.0, "splits": {"test": {"bpb": b, **qs.point_metrics(b, DOMAINS)}}}))
    text = qs.report(tmp_path)
    assert (tmp_path / "scaling.md").read_text() == text
    rows = [r for r in text.splitlines() if r.startswith("| tiny anchor") or r.startswith("| SmolLM2")]
    assert len(rows) == 3 + 3 * len(DOMAINS)  # the grid table, then one row per point and domain
    assert rows[0].startswith("| tiny anchor, 250 steps | 25 | 0.10M |")  # sorted by owner tokens per anchor
    assert "| 100 | code | +22.2% |" in text  # 1.1 / 0.9 - 1
    assert (tmp_path / "scaling.png").stat().st_size > 10_000


def test_each_mean_gets_a_paired_interval_over_documents(tmp_path):
    """variant_results' per-document values give every point mean a 95% interval (same documents for every
    variant); the point estimate lies inside it, and the grid table prints it."""
    import math
    import random

    rng = random.Random(0)
    results = {}
    for variant, per_domain in bpb().items():
        tasks = {}
        for domain, value in per_domain.items():
            noise = [rng.uniform(-0.2, 0.2) for _ in range(12)]
            per_doc = [value + e - sum(noise) / len(noise) for e in noise]  # mean exactly `value`
            tasks[f"flexolmo_domain_{domain}"] = {"status": "ok", "value": value, "docs": [
                [i, -b * 1000 * math.log(2), 1000.0] for i, b in enumerate(per_doc)]}
        results[variant] = {"variant": variant, "tasks": tasks}
    assert qs.bpb_of(results)["flexolmo"] == pytest.approx(bpb()["flexolmo"])
    point = qs.point_metrics(qs.bpb_of(results), DOMAINS)["mean"]
    found = qs.metric_intervals(results, DOMAINS, iters=200)
    for key in ("merged_vs_owner", "vs_btm", "vs_soup", "bpb_flexolmo"):
        lo, hi = found[key]
        assert lo <= point[key] <= hi and hi > lo, key
    points = tmp_path / "points"
    points.mkdir()
    b = qs.bpb_of(results)
    (points / "a.json").write_text(json.dumps({
        "name": "a", "anchor": "tiny anchor, 250 steps", "owner_steps": 20, "owner_tokens": 81920, "domains": DOMAINS,
        "seconds": 1.0, "splits": {"test": {"bpb": b, **qs.point_metrics(b, DOMAINS), "intervals": found}}}))
    lo, hi = found["vs_btm"]
    assert f"[{100 * lo:+.1f}, {100 * hi:+.1f}]" in qs.report(tmp_path)


def noisy_results(per_variant: dict, seed: int = 0, docs: int = 12, spread: float = 0.2) -> dict:
    """Per-document held-out values around each variant's bpb (mean exactly the bpb), as lm-eval logs them."""
    import math
    import random

    rng = random.Random(seed)
    results = {}
    for variant, per_domain in per_variant.items():
        tasks = {}
        for domain, value in per_domain.items():
            noise = [rng.uniform(-spread, spread) for _ in range(docs)]
            per_doc = [value + e - sum(noise) / len(noise) for e in noise]
            tasks[f"flexolmo_domain_{domain}"] = {"status": "ok", "value": value, "docs": [
                [i, -b * 1000 * math.log(2), 1000.0] for i, b in enumerate(per_doc)]}
        results[variant] = {"variant": variant, "tasks": tasks}
    return results


def test_goal_table_gives_each_goal_its_bootstrap_verdict():
    """Issue 29's goals: a clear win is met, a clear loss missed, a borderline one inconclusive, and p(own)
    is read from the routing diagnostics."""
    results = noisy_results(bpb(), spread=0.05)
    results["flexolmo"]["routing_share"] = {"experts": ["public", "code", "math"],
                                            "domains": {"code": [0.3, 0.65, 0.05], "math": [0.5, 0.1, 0.4]}}
    rows = {r.split(" | ")[0].lstrip("| "): r for r in qs.goal_table("x", results, DOMAINS) if r.startswith("| ")}
    assert rows["beats soup on code"].endswith("| met |") and "1.0000 vs 1.2000" in rows["beats soup on code"]
    assert rows["code: within 5% of its owner"].endswith("| missed |")  # 1.0 vs 0.9: +11.1%
    assert "+11.1%" in rows["code: within 5% of its owner"]
    assert rows["code: opt-out loses >= 80% of the gain, others move < 2%"].endswith("| inconclusive |")  # 80.0%
    assert rows["code: merged p(own) >= 0.6"].endswith("| 0.650 | (no interval) | met |")
    assert rows["math: merged p(own) >= 0.6"].endswith("| missed |")
