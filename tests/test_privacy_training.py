"""DP-SGD for owners (training/privacy.py): every example's gradient is clipped before it joins the update,
the noise has the promised scale, the frozen tensors stay frozen, and the epsilon a package records is the
accountant's for the run it describes."""
import copy
import json

import pytest
import torch

from flexolmo_core.training.objective import objective
from flexolmo_core.training.privacy import DPConfig, PrivateGradients, calibrated_noise, spent_epsilon
from flexolmo_core.training.stages import owner_fast_model

C = 1e-3  # far below the smoke model's per-example gradient norms: every example is clipped
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])  # the GPU check runs the cuda cases


def example_loss(model, row):
    logits, router_z = model(row[None, :-1])
    return objective(logits, row[None, 1:], router_z, 1e-3, 1e-5)[0]


def example_ce(model, row):
    logits, router_z = model(row[None, :-1])
    return objective(logits, row[None, 1:], router_z, 1e-3, 1e-5)[1]


@pytest.fixture(scope="module")
def owner(smoke_anchor):
    model, _ = owner_fast_model(smoke_anchor, None, None, False, 2)
    rows = torch.randint(0, 200, (4, 17), generator=torch.Generator().manual_seed(0))
    return model, rows


def owner_on(owner, device: str):
    """The owner model and rows on `device` (a copy for cuda: the CPU tests share the module's model)."""
    model, rows = owner
    return (model, rows) if device == "cpu" else (copy.deepcopy(model).to(device), rows.to(device))


@pytest.mark.parametrize("device", DEVICES)
def test_each_example_is_clipped_before_it_joins_the_update(owner, device):
    model, rows = owner_on(owner, device)
    private = PrivateGradients(DPConfig(enabled=True, noise_multiplier=1.0, max_grad_norm=C), 100, 4, 10)
    private.noise_multiplier = 0.0  # no noise: the update is exactly the mean of the clipped gradients
    private.bind(model)
    params = private.params
    assert params and all(".w." in n for n, p in model.named_parameters() if p.requires_grad)
    expected = [torch.zeros_like(p) for p in params]
    for row in rows:
        raw = torch.autograd.grad(example_loss(model, row), params)  # the unclipped gradient, computed apart
        norm = torch.sqrt(sum(g.pow(2).sum() for g in raw))
        assert norm > C
        clipped = private.add_example(example_loss(model, row))
        assert torch.sqrt(sum(g.pow(2).sum() for g in clipped)) <= C * (1 + 1e-5)
        expected = [e + g * (C / norm) for e, g in zip(expected, raw)]
    private.release(len(rows), step=0)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.grad, e / len(rows), rtol=1e-5, atol=1e-12)
    assert private.record()["clipped_fraction"] == 1.0
    assert all(b.grad is None for b in model.buffers())  # the anchor's weights never get a gradient


def test_the_noise_has_standard_deviation_sigma_times_the_bound_over_the_batch(owner):
    model, rows = owner
    sigma, batch = 0.7, len(rows)
    private = PrivateGradients(DPConfig(enabled=True, noise_multiplier=sigma, max_grad_norm=C, noise_seed=3), 100, 4, 10)
    private.bind(model)
    clean = [torch.zeros_like(p) for p in private.params]
    for row in rows:
        clean = [c + g for c, g in zip(clean, private.add_example(example_loss(model, row)))]
    private.release(batch, step=0)
    noise = torch.cat([(p.grad - c / batch).flatten() for p, c in zip(private.params, clean)])
    assert noise.numel() > 5 * 10**4  # std within 1%: about 4.5 standard errors at this count
    assert abs(float(noise.std()) / (sigma * C / batch) - 1) < 0.01 and abs(float(noise.mean())) < 0.02 * sigma * C / batch


