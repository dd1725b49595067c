"""Run a suite on one model variant with lm-eval, offline, and return one JSON-able result.

A task that cannot run (data missing, judge missing, code execution not allowed) is recorded as
`{"status": "not run", "reason": ...}`: it stays in the result and in the report, never silently dropped.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
import traceback
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # built-in hub tasks must fail fast, never hang on the network
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from fnmatch import fnmatchcase

from flexolmo_core.evaluation import suite  # noqa: E402
from flexolmo_core.io.dtypes import inference_dtype, resolve_device
from flexolmo_core.io.params import NO_FLAG, at_least, between, check_ranges  # noqa: E402

log = logging.getLogger(__name__)
# Two lm-eval loggers warn once per request/task about expected things here: left truncation of 5-shot
# prompts at a 512-token context, and "custom kwargs" for every custom_dataset task. Keep errors only.
for _name in ("lm_eval.models.huggingface", "lm_eval.api.task"):
    logging.getLogger(_name).setLevel(logging.ERROR)


@dataclasses.dataclass
class EvalConfig:
    """The `evaluate` section of params.yaml (also the `flexolmo evaluate` options)."""
    suites: list[str] = dataclasses.field(default_factory=lambda: ["flexolmo31", "flexolmo31_bpb", "domains"])  # what full variants run
    limit: int | None = at_least(1, 5)               # docs per task (the paper: 1000); None = all
    gen_limit: int | None = at_least(1, 3)           # docs per generation task (greedy decoding is the costly part)
    domain_limit: int | None = at_least(1, 10)       # docs per FlexMix domain for held-out bpb
    domain_max_chars: int | None = at_least(1, 2000)  # characters per held-out doc (bounds rolling-bpb cost)
    gold_max_chars: int | None = at_least(1, 500)    # gold continuations scored for bpb are cut here (must fit the context)
    domains_dir: str | None = "outputs/prepare"  # <dir>/<domain>/test from the prepare stage
    domains: list[str] | None = None    # the `domains` suite's domains; None = the merged model's experts
    eval_data_dir: str | None = None     # <dir>/bbh/, <dir>/agieval/ (authors' formats) and <dir>/<task>.jsonl for the rest
    allow_code_execution: bool = False  # HumanEval/MBPP run generated code (subprocess + timeout) only if true
    max_gen_toks: int | None = at_least(1, 32)       # cap on generated tokens per doc (None = the task's own value)
    batch_size: int = at_least(1, 16)                # lm-eval batch size
    device: str = "auto"                             # auto | cpu | cuda: models run there (fp32 on the CPU, own dtype on a GPU)
    workers: int = at_least(1, 1)                    # variants evaluated side by side, one process each
    threads: int = at_least(0, 0)                    # torch threads per worker (0 = torch's default; 1 when workers > 1)
    max_length: int | None = at_least(1, None)       # context window for lm-eval (None = the model's)
    top_k: int | None = at_least(1, None)            # FlexOlmo experts per token (None = the checkpoint's)
    # prefix-pooled routing weight for every merged (MoE) variant (0: off, the paper's routing; moe.FlexRouter.pool)
    prefix_pool: float = between(0.0, 1.0, 0.0)
    btm_top_k: int = at_least(1, 2)                  # BTM keeps this many experts per position
    variants: list[str] | None = None   # evaluate only these variants: names or patterns such as optout_* (None = all)
    skip_variants: list[str] | None = None  # never evaluate these (names or patterns), e.g. [dense_*] to save time
    # Variants outside `full_variants` (dense_*, owner_*, optout_*) run `light_suites` only, to fit the budget.
    full_variants: list[str] = dataclasses.field(default_factory=lambda: [
        "public", "soup", "btm", "prompt_routing", "flexolmo", "flexolmo_rt", "unrestricted", "btx"])
    light_suites: list[str] = dataclasses.field(default_factory=lambda: ["domains"])  # what the other variants run
    # Per-variant override of the suites (BTM runs every expert on every request: E times the cost).
    variant_suites: dict[str, list[str]] | None = dataclasses.field(default=None, metadata=NO_FLAG)
    merged_dir: str = "outputs/merge/flexolmo"  # the merged FlexOlmo checkpoint every baseline derives from
    anchor_dir: str | None = "outputs/anchor"   # the public model (else expert 0 of the merge, identical)
    extra_variants: dict[str, str] | None = dataclasses.field(default=None, metadata=NO_FLAG)  # name -> checkpoint dir (flexolmo_rt, unrestricted, ...);
    # a missing dir is reported as `not run`, so the training stages' outputs can be listed before they exist
    presets: dict = dataclasses.field(default_factory=dict, metadata=NO_FLAG)  # {preset: overrides}

    def __post_init__(self) -> None:
        check_ranges(self, "evaluate")


def selected(variant: str, cfg: "EvalConfig") -> bool:
    """Whether `variant` is evaluated: it matches `variants` (when given) and no `skip_variants` pattern."""
    if cfg.variants and not any(fnmatchcase(variant, p) for p in cfg.variants):
        return False
    return not any(fnmatchcase(variant, p) for p in cfg.skip_variants or [])


def suites_for(variant: str, cfg: "EvalConfig") -> list[str]:
    """Task names one variant is evaluated on: its override, else all suites (headline variants) or light."""
    if cfg.variant_suites and variant in cfg.variant_suites:
        names = cfg.variant_suites[variant]
    else:
        names = cfg.suites if variant in cfg.full_variants else cfg.light_suites
    return [t for s in names for t in suite.resolve_suite(s, cfg.domains or ())]


NOT_RUN = "not run"


def _task_manager(metadata: dict):
    from lm_eval.tasks import TaskManager
    return TaskManager(include_path=str(suite.TASKS_DIR), include_defaults=False, metadata=metadata)


def _policy_reason(name: str, cfg: EvalConfig) -> str | None:
    """Reasons decided before touching data: judges and code execution."""
    spec, variant = suite.spec_of(name)
    if spec is None or variant != "primary":
        return None
    if spec.kind == "judge":
        return "needs an LLM judge scoring 1-5 (paper: GPT-4o); no judge model is available offline"
    if spec.kind == "code" and not cfg.allow_code_execution:
        return "code execution not allowed (set evaluate.allow_code_execution: true to run generated code)"
    return None


def primary_metric(name: str) -> str:
    """The lm-eval metric a task's reported value comes from."""
    spec, variant = suite.spec_of(name)
    return {"domain": "bits_per_byte", "bpb": "bpb"}.get(variant) or spec.metric


