"""Evaluation: the paper's 31-task suite through lm-eval (offline where the data ships), every baseline as a
model variant, and the report.

Entry points:
- `suite.resolve_suite(name)`: "flexolmo31" | "flexolmo31_bpb" | "domains" | "all" | "smoke" -> lm-eval task names;
  the YAML lives in `suite.TASKS_DIR` (use it as lm-eval's `--include_path`).
- `runner.EvalConfig` (the `evaluate` params section), `runner.hf_lm(dir, cfg)`, `runner.evaluate_lm(lm, tasks, cfg)`.
- `variants.build_variants(merged_dir, work_dir, anchor_dir, extra)` and `variants.evaluate_variant(v, tasks, cfg, out_json)`.
- `report.write_report(results_dir, report_dir, metrics_path)`: results.md, PNGs, results_table.json, metrics JSON.
- `btm.BTMLM` (lm-eval model "flexolmo_btm"), `routed.PromptRoutedLM` ("flexolmo_prompt_routed").
"""
