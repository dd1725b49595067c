"""Group scores, the paper's `Avg.`, relative improvements and the opt-out arithmetic, on plain numbers.

Group score = unweighted mean of the task scores of that group that ran. `Avg.` = unweighted mean of the
group scores over the groups that ran, always shown with the count (e.g. "7/11 groups"): groups that could
not run are left out of the mean, never counted as zero.
"""
from __future__ import annotations

from statistics import mean

from flexolmo_core.evaluation import suite


def task_values(result: dict, variant: str) -> dict[str, float | None]:
    """short task name -> value (None when not run) for variant 'primary' or 'bpb', from a runner result."""
    out = {}
    for spec in suite.TASKS:
        name = suite.task_name(spec) if variant == "primary" else suite.bpb_name(spec)
        rec = result.get("tasks", {}).get(name)
        if rec is not None:
            out[spec.name] = rec.get("value") if rec.get("status") == "ok" else None
    return out


def group_scores(values: dict[str, float | None]) -> dict[str, dict]:
    """{group: {"score": mean or None, "ran": n, "total": m}} over the tasks present in `values`."""
    out = {}
    for group in suite.GROUPS:
        names = [t.name for t in suite.TASKS if t.group == group and t.name in values]
        ran = [values[n] for n in names if values[n] is not None]
        out[group] = {"score": mean(ran) if ran else None, "ran": len(ran), "total": len(names)}
    return out


def average(groups: dict[str, dict]) -> dict:
    """The paper's Avg.: unweighted mean over groups that ran."""
    ran = [g["score"] for g in groups.values() if g["score"] is not None]
    return {"avg": mean(ran) if ran else None, "groups_ran": len(ran), "groups_total": len(groups)}


def relative_change(new: float | None, base: float | None, higher_is_better: bool = True) -> float | None:
    """Improvement of `new` over `base` as a fraction of `base` (positive = better)."""
    if new is None or base is None or base == 0:
        return None
    return (new - base) / abs(base) if higher_is_better else (base - new) / abs(base)


def relative_improvements(groups_new: dict, groups_base: dict, higher_is_better: bool = True) -> dict:
    """Two averagings, both reported because the paper does not spell out which it uses:
    `of_avg` = relative change of Avg.; `mean_of_groups` = mean over groups (that ran in both) of each
    group's relative change."""
    per_group = {g: relative_change(groups_new[g]["score"], groups_base[g]["score"], higher_is_better)
                 for g in groups_new if g in groups_base}
    ran = [v for v in per_group.values() if v is not None]
    of_avg = relative_change(average(groups_new)["avg"], average(groups_base)["avg"], higher_is_better)
    return {"of_avg": of_avg, "mean_of_groups": mean(ran) if ran else None, "per_group": per_group,
            "groups_compared": len(ran)}


def domain_bpb(result: dict) -> dict[str, float | None]:
    out = {}
    for name, rec in result.get("tasks", {}).items():
        d = suite.domain_of(name)
        if d is not None:
            out[d] = rec.get("value") if rec.get("status") == "ok" else None
    return out


def opt_out_effect(full: dict[str, float], removed: dict[str, float], public: dict[str, float], domain: str) -> dict:
    """Removing `domain`'s expert. `gain_lost` = share of the domain's bpb gain over the public model that is
    lost (1.0 = back to public); `max_other_change` = largest relative bpb change on any other domain."""
    gain = public[domain] - full[domain]
    # No gain over the public model -> nothing to lose: the share is undefined (reported as n/a).
    lost = (removed[domain] - full[domain]) / gain if gain > 0 else None
    others = {d: (removed[d] - full[d]) / full[d] for d in full
              if d != domain and full.get(d) is not None and removed.get(d) is not None}
    worst = max(others, key=lambda d: abs(others[d])) if others else None
    return {"domain": domain, "bpb_with": full[domain], "bpb_without": removed[domain], "bpb_public": public[domain],
            "gain": gain, "gain_lost": lost, "other_changes": others,
            "max_other_change": abs(others[worst]) if worst else None, "max_other_domain": worst}
