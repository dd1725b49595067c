"""The closed-form router (issue 29, item 3): the ridge solution, that it routes the proxy tokens to their own
expert, and that opt-out by masking still equals the model without the expert."""
import json

import torch

from flexolmo_core.inference.model import load_flexolmo
from flexolmo_core.merge.merging import opt_out
from flexolmo_core.training.ridge_router import ridge_rows, token_targets
from flexolmo_core.training.stages import fit_router, read_merged

X = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(3))


def test_the_gram_form_is_the_ridge_least_squares_solution():
    """Reference path: lstsq on the data stacked over sqrt(lam) I, without forming X^T X."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 12, generator=g, dtype=torch.float64) + 0.5
    y = token_targets(torch.randint(0, 3, (300,), generator=g), 3, public_target=1.0)
    alpha = 0.05
    lam = alpha * (x * x).sum(0).mean()
    stacked = torch.cat([x, lam.sqrt() * torch.eye(12, dtype=torch.float64)])
    reference = torch.linalg.lstsq(stacked, torch.cat([y, torch.zeros(12, 3, dtype=torch.float64)])).solution.T
    torch.testing.assert_close(ridge_rows(x.T @ x, x.T @ y, alpha), reference)


def test_targets_put_the_public_expert_beside_each_owner():
    y = token_targets(torch.tensor([0, 1, 2]), 3, public_target=0.5)
    assert y.tolist() == [[1, 0, 0], [0.5, 1, 0], [0.5, 0, 1]]


def test_the_fitted_router_routes_proxy_tokens_to_their_own_expert(merged, owner_data, small_texts, tmp_path,
                                                                    own_top1):
    from flexolmo_core.training.data import open_windows

    public = tmp_path / "public.jsonl"
    public.write_text("\n".join(json.dumps({"text": t}) for t in small_texts["public"][:100]) + "\n")
    out = tmp_path / "ridge"
    summary = fit_router(merged, public, [owner_data["code"], owner_data["news"]], out, seq_len=32,
                         public_windows=24, proxy_windows=24, alpha=1e-3, public_target=0.0, scale=8.0)
    assert summary["method"] == "ridge" and summary["windows"] == [24, 24, 24]
    manifest = json.loads((out / "model/flexolmo.json").read_text())
    assert manifest["router_tuned"]["method"] == "ridge"
    # only the router rows moved
    _, before, _ = read_merged(merged)
    _, after, _ = read_merged(out / "model")
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(k.endswith("gate.weight") for k in moved)
    # the same windows the fit used (Take's seeded sample), every expert's own
    from flexolmo_core.training.stages import Take

    sets = [public, owner_data["code"], owner_data["news"]]
    windows = {e: torch.stack([torch.as_tensor(w[i][:32]) for i in range(len(w))])
               for e, w in enumerate(Take(open_windows(p, 32, merged), 24, 0) for p in sets)}
    fitted = {e: own_top1(out / "model", {e: ids}) for e, ids in windows.items()}
    embedded = {e: own_top1(merged, {e: ids}) for e, ids in windows.items()}
    # code is easy to tell apart; the "news" owner's data is encyclopedia text like the public sample
    assert fitted[1] > 0.75, (fitted, embedded)
    assert sum(fitted.values()) > sum(embedded.values()) + 0.8, (fitted, embedded)


def test_masking_an_expert_of_the_fitted_router_equals_the_model_without_it(merged, owner_data, small_texts,
                                                                                tmp_path):
    public = tmp_path / "public.jsonl"
    public.write_text("\n".join(json.dumps({"text": t}) for t in small_texts["public"][:60]) + "\n")
    fit_router(merged, public, [owner_data["code"], owner_data["news"]], tmp_path / "ridge", seq_len=32,
               public_windows=8, proxy_windows=8, scale=4.0)
    opt_out(tmp_path / "ridge/model", ["code"], tmp_path / "without", top_k=2)
    with torch.no_grad():
        masked = load_flexolmo(tmp_path / "ridge/model", exclude=["code"]).model(X).logits
        without = load_flexolmo(tmp_path / "without").model(X).logits
        full = load_flexolmo(tmp_path / "ridge/model").model(X).logits
    torch.testing.assert_close(masked, without, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(full, without, atol=1e-4)


def test_a_bad_method_or_ridge_value_is_refused_by_name():
    import pytest

    from flexolmo_core.io.params import ParamsError
    from flexolmo_core.training.config import RouterTuneConfig

    with pytest.raises(ParamsError, match="router_tune.method must be gradient or ridge"):
        RouterTuneConfig(method="closed-form")
    with pytest.raises(ParamsError, match="router_tune.ridge_scale must be a positive number"):
        RouterTuneConfig(method="ridge", ridge_scale=0.0)