@pytest.mark.parametrize("device", DEVICES)
def test_the_vectorised_path_gives_the_reference_paths_clipped_gradients(owner, device):
    from flexolmo_core.training.objective import reference_objective

    model, rows = owner_on(owner, device)
    cfg = DPConfig(enabled=True, noise_multiplier=1.0, max_grad_norm=0.05)
    fast, slow = (PrivateGradients(cfg, 100, 4, 10) for _ in range(2))
    fast.bind(model), slow.bind(model)
    clipped, ce = fast.add_batch(rows, lambda out, targets: reference_objective(out[0], targets, out[1], 1e-3, 1e-5))
    for i, row in enumerate(rows):
        for a, b in zip(clipped, slow.add_example(example_loss(model, row))):
            # atol 1e-8: on CUDA the two paths' reduction orders differ by ~1e-9 on near-zero elements (seen on an H200)
            torch.testing.assert_close(a[i], b, rtol=1e-4, atol=1e-8)
        assert torch.allclose(ce[i], example_ce(model, row), atol=1e-5)
    assert fast.clipped == slow.clipped and fast.examples == slow.examples == len(rows)
    for a, b in zip(fast.sum, slow.sum):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-8)


def test_calibration_meets_the_target_epsilon():
    sigma = calibrated_noise(4.0, sample_rate=0.05, steps=200, delta=1e-5)
    assert 3.9 <= spent_epsilon(sigma, 0.05, 200, 1e-5) <= 4.0
    assert spent_epsilon(2 * sigma, 0.05, 200, 1e-5) < 2.0  # more noise, less spent


def test_a_private_owner_records_the_accountants_epsilon_and_keeps_its_contract(smoke_anchor, owner_data, tmp_path,
                                                                                 capsys):
    from opacus.accountants import RDPAccountant

    from flexolmo_core.cli.inspect import describe
    from flexolmo_core.training.config import LoopConfig
    from flexolmo_core.training.data import open_windows
    from flexolmo_core.training.stages import train_expert

    loop = LoopConfig(steps=3, lr=1e-3, warmup=1, global_batch=4, micro_batch=2, seq_len=32, checkpoint_every=3,
                      eval_batches=1, progress=False)
    dp = DPConfig(enabled=True, target_epsilon=8.0, max_grad_norm=0.5, delta=1e-3)
    summary = train_expert(smoke_anchor, "code", [owner_data["code"]], tmp_path / "code", loop, dp=dp)
    record = json.loads((tmp_path / "code/package/manifest.json").read_text())["training"]["dp"]
    windows = len(open_windows([owner_data["code"]], loop.seq_len, smoke_anchor))
    assert record["sample_rate"] == 4 / windows and record["steps"] == 3 and record["delta"] == 1e-3
    accountant = RDPAccountant()  # the guarantee, recomputed apart from the code under test
    accountant.history = [(record["noise_multiplier"], 4 / windows, 3)]
    assert record["epsilon"] == round(accountant.get_epsilon(1e-3), 4) and record["epsilon"] <= 8.0
    assert summary["dp"] == record
    assert describe(tmp_path / "code/package")["privacy"] == {"epsilon": record["epsilon"], "delta": 1e-3}
    from flexolmo_core.cli.main import main

    registry = str(tmp_path / "registry")
    assert main(["registry", "init", registry, "--anchor", str(smoke_anchor)]) == 0
    assert main(["publish", str(tmp_path / "code/package"), "--registry", registry]) == 0
    capsys.readouterr()
    assert main(["registry", "list", registry]) == 0
    listed = json.loads(capsys.readouterr().out)["experts"]["code"]["privacy"]
    assert listed == {"epsilon": record["epsilon"], "delta": 1e-3}
    # check_contract ran inside train_expert: the anchor's weights and the public router row did not move


def test_dp_with_the_routing_cross_entropy_is_refused_before_anything_runs(owner, tmp_path):
    from flexolmo_core.errors import InputError
    from flexolmo_core.training.config import LoopConfig
    from flexolmo_core.training.loop import train

    model, rows = owner
    private = PrivateGradients(DPConfig(enabled=True, noise_multiplier=1.0), 100, 4, 1)
    with pytest.raises(InputError, match="expert.dp and loop.router_aux_ce cannot be combined"):
        train(model, list(rows), LoopConfig(steps=1, global_batch=4, micro_batch=4, router_aux_ce=0.1),
              tmp_path / "run", private=private)
    assert not (tmp_path / "run").exists()
