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
    rows = {r.split(" | ")[0].lstrip("| "): r for r in qs.goal_table("x", results) if r.startswith("| ")}
    assert rows["beats soup on code"].endswith("| met |") and "1.0000 vs 1.2000" in rows["beats soup on code"]
    assert rows["code: within 5% of its owner"].endswith("| missed |")  # 1.0 vs 0.9: +11.1%
    assert "+11.1%" in rows["code: within 5% of its owner"]
    assert rows["code: opt-out loses >= 80% of the gain, others move < 2%"].endswith("| inconclusive |")  # 80.0%
    assert rows["code: merged p(own) >= 0.6"].endswith("| 0.650 | (no interval) | met |")
    assert rows["math: merged p(own) >= 0.6"].endswith("| missed |")


def test_a_row_lever_gets_its_own_goals_and_its_temperatures_choice(tmp_path):
    """An owner-side row lever (owners retrained with anchor-hidden rows) is reported with its own owners'
    goals and with the goals of the temperature its router lever chose on validation; its own row in the lever
    table has no validation score of its own (the temperature lever scores every candidate)."""
    for d in ("points", "results"):
        (tmp_path / d).mkdir()

    def point(name, results, **extra):
        results = {**results, "recorded": {"commit": None, "machine": "m"}}  # as write_record stamps the file
        (tmp_path / "results" / f"{name}_test.json").write_text(json.dumps(results))
        b = qs.bpb_of(results)
        (tmp_path / "points" / f"{name}.json").write_text(json.dumps({
            "name": name, "anchor": "SmolLM2-135M (pretrained)", "owner_steps": 40, "owner_tokens": 40960,
            "domains": DOMAINS, "seconds": 1.0, "splits": {"test": {"bpb": b, **qs.point_metrics(b, DOMAINS)}},
            **extra}))

    point("s40", noisy_results(bpb()))
    hidden = noisy_results(bpb(flex_code=0.91, flex_math=1.61), seed=1)
    point("s40_hidden_frozen", hidden, lever=qs.ROW_LEVERS["hidden_frozen"][0], row_lever="hidden_frozen")
    chosen = noisy_results({"flexolmo": bpb(flex_code=1.3)["flexolmo"], "optout_code": bpb()["optout_code"],
                            "optout_math": bpb()["optout_math"]}, seed=2)
    for variant, result in chosen.items():
        tag = "temp_x4" if variant == "flexolmo" else f"temp_x4_{variant}"
        (tmp_path / "results" / f"s40_hidden_frozen_{tag}_test.json").write_text(json.dumps(result))
    b = qs.bpb_of({**hidden, **chosen})
    (tmp_path / "points" / "s40_hidden_frozen_temperature.json").write_text(json.dumps({
        "name": "s40_hidden_frozen_temperature", "anchor": "SmolLM2-135M (pretrained)", "owner_steps": 40,
        "owner_tokens": 40960, "domains": DOMAINS, "seconds": 1.0, "chosen": "temp_x4",
        "lever": "anchor-hidden rows, frozen in owner training, router temperature (temp_x4)",
        "validation_mean_bpb": {"temp_x1": 1.5, "temp_x4": 1.4, "temp_x16": 1.45},
        "splits": {"validation": {"mean": {"bpb_flexolmo": 1.4}}, "test": {"bpb": b, **qs.point_metrics(b, DOMAINS)}}}))
    text = qs.report_text(tmp_path, detail=True)
    assert "| recorded |" not in text  # the stamp is no model
    frozen = qs.ROW_LEVERS["hidden_frozen"][0]
    assert f"**SmolLM2-135M (pretrained), 40 owner steps: {frozen}**" in text
    assert (f"**SmolLM2-135M (pretrained), 40 owner steps: {frozen}, router temperature (temp_x4, chosen on "
            "validation)**") in text
    # the lever table says at which owner steps, and against this lever's own owners' soup (2.5 on math, 1.2 on
    # code, 1.1 on public: mean 1.6)
    assert f"| 40 | {frozen} | (see its temperature) |" in text
    assert any(r.startswith(f"| 40 | {frozen} |") and "| 1.6" in r for r in text.splitlines())
    own = text.split(f"40 owner steps: {frozen}**")[1].split("**")[0]  # its owners, its merge: code 0.91 vs 0.9
    assert "| code: within 5% of its owner | 0.9100 vs 0.9000 (+1.1%)" in own
    tempered = text.split("router temperature (temp_x4, chosen on validation)**")[1].split("**")[0]
    assert "| code: within 5% of its owner | 1.3000 vs 0.9000" in tempered  # the chosen merge against the same owners
