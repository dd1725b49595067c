"""The flexolmo31 suite resolves in lm-eval's TaskManager offline; offline data converts; missing data is
reported `not run` with a reason."""
import os

import pytest

from flexolmo_core.evaluation import runner, sources, suite

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="module")
def tm():
    from lm_eval.tasks import TaskManager
    return TaskManager(include_path=str(suite.TASKS_DIR), include_defaults=False)


def test_all_31_tasks_and_bpb_variants_are_indexed(tm):
    assert len(suite.TASKS) == 31
    names = set(tm.all_tasks)
    for spec in suite.TASKS:
        assert suite.task_name(spec) in names and suite.bpb_name(spec) in names
    assert not [n for n in names if suite.domain_of(n)]  # domain tasks are built per run, from params


def test_domain_tasks_come_from_the_domain_list(tmp_path):
    """Any domain name gives a held-out bpb task (a ninth domain needs no file and no code)."""
    from lm_eval.tasks import TaskManager

    from flexolmo_core.evaluation import smoke

    assert suite.resolve_suite("domains", ["public", "legal"]) == ["flexolmo_domain_public", "flexolmo_domain_legal"]
    domains = smoke.write_domain_fixture(tmp_path / "domains", ["legal"], n_docs=3)
    tm = TaskManager(include_path=str(suite.TASKS_DIR), include_defaults=False, metadata={"domains_dir": str(domains)})
    task = tm.load([suite.domain_config("legal")])["tasks"]["flexolmo_domain_legal"]
    assert task.OUTPUT_TYPE == "loglikelihood_rolling" and len(task.test_docs()) == 3
    with pytest.raises(ValueError, match="needs the domain list"):
        suite.resolve_suite("domains")
    with pytest.raises(ValueError, match="not a safe identifier"):
        suite.resolve_suite("domains", ["../etc"])


def test_groups_are_9_5_1_1_1_1_2_1_1_5_4(tm):
    from lm_eval.tasks._yaml_loader import load_yaml

    sizes = []
    for group in suite.GROUPS:
        entry = tm.task_index[suite.group_name(group)]
        cfg = load_yaml(entry.yaml_path)
        sizes.append(len(cfg["task"]))
    assert sizes == [9, 5, 1, 1, 1, 1, 2, 1, 1, 5, 4]
    top = load_yaml(tm.task_index["flexolmo31"].yaml_path)
    assert top["task"] == [suite.group_name(g) for g in suite.GROUPS]


def test_yaml_files_match_the_table():
    rendered = suite.render_all()
    on_disk = {p.name: p.read_text() for p in suite.TASKS_DIR.glob("*.yaml")}
    assert on_disk == rendered, "run: python -m flexolmo_core.evaluation.suite"


def test_offline_conversion_dedupes_docs_and_keeps_gold():
    docs = sources.load_docs("arc_easy")
    assert len(docs) == 1140  # 4562 request lines, one per (doc, choice)
    d = docs[0]
    assert d["choices"][d["gold"]] == d["gold_continuation"] == " cellular telephone"
    wino = sources.load_docs("winogrande")[0]
    assert len(wino["contexts"]) == 2 and wino["context"] == wino["contexts"][wino["gold"]]
    yes = sources.load_docs("bioasq_yesno")
    pub = sources.load_docs("pubmedqa")
    assert len(yes) == 2362 and len(pub) == 802


def test_mmlu_interleaves_subjects():
    docs = sources.load_docs("mmlu")
    first = {d["id"].split(":")[0] for d in docs[:57]}
    assert len(first) == 57 and len(docs) > 14000


def test_tasks_load_offline_and_missing_data_is_not_run(tmp_path):
    cfg = runner.EvalConfig(domains_dir=str(tmp_path), eval_data_dir=None)
    names = ["flexolmo_arc_easy", "flexolmo_gsm8k_bpb", "flexolmo_mmlu_pro", "flexolmo_bbh", "flexolmo_newsg",
             "flexolmo_humaneval", "flexolmo_humaneval_bpb", "flexolmo_domain_code"]
    loaded, skipped = runner.load_tasks(names, cfg)
    assert set(loaded) == {"flexolmo_arc_easy", "flexolmo_gsm8k_bpb", "flexolmo_humaneval_bpb"}
    assert all(r["status"] == "not run" and r["reason"] for r in skipped.values())
    assert "TIGER-Lab/MMLU-Pro" in skipped["flexolmo_mmlu_pro"]["reason"]
    assert "SaylorTwift/bbh" in skipped["flexolmo_bbh"]["reason"]
    assert "judge" in skipped["flexolmo_newsg"]["reason"]
    assert "code execution not allowed" in skipped["flexolmo_humaneval"]["reason"]
    assert "domain 'code'" in skipped["flexolmo_domain_code"]["reason"]


