"""Tasks whose data is not shipped offline, defined against their standard hub sources. They run where the
data can be loaded (network or a local HF cache); offline they raise `DataUnavailable` with the loader's
own message, which the report shows as `not run: <reason>`. Not exercised by the offline test suite."""
from __future__ import annotations

from pathlib import Path

import yaml

from flexolmo_core.evaluation.doc_format import DataUnavailable, doc_record, interleave

AGIEVAL_EN = ("aqua-rat", "logiqa-en", "lsat-ar", "lsat-lr", "lsat-rc", "sat-en", "sat-en-without-passage", "sat-math")


def _load(path: str, name: str | None = None, split: str = "test"):
    import datasets

    try:
        return datasets.load_dataset(path, name, split=split)
    except Exception as err:  # offline: ConnectionError(OfflineModeIsEnabled) within a second or two
        raise DataUnavailable(f"could not load {path}{'/' + name if name else ''}: "
                              f"{type(err).__name__}: {str(err).splitlines()[0]}") from err


def mmlu_pro_docs() -> list[dict]:
    """MMLU-Pro, rank-continuation format, 5-shot from the validation split of the same category."""
    test, val = _load("TIGER-Lab/MMLU-Pro"), _load("TIGER-Lab/MMLU-Pro", split="validation")
    shots: dict[str, str] = {}
    for r in val:
        if shots.get(r["category"], "").count("Question:") < 5:
            shots[r["category"]] = shots.get(r["category"], "") + \
                f"Question: {r['question']}\nAnswer: {r['options'][r['answer_index']]}\n\n"
    per_cat: dict[str, list] = {}
    for r in test:
        choices = [" " + o for o in r["options"]]
        per_cat.setdefault(r["category"], []).append(doc_record(
            r["question_id"], shots.get(r["category"], "") + f"Question: {r['question']}\nAnswer:",
            choices=choices, gold=r["answer_index"], gold_continuation=choices[r["answer_index"]]))
    return interleave([per_cat[c] for c in sorted(per_cat)])


def agieval_docs() -> list[dict]:
    """AGIEval English multiple-choice subsets (lm-eval's `agieval_en` sources), 0-shot."""
    per_subset = []
    for sub in AGIEVAL_EN:
        rows = _load(f"hails/agieval-{sub}")
        docs = []
        for i, r in enumerate(rows):
            choices = [" " + c for c in r["choices"]]
            gold = r["gold"][0] if isinstance(r["gold"], list) else r["gold"]
            docs.append(doc_record(f"{sub}:{i}", r["query"], choices=choices, gold=gold, gold_continuation=choices[gold]))
        per_subset.append(docs)
    return interleave(per_subset)


def bbh_docs() -> list[dict]:
    """BBH, 3-shot chain of thought; the shots are lm-eval's own (bundled, offline), the test data is not."""
    import lm_eval

    folder = Path(lm_eval.__file__).parent / "tasks" / "bbh" / "cot_fewshot"
    per_task = []
    for path in sorted(folder.glob("[a-z]*.yaml")):
        cfg = yaml.safe_load(path.read_text())
        shots = "".join(f"Q: {s['input']}\nA: Let's think step by step.\n{s['target']}\n\n"
                        for s in cfg["fewshot_config"]["samples"])
        rows = _load("SaylorTwift/bbh", cfg["dataset_name"])
        per_task.append([doc_record(f"{cfg['dataset_name']}:{i}", cfg.get("description", "") + shots +
                              f"Q: {r['input']}\nA: Let's think step by step.\n",
                              gold_continuation=f"So the answer is {r['target']}.", answers=[r["target"]])
                         for i, r in enumerate(rows)])
    return interleave(per_task)


HUB_LOADERS = {"mmlu_pro": mmlu_pro_docs, "agieval": agieval_docs, "bbh": bbh_docs}
