"""Functions the suite's YAML files reference with `!function utils.<name>` (lm-eval loads this file by path).

Data comes from `flexolmo_core.evaluation.sources` (offline); `**metadata` is what the runner passed to
`TaskManager(metadata=...)`: `eval_data_dir`, `domains_dir`, `domain_max_chars`, `code_timeout`.
"""
import json

import datasets

from flexolmo_core.evaluation import metrics, sources, suite


def load(flexolmo_task, eval_data_dir=None, doc_limit=None, gold_max_chars=None, **_metadata):
    docs = sources.load_docs(flexolmo_task, eval_data_dir=eval_data_dir, source=suite.SPECS[flexolmo_task].source)
    docs = docs[:doc_limit] if doc_limit else docs  # lm-eval reads the first `limit` docs, in order
    if gold_max_chars:  # a scored continuation must fit the context window (MATH solutions do not at 512)
        for doc in docs:
            doc["gold_continuation"] = cut_at_space(doc["gold_continuation"], gold_max_chars)
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})


def cut_at_space(text: str, max_chars: int) -> str:
    """At most max_chars characters, ending at a whitespace when there is one (bpb is per byte scored)."""
    if len(text) <= max_chars:
        return text
    head = text[:max_chars]
    space = max(head.rfind(" "), head.rfind("\n"))
    return head[:space] if space > max_chars // 2 else head


# Multiple choice. Partial-scoring tasks (WinoGrande) put the choice in the context: returning an int from
# doc_to_text is lm-eval's switch to "one context per choice, one shared continuation".
def mc_text(doc):
    return doc["gold"] if doc["contexts"] else doc["context"]


def mc_choices(doc):
    return doc["contexts"] if doc["contexts"] else doc["choices"]


def mc_target(doc):
    return doc["gold_continuation"] if doc["contexts"] else doc["gold"]


def process_bpb(doc, results):
    loglikelihood, _is_greedy = results[0]
    return {"bpb": metrics.bits_per_byte(loglikelihood, doc["gold_continuation"])}


def process_gen(doc, results):
    prediction = results[0].strip()
    return {"f1": metrics.max_f1(prediction, doc["answers"]), "exact_match": metrics.exact_match(prediction, doc["answers"])}


def process_math(doc, results):
    return {"exact_match": metrics.math_correct(results[0], doc["answers"])}


def process_code(doc, results):
    extra = json.loads(doc["extra"])
    build = metrics.humaneval_program if "entry_point" in extra else metrics.mbpp_program
    passed = [metrics.run_program(build(extra, r)) for r in results]
    return {"pass@1": sum(passed) / max(1, len(passed))}