def _primary_value(name: str, metrics: dict) -> float | None:
    value = metrics.get(primary_metric(name))
    if value is None or suite.spec_of(name)[1] in ("domain", "bpb"):
        return value
    return 100.0 * value  # paper reports 0-100


def doc_values(name: str, samples: list[dict] | None) -> list[list[float]]:
    """Per document, what the reported value aggregates: [doc_id, value] for mean-aggregated metrics, [doc_id,
    loglikelihood, bytes] for held-out bpb (a ratio of sums). The report's bootstrap intervals resample these."""
    key, out = primary_metric(name), []
    for sample in samples or []:
        value = sample.get(key)
        if isinstance(value, (int, float)):
            out.append([sample["doc_id"], float(value)])
        elif isinstance(value, (list, tuple)) and len(value) == 2:
            out.append([sample["doc_id"], float(value[0]), float(value[1])])
    return sorted(out)


def load_tasks(task_names: list[str], cfg: EvalConfig) -> tuple[dict, dict]:
    """(name -> lm-eval Task for the tasks that can run, name -> not-run record)."""
    # doc_limit: loaders build only the docs lm-eval will read (it takes the first `limit` docs in order).
    limits = [cfg.limit, cfg.gen_limit]
    doc_limit = None if any(x is None for x in limits) else max(limits)
    metadata = {"eval_data_dir": cfg.eval_data_dir, "domains_dir": cfg.domains_dir,
                "domain_max_chars": cfg.domain_max_chars, "doc_limit": doc_limit, "domain_limit": cfg.domain_limit,
                "gold_max_chars": cfg.gold_max_chars}
    tm = _task_manager(metadata)
    loaded, skipped = {}, {}
    for name in task_names:
        reason = _policy_reason(name, cfg)
        if reason is None:
            try:
                domain = suite.domain_of(name)
                loaded.update(tm.load([suite.domain_config(domain) if domain else name])["tasks"])
                continue
            except Exception as err:  # DataUnavailable, or whatever lm-eval raised while loading data
                reason = f"{type(err).__name__}: {err}".splitlines()[0]
                if "DataUnavailable" in reason:
                    reason = str(err).splitlines()[0]
        skipped[name] = {"status": NOT_RUN, "reason": reason}
    for name, task in loaded.items():
        if cfg.max_gen_toks and task.OUTPUT_TYPE == "generate_until":
            kwargs = task.config.generation_kwargs
            kwargs["max_gen_toks"] = min(int(kwargs.get("max_gen_toks", cfg.max_gen_toks)), cfg.max_gen_toks)
    return loaded, skipped


