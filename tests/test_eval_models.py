"""End to end on tiny random checkpoints: an offline task through lm-eval, the baselines built from a merged
checkpoint, BTM's class against the Bayesian identity, prompt routing, the report and the CLI."""
import json
import math
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from flexolmo_core.evaluation import report, runner, smoke, suite, variants  # noqa: E402
from flexolmo_core.inference.model import load_flexolmo  # noqa: E402
from flexolmo_core.io.checkpoint import load_state  # noqa: E402
from flexolmo_core.merge import baselines  # noqa: E402

DOMAINS = ["code", "math"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("evsmoke")
    tok = smoke.train_tokenizer(root / "tok")
    smoke.build_anchor(root / "anchor", tok)
    smoke.build_merged(root / "merged", root / "anchor", tok, DOMAINS)
    smoke.write_domain_fixture(root / "domains", ["public", *DOMAINS], n_docs=3)
    return root


def _load(path):
    import transformers
    return transformers.AutoModelForCausalLM.from_pretrained(str(path), use_safetensors=True).eval()


def _ids(path, text):
    import transformers
    return transformers.AutoTokenizer.from_pretrained(str(path))(text, return_tensors="pt").input_ids


def test_offline_task_end_to_end_matches_hand_bpb(models):
    cfg = runner.EvalConfig(limit=1, domain_limit=2, domains_dir=str(models / "domains"), batch_size=4)
    lm = runner.hf_lm(models / "anchor", cfg)
    res = runner.evaluate_lm(lm, ["flexolmo_arc_easy", "flexolmo_arc_easy_bpb", "flexolmo_domain_code",
                                  "flexolmo_mmlu_pro"], cfg, variant="public")
    t = res["tasks"]
    assert t["flexolmo_arc_easy"]["status"] == "ok" and t["flexolmo_arc_easy"]["n"] == 1
    assert t["flexolmo_arc_easy"]["value"] in (0.0, 100.0)
    assert t["flexolmo_domain_code"]["status"] == "ok" and t["flexolmo_domain_code"]["value"] > 0
    assert t["flexolmo_mmlu_pro"]["status"] == "not run"
    # Hand computation of the first ARC-Easy doc's gold bpb (lm-eval keeps the last max_length+1 tokens).
    from flexolmo_core.evaluation.sources import load_docs
    doc = load_docs("arc_easy")[0]
    model = _load(models / "anchor")
    whole = lm.tok_encode(doc["context"] + doc["gold_continuation"])
    n_ctx = len(lm.tok_encode(doc["context"]))
    n_cont = len(whole) - n_ctx
    inp = torch.tensor([whole[-(lm.max_length + 1):]])
    logp = torch.log_softmax(model(inp[:, :-1]).logits.float(), -1)[0]
    ll = logp[-n_cont:].gather(-1, inp[0, -n_cont:, None]).sum().item()
    expected = -ll / math.log(2) / len(doc["gold_continuation"].encode())
    assert t["flexolmo_arc_easy_bpb"]["value"] == pytest.approx(expected, rel=1e-4)


def test_dense_expert_extraction_is_exact(models, tmp_path):
    a, b = load_state(models / "anchor"), load_state(
        baselines.extract_dense_expert(models / "merged", 0, tmp_path / "d0"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)  # expert 0 is the anchor's FFN
    # Expert 2 alone as a dense model == the merged model restricted to expert 2 (softmax over one row = 1).
    dense = _load(baselines.extract_dense_expert(models / "merged", 2, tmp_path / "d2"))
    only = load_flexolmo(models / "merged", only=["math"], top_k=1).model  # the others masked at inference
    ids = _ids(models / "anchor", "def f(x):\n    return x + 1\n")
    torch.testing.assert_close(dense(ids).logits, only(ids).logits, rtol=1e-4, atol=1e-4)
    assert json.loads((tmp_path / "d2" / "flexolmo.json").read_text())["domain"] == "math"


def test_model_soup_averages_ffns_and_refuses_different_anchors(models, tmp_path):
    d1 = baselines.extract_dense_expert(models / "merged", 1, tmp_path / "d1")
    d2 = baselines.extract_dense_expert(models / "merged", 2, tmp_path / "d2")
    soup = load_state(baselines.model_soup([d1, d2], tmp_path / "soup"))
    s1, s2 = load_state(d1), load_state(d2)
    k = "model.layers.1.mlp.down_proj.weight"
    torch.testing.assert_close(soup[k], (s1[k] + s2[k]) / 2)
    other = smoke.build_anchor(tmp_path / "other", smoke.train_tokenizer(tmp_path / "tok"), seed=7)
    with pytest.raises(ValueError, match="shared tensor"):
        baselines.model_soup([d1, other], tmp_path / "bad")


def test_btm_class_equals_bayesian_mixture_when_keeping_all(models, tmp_path):
    from lm_eval.api.instance import Instance

    from flexolmo_core.evaluation.btm import BTMLM

    dirs = [baselines.extract_dense_expert(models / "merged", i, tmp_path / f"d{i}") for i in (1, 2)]
    lm = BTMLM(dirs, top_k=2, batch_size=2)
    ctx, cont = "import os\nimport sys", "\nprint(os.path)"
    got = lm.loglikelihood([Instance("loglikelihood", {}, (ctx, cont), 0)], disable_tqdm=True)[0][0]
    # With every expert kept, the per-step posterior mixture telescopes to
    # log sum_e p_e(x_2..x_T) - log sum_e p_e(x_2..x_c): the uniform-prior Bayesian model average.
    whole, n_ctx = lm.tok_encode(ctx + cont), len(lm.tok_encode(ctx))
    ids = torch.tensor([whole])
    full, pre = [], []
    for d in dirs:
        lp = torch.log_softmax(_load(d)(ids).logits.float(), -1)[0, :-1].gather(-1, ids[0, 1:, None])[:, 0]
        full.append(lp.sum()), pre.append(lp[: n_ctx - 1].sum())
    expected = torch.logsumexp(torch.stack(full), 0) - torch.logsumexp(torch.stack(pre), 0)
    assert got == pytest.approx(expected.item(), abs=1e-3)


def test_prompt_routing_picks_the_closest_domain_embedding(models, small_texts):
    """Domain embeddings come from each domain's *training* documents (not the prompt): the mean layer-0
    MoE input over code files and over encyclopedia leads. Held-out code files must route to the code row
    wherever it sits, through the model's own router rows when those hold the embeddings. (Only code
    prompts: with random weights and a tokenizer trained on code, prose prompts sit closer to the code mean.)"""
    merged = _load(models / "merged")

    def mean_input(texts):
        return torch.stack([baselines.prompt_embedding(merged, _ids(models / "anchor", t[:1500]))[0] for t in texts]).mean(0)

    code, prose = mean_input(small_texts["code"][:6]), mean_input(small_texts["public"][:20])
    zero = torch.zeros_like(code)  # cosine 0: never the closest
    for held_out in small_texts["code"][8:10]:
        ids = _ids(models / "anchor", held_out[:1500])
        assert baselines.prompt_route(merged, ids, torch.stack([zero, prose, code])) == [2]
        assert baselines.prompt_route(merged, ids, torch.stack([code, zero, prose])) == [0]
    with torch.no_grad():  # the default embeddings are the layer-0 router rows
        merged.model.layers[0].mlp.gate.weight.copy_(torch.stack([zero, prose, code]))
    assert baselines.prompt_route(merged, ids) == [2]


def test_variants_report_and_cli(models, tmp_path):
    cfg = runner.EvalConfig(limit=1, domain_limit=2, domains_dir=str(models / "domains"), batch_size=4)
    built = {v.name: v for v in variants.build_variants(models / "merged", tmp_path / "work", models / "anchor")}
    assert set(built) == {"public", "dense_code", "dense_math", "owner_code", "owner_math", "soup", "btm",
                          "prompt_routing", "flexolmo", "optout_code", "optout_math"}
    names = ["flexolmo_arc_easy", "flexolmo_arc_easy_bpb", "flexolmo_newsg"] + suite.resolve_suite("domains", ["public", *DOMAINS])
    results = tmp_path / "results"
    for name in ("public", "flexolmo", "optout_code", "btm", "prompt_routing"):
        res = variants.evaluate_variant(built[name], names, cfg, out_json=results / f"{name}.json")
        assert res["tasks"]["flexolmo_newsg"]["status"] == "not run"
    flex = json.loads((results / "flexolmo.json").read_text())
    assert flex["routing_share"]["experts"] == ["public", "code", "math"]
    assert sum(flex["routing_share"]["domains"]["code"]) == pytest.approx(1.0, abs=1e-3)
    assert sum(flex["routing_share"]["top1"]["code"]) == pytest.approx(1.0, abs=1e-3)  # one top expert per token-layer
    assert 0 < flex["routing_share"]["entropy_bits"]["code"] <= math.log2(3) + 1e-6
    summary = report.write_report(results, tmp_path / "reports")
    md = (tmp_path / "reports" / "results.md").read_text()
    assert "| flexolmo |" in md and "not run: needs an LLM judge" in md and "Avg." in md
    assert "opting out code" in md
    row = next(r for r in report.routing_rows(summary) if (r["model"], r["domain"]) == ("flexolmo", "code"))
    assert row["p_own"] == flex["routing_share"]["domains"]["code"][1] and row["experts"] == 3
    assert f"| flexolmo | code | {row['p_own']:.3f} | 0.333 | {row['top1_own']:.3f} |" in md
    for png in ("groups_bpb.png", "routing_share.png", "opt_out.png"):
        assert (tmp_path / "reports" / png).stat().st_size > 0
    detail = json.loads((tmp_path / "reports" / "summary.json").read_text())
    assert detail["flexolmo"]["bpb_code"] == summary["flexolmo"]["domains_bpb"]["code"]
    # per-document values behind every number, and intervals and three-way verdicts from them
    from flexolmo_core.evaluation import intervals

    code = flex["tasks"]["flexolmo_domain_code"]
    assert [len(d) for d in code["docs"]] == [3, 3]  # [doc id, loglikelihood, bytes] x 2 documents
    table, scale = intervals.aligned({"f": flex}, intervals.task_ids({"f": flex}))["f", "flexolmo_domain_code"]
    assert intervals.value_of(table, scale) == pytest.approx(code["value"], rel=1e-9)  # lm-eval's own aggregation
    assert len(flex["tasks"]["flexolmo_arc_easy"]["docs"]) == 1
    lo, hi = detail["intervals"]["domain_bpb_mean"]["flexolmo"]
    assert lo <= summary["flexolmo"]["domains_bpb_avg"] <= hi
    assert f"[{lo:.4f}, {hi:.4f}]" in md and "of the draws)" in md
    assert set(detail["checks"].values()) <= {"PASS", "FAIL", "inconclusive", "n/a"}
    headline = json.loads((tmp_path / "reports" / "heldout_bpb.json").read_text())  # what `dvc metrics show` lists
    assert headline["flexolmo"] == round(summary["flexolmo"]["domains_bpb_avg"], 4) and "optout_code" not in headline

    from flexolmo_core.cli.main import main
    out = tmp_path / "cli.json"
    (tmp_path / "params.yaml").write_text("evaluate: {limit: 7}\n")
    assert main(["evaluate", "--model", str(models / "anchor"), "--suite", "flexolmo_arc_easy_bpb", "--limit", "2",
                 "--params", str(tmp_path / "params.yaml"), "--out", str(out)]) == 0  # the flag beats the section
    assert json.loads(out.read_text())["tasks"]["flexolmo_arc_easy_bpb"]["n"] == 2


def test_btm_cached_generation_matches_the_scoring_path(models, tmp_path):
    from flexolmo_core.evaluation.btm import BTMLM, btm_log_probs

    dirs = [baselines.extract_dense_expert(models / "merged", i, tmp_path / f"d{i}") for i in range(3)]
    lm = BTMLM(dirs, top_k=2, batch_size=2)
    prompt = torch.tensor(lm.tok_encode("def add(a, b):\n    return"))
    new = lm._greedy_one(prompt, 6, stop=[])
    # Re-derive each greedy token from the full-sequence mixture (no cache).
    seq = torch.cat([prompt, new])
    lps = torch.stack([torch.log_softmax(m(seq[None]).logits.float(), -1) for m in lm.experts])
    mix = btm_log_probs(lps, seq[None], top_k=2)[0]
    expected = mix[len(prompt) - 1: len(seq) - 1].argmax(-1)
    assert new.tolist() == expected.tolist()


def test_evaluate_stage_end_to_end(models, tmp_path, monkeypatch):
    import yaml

    import tasks.evaluate as stage

    params = {"evaluate": {"suites": ["smoke"], "limit": 2, "gen_limit": 1, "domain_limit": 2,
                           "domains_dir": str(models / "domains"), "merged_dir": str(models / "merged"),
                           "anchor_dir": str(models / "anchor"), "variants": ["public", "flexolmo", "optout_code"],
                           "light_suites": ["domains"]}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    assert stage.main("params.yaml") == 0
    results = sorted(p.name for p in (tmp_path / "outputs/evaluate/results").glob("*.json"))
    assert results == ["flexolmo.json", "optout_code.json", "public.json"]
    light = json.loads((tmp_path / "outputs/evaluate/results/optout_code.json").read_text())
    assert set(light["tasks"]) == {suite.domain_task(d) for d in ["public", *DOMAINS]}  # the light suite, the merge's domains
    assert (tmp_path / "reports/results.md").exists() and (tmp_path / "outputs/evaluate/heldout_bpb.json").exists()
    assert list((tmp_path / "outputs/evaluate/plots").glob("*.png"))

    # the parallel path (variants in two spawned 1-thread workers) gives the same scores as the serial one
    def values(name):
        tasks = json.loads((tmp_path / f"outputs/evaluate/results/{name}").read_text())["tasks"]
        return {t: r.get("value") for t, r in tasks.items()}

    serial = {name: values(name) for name in results}
    params["evaluate"]["workers"] = 2
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    assert stage.main("params.yaml") == 0
    for name, expected in serial.items():
        got = values(name)
        assert got.keys() == expected.keys()
        for task, value in expected.items():
            assert (value is None) == (got[task] is None) and (value is None or abs(got[task] - value) <= 1e-4 * max(1.0, abs(value))), (name, task)


def test_code_task_runs_only_when_allowed(models):
    names = ["flexolmo_humaneval"]
    base = dict(limit=1, gen_limit=1, max_gen_toks=8, batch_size=2)
    lm = runner.hf_lm(models / "anchor", runner.EvalConfig(**base))
    denied = runner.evaluate_lm(lm, names, runner.EvalConfig(**base))["tasks"]["flexolmo_humaneval"]
    assert denied["status"] == "not run" and "not allowed" in denied["reason"]
    allowed = runner.evaluate_lm(lm, names, runner.EvalConfig(**base, allow_code_execution=True))
    rec = allowed["tasks"]["flexolmo_humaneval"]
    assert rec["status"] == "ok" and rec["n"] == 1 and rec["value"] == 0.0  # random weights cannot pass