def test_local_copy_makes_a_missing_task_runnable(tmp_path):
    import json
    row = {"context": "Question: 2+2?\nAnswer:", "choices": [" 4", " 5"], "gold": 0, "gold_continuation": " 4"}
    (tmp_path / "mmlu_pro.jsonl").write_text(json.dumps(row) + "\n")
    loaded, skipped = runner.load_tasks(["flexolmo_mmlu_pro"], runner.EvalConfig(eval_data_dir=str(tmp_path)))
    assert "flexolmo_mmlu_pro" in loaded and not skipped


def test_code_tasks_pass_with_their_reference_solutions():
    """The programs built for HumanEval/MBPP pass with the gold code and fail with a wrong body."""
    import json as _json

    from flexolmo_core.evaluation import metrics

    he = sources.load_docs("humaneval")[0]
    extra = _json.loads(he["extra"])
    assert metrics.run_program(metrics.humaneval_program(extra, he["gold_continuation"]))
    assert not metrics.run_program(metrics.humaneval_program(extra, "    return None\n"))
    mb = sources.load_docs("mbpp")[1]
    extra = _json.loads(mb["extra"])
    assert metrics.run_program(metrics.mbpp_program(extra, mb["gold_continuation"]))


def test_gold_continuations_are_cut_at_a_space_to_fit_the_context():
    import importlib.util

    from flexolmo_core.evaluation import suite as suite_module

    spec = importlib.util.spec_from_file_location("flexolmo_task_utils", suite_module.TASKS_DIR / "utils.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    assert utils.cut_at_space("short answer", 500) == "short answer"
    text = " word" * 300  # 1500 characters
    cut = utils.cut_at_space(text, 500)
    assert len(cut) <= 500 and text.startswith(cut) and not cut.endswith(" ") and cut.endswith("word")
    assert utils.cut_at_space("x" * 900, 500) == "x" * 500  # no space: a hard cut


def test_the_evaluate_stage_reports_an_eta():
    from tasks.evaluate import eta

    assert eta(120, 2, 10) == "about 8.0 min left (2.0 min so far)" and eta(600, 10, 10) == "done"


def test_bbh_and_agieval_run_offline_from_the_authors_files_shipped_in_data(tmp_path):
    """data/eval-data holds BIG-Bench Hard (27 tasks, 3-shot CoT prompts) and AGIEval v1's English subsets as
    their authors published them; without the folder the hub path is tried (and offline, says what is missing)."""
    from pathlib import Path

    from flexolmo_core.evaluation import sources

    data = Path(__file__).resolve().parents[1] / "data" / "eval-data"
    assert (data / "bbh" / "LICENSE").exists() and (data / "agieval" / "LICENSE").exists()
    bbh = sources.load_docs("bbh", str(data))
    assert len(bbh) == 6511 and len({d["id"].split(":")[0] for d in bbh}) == 27
    first = bbh[0]  # boolean_expressions: its own 3 shots, then the question, then the CoT cue
    assert first["context"].startswith("Evaluate the result of a random Boolean expression.")
    assert first["context"].count("Q: ") == 4 and first["context"].endswith("A: Let's think step by step.\n")
    assert "canary" not in first["context"] and first["gold_continuation"] == f"So the answer is {first['answers'][0]}."
    agieval = sources.load_docs("agieval", str(data))
    assert len(agieval) == 2852 and {d["id"].split(":")[0] for d in agieval} == set(sources.AGIEVAL_EN_MC)
    doc = agieval[0]
    assert doc["context"].endswith("A: Among A through E, the answer is") and len(doc["choices"]) == 5
    assert doc["gold_continuation"] == doc["choices"][doc["gold"]]
    with pytest.raises(sources.DataUnavailable):
        sources.load_docs("bbh", str(tmp_path))  # no folder here, and no hub offline


def test_variants_are_chosen_by_name_or_pattern_and_skipped_by_pattern():
    from flexolmo_core.evaluation.runner import EvalConfig, selected

    cfg = EvalConfig(skip_variants=["dense_*"])
    assert [v for v in ("public", "dense_code", "owner_code", "optout_code") if selected(v, cfg)] == \
        ["public", "owner_code", "optout_code"]
    cfg = EvalConfig(variants=["optout_*", "public"], skip_variants=["optout_news"])
    assert [v for v in ("public", "optout_code", "optout_news", "flexolmo") if selected(v, cfg)] == \
        ["public", "optout_code"]