def _limit_for(name: str, task, cfg: EvalConfig) -> int | None:
    if suite.domain_of(name) is not None:
        return cfg.domain_limit
    return cfg.gen_limit if task.OUTPUT_TYPE == "generate_until" else cfg.limit


def run_tasks(lm, tasks: dict, cfg: EvalConfig) -> dict[str, dict]:
    """Evaluate loaded tasks. lm-eval's `limit` is global, so tasks are grouped by their limit; inside a
    group one `evaluate` call batches every request of every task together."""
    from lm_eval.evaluator import evaluate

    by_limit: dict[Any, dict] = {}
    for name, task in tasks.items():
        by_limit.setdefault(_limit_for(name, task, cfg), {})[name] = task
    out: dict[str, dict] = {}
    for limit, group in by_limit.items():
        try:
            res = evaluate(lm=lm, task_dict={"tasks": group}, limit=limit, bootstrap_iters=0, log_samples=True,
                           confirm_run_unsafe_code=cfg.allow_code_execution, verbosity="WARNING")
        except Exception:
            # One bad task must not sink the others: retry one by one and record the failure honestly.
            res = {"results": {}, "n-samples": {}, "samples": {}}
            for name, task in group.items():
                try:
                    one = evaluate(lm=lm, task_dict={"tasks": {name: task}}, limit=limit, bootstrap_iters=0,
                                   log_samples=True, confirm_run_unsafe_code=cfg.allow_code_execution,
                                   verbosity="WARNING")
                    res["results"].update(one["results"])
                    res["samples"].update(one.get("samples") or {})
                    res["n-samples"].update(one.get("n-samples", {}))
                except Exception as err:
                    out[name] = {"status": "error", "reason": f"{type(err).__name__}: {err}".splitlines()[0],
                                 "traceback": traceback.format_exc(limit=3)}
        for name, values in res["results"].items():
            metrics = {k.split(",")[0]: v for k, v in values.items()
                       if "," in k and not k.split(",")[0].endswith("_stderr") and isinstance(v, (int, float))}
            n = res.get("n-samples", {}).get(name, {}).get("effective")
            out[name] = {"status": "ok", "metrics": metrics, "value": _primary_value(name, metrics), "n": n,
                         "docs": doc_values(name, (res.get("samples") or {}).get(name))}
    return out


def evaluate_lm(lm, task_names: list[str], cfg: EvalConfig, *, variant: str = "model",
                info: dict | None = None) -> dict:
    """Evaluate an lm-eval LM on `task_names`; returns the per-variant result (see module doc)."""
    start = time.perf_counter()
    tasks, skipped = load_tasks(task_names, cfg)
    results = run_tasks(lm, tasks, cfg) if tasks else {}
    results.update(skipped)
    ordered = {name: results.get(name, {"status": "error", "reason": "no result returned"}) for name in task_names}
    return {"variant": variant, "info": info or {}, "limit": cfg.limit, "gen_limit": cfg.gen_limit,
            "domain_limit": cfg.domain_limit,
            "max_length": getattr(lm, "max_length", None), "tasks": ordered,
            "seconds": round(time.perf_counter() - start, 2)}


def hf_lm(model: str | Path | Any, cfg: EvalConfig, tokenizer: Any = None):
    """lm-eval's `hf` model on `cfg.device` for a local checkpoint dir (Olmo2ForCausalLM or FlexOlmoForCausalLM load
    with AutoModelForCausalLM, no custom code) or an already built model object."""
    import transformers
    from lm_eval.models.huggingface import HFLM

    device = resolve_device(cfg.device)
    if isinstance(model, (str, Path)):
        path = str(model)
        tokenizer = tokenizer or transformers.AutoTokenizer.from_pretrained(path)
        model = transformers.AutoModelForCausalLM.from_pretrained(path, use_safetensors=True,
                                                                  dtype=inference_dtype(device, path)).to(device)
    if cfg.top_k is not None and hasattr(model.config, "num_experts_per_tok"):
        model.config.num_experts_per_tok = cfg.top_k
        for module in model.modules():  # transformers copies top_k into each router at construction
            if hasattr(module, "top_k") and isinstance(getattr(module, "top_k"), int):
                module.top_k = cfg.top_k
    model.eval()
    return HFLM(pretrained=model.to(device), tokenizer=tokenizer, device=str(device), batch_size=cfg.batch_size,
                max_length=cfg.max_length, dtype=model.dtype)
