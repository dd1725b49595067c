"""The UI's evaluation tables and report, built from what the evaluate stage writes (no server needed)."""
from __future__ import annotations

import base64
import json

from flows.artifacts import embed_plots, eval_tables


def row(model, **values):
    base = {g: None for g in ("AGIEval", "BBH", "Code4", "Gen5", "MC9", "MMLU", "MMLU-Pro", "Math2", "NewsG", "PoemG",
                              "SciRIFF5")}
    base.update({"Avg.": None, "domain bpb avg": None, "gold bpb avg": None, "groups ran": "0/11", "model": model,
                 "seconds": 1.0})
    base.update(values)
    return dict(sorted(base.items()))  # results_table.json is written with sorted keys: `model` comes 16th


def test_bpb_first_then_scores_in_a_fixed_order_with_only_what_ran():
    rows = [row("public", **{"MC9": 31.111111, "MMLU": 40.0, "Avg.": 35.555555, "groups ran": "2/11",
                             "domain bpb avg": 3.114197, "gold bpb avg": 3.750225}),
            row("owner_code", **{"domain bpb avg": 3.006123}),
            row("btm", **{"domain bpb avg": 2.682111, "gold bpb avg": 3.569}),
            row("unrestricted")]  # not run: no value anywhere
    tables = eval_tables(json.loads(json.dumps(rows)))
    assert list(tables) == ["flexolmo-eval-bpb", "flexolmo-eval-table"]
    bpb, scores = tables.values()
    assert [list(r) for r in bpb] == [["model", "held-out bpb (mean over domains)", "gold bpb (mean over groups)"]] * 3
    assert [r["model"] for r in bpb] == ["public", "owner_code", "btm"]
    assert bpb[0]["held-out bpb (mean over domains)"] == 3.1142 and bpb[1]["gold bpb (mean over groups)"] is None
    assert scores == [{"model": "public", "Avg.": 35.6, "groups ran": "2/11", "MC9": 31.1, "MMLU": 40.0}]


def test_no_score_table_when_only_bpb_ran():
    tables = eval_tables([row("flexolmo", **{"domain bpb avg": 2.9})])
    assert tables["flexolmo-eval-table"] == [] and tables["flexolmo-eval-bpb"][0]["model"] == "flexolmo"


def test_plots_are_embedded_as_data_uris(tmp_path):
    png = b"\x89PNG fake"
    (tmp_path / "opt_out.png").write_bytes(png)
    md = embed_plots("## Plots\n\n![opt_out](opt_out.png)\n![gone](gone.png)\n", tmp_path)
    assert f"![opt_out](data:image/png;base64,{base64.b64encode(png).decode()})" in md
    assert "![gone](gone.png)" in md  # a missing file stays a link rather than vanishing
