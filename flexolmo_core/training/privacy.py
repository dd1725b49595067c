"""Differentially private owner training: DP-SGD (Abadi et al., 2016) on the expert's trainable tensors only.

Each step, every example's gradient (of the expert FFN and its router row, the only tensors an owner trains) is
clipped to `max_grad_norm`, the clipped gradients are summed, Gaussian noise of standard deviation
noise_multiplier x max_grad_norm is added once per step, and the sum is divided by the batch size. The anchor's
weights and the public router row are frozen buffers: no gradient, bit-identical (training/stages.check_contract).

An *example* is one training window (loop.seq_len tokens): the guarantee is per window, so it covers a document
only when the document fits one window. The privacy spent is Opacus's RDP accountant on (noise multiplier,
sample rate, steps), with sample rate = global_batch / the owner's windows: an upper bound on each window's
chance to be in a step (public replay windows fill part of a batch; shuffled batches are accounted as Poisson
sampling, as Opacus does by default).

Why not Opacus's per-sample gradients: its hooks refuse a module that holds trainable parameters beside buffers
("Model contains a trainable layer with buffers that Opacus doesn't currently support", for every `Slots` of
training/model.py, with and without its functorch mode). So per-example gradients are computed here, two ways:
`add_batch` (the default fast path: torch.func's vmap over the gradient of a functional call, every example of
a micro-batch at once, with the plain-formula objective that functorch can differentiate) and `add_example`
(the readable reference: one example's backward at a time, `dp.vectorized: false`); a test checks they agree."""
from __future__ import annotations

import secrets
from dataclasses import dataclass

import torch
from torch.func import functional_call, grad, vmap

from flexolmo_core.errors import InputError


@dataclass
class DPConfig:
    """`expert.dp`: private training of the owner's expert."""

    enabled: bool = False  # train the expert with DP-SGD
    noise_multiplier: float = 0.0  # sigma (noise std = sigma x max_grad_norm); 0 with target_epsilon: calibrated
    max_grad_norm: float = 1.0  # per-example clipping bound C
    target_epsilon: float = 0.0  # > 0: choose sigma so that the whole run spends this epsilon (at delta)
    delta: float = 1e-5  # the guarantee's delta; keep it below 1 / (the owner's windows)
    # Noise from a known seed can be subtracted, which voids the guarantee: only for tests and reproducible
    # studies. Unset (-1), each step's noise comes from the operating system's randomness.
    noise_seed: int = -1
    vectorized: bool = True  # per-example gradients of a micro-batch at once (torch.func); false: one at a time

    def __post_init__(self) -> None:
        if self.max_grad_norm <= 0:
            raise InputError(f"expert.dp.max_grad_norm must be > 0, got {self.max_grad_norm}")
        if self.noise_multiplier < 0 or self.target_epsilon < 0:
            raise InputError("expert.dp.noise_multiplier and expert.dp.target_epsilon must be >= 0")
        if not 0 < self.delta < 1:
            raise InputError(f"expert.dp.delta must be in (0, 1), got {self.delta}")
        if self.enabled and (self.noise_multiplier > 0) == (self.target_epsilon > 0):
            raise InputError("expert.dp: give exactly one of noise_multiplier and target_epsilon (> 0)")


def spent_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """Epsilon of `steps` DP-SGD steps at (sigma, q), by Opacus's RDP accountant."""
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [(noise_multiplier, sample_rate, steps)]
    return float(accountant.get_epsilon(delta))


def calibrated_noise(target_epsilon: float, sample_rate: float, steps: int, delta: float) -> float:
    """The smallest sigma (to Opacus's tolerance, 0.01 in epsilon) whose run spends at most `target_epsilon`."""
    from opacus.accountants.utils import get_noise_multiplier

    return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate,
                                      steps=steps, accountant="rdp"))


class PrivateGradients:
    """One run's DP-SGD: `add_example(loss)` per example, `release(batch)` once per optimiser step."""

    def __init__(self, cfg: DPConfig, owner_windows: int, global_batch: int, steps: int):
        if owner_windows < 1:
            raise InputError("expert.dp: no owner windows to train on")
        self.cfg, self.steps = cfg, steps
        self.sample_rate = min(1.0, global_batch / owner_windows)
        self.noise_multiplier = cfg.noise_multiplier or calibrated_noise(cfg.target_epsilon, self.sample_rate, steps,
                                                                         cfg.delta)
        self.params: list[torch.Tensor] = []
        self.sum: list[torch.Tensor] | None = None
        self.examples = self.clipped = 0
        self.max_norm_seen = 0.0

    def bind(self, model) -> None:
        """The model and its trainable tensors (the expert's); everything else gets no gradient."""
        self.model = model
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.params = [p for p in model.parameters() if p.requires_grad]

    def add_example(self, loss: torch.Tensor) -> list[torch.Tensor]:
        """The reference: add one example's gradient, clipped to max_grad_norm; returns the clipped gradient."""
        return [g[0] for g in self._add_clipped([g[None] for g in torch.autograd.grad(loss, self.params)])]

    def add_batch(self, rows: torch.Tensor, loss_of) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The fast path: every row's gradient at once, each clipped as `add_example` clips it; returns (the
        clipped per-example gradients [rows, ...], each row's cross-entropy). `loss_of(model outputs, targets)`
        -> (loss, cross-entropy) must be functorch-friendly (training/objective.reference_objective; the fused
        loss's autograd.Function is not)."""
        buffers = dict(self.model.named_buffers())

        def one(params, row):
            return loss_of(functional_call(self.model, {**params, **buffers}, (row[None, :-1],)), row[None, 1:])

        params = {n: p.detach() for n, p in zip(self.names, self.params)}
        grads, ce = vmap(grad(one, has_aux=True), in_dims=(None, 0))(params, rows)
        return self._add_clipped([grads[n] for n in self.names]), ce

    def _add_clipped(self, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per-example gradients [B, ...] per tensor: clip each example's to max_grad_norm, add to the sum."""
        norms = torch.sqrt(sum(g.float().pow(2).flatten(1).sum(1) for g in grads))
        scale = (self.cfg.max_grad_norm / (norms + 1e-12)).clamp(max=1.0)
        clipped = [g * scale.view(-1, *[1] * (g.dim() - 1)).to(g.dtype) for g in grads]
        total = [c.sum(0) for c in clipped]
        self.sum = total if self.sum is None else [s + t for s, t in zip(self.sum, total)]
        self.examples += len(norms)
        self.clipped += int((scale < 1.0).sum())
        self.max_norm_seen = max(self.max_norm_seen, float(norms.max()))
        return clipped

    def release(self, batch_size: int, step: int) -> None:
        """Set each trainable tensor's .grad to (sum of clipped gradients + noise) / batch_size."""
        generator = torch.Generator(device=self.params[0].device)
        generator.manual_seed(self.cfg.noise_seed * 1_000_003 + step if self.cfg.noise_seed >= 0
                              else secrets.randbits(63))
        std = self.noise_multiplier * self.cfg.max_grad_norm
        for p, s in zip(self.params, self.sum):
            noise = torch.randn(s.shape, generator=generator, device=s.device, dtype=s.dtype) * std
            p.grad = ((s + noise) / batch_size).to(p.dtype)
        self.sum = None

    def record(self) -> dict:
        """What the package manifest and the summary keep: the guarantee and how it was accounted."""
        import opacus

        return {"epsilon": round(spent_epsilon(self.noise_multiplier, self.sample_rate, self.steps, self.cfg.delta), 4),
                "delta": self.cfg.delta, "noise_multiplier": self.noise_multiplier,
                "max_grad_norm": self.cfg.max_grad_norm, "sample_rate": self.sample_rate, "steps": self.steps,
                "accountant": f"RDP (opacus {opacus.__version__}), Poisson sampling assumed",
                "unit": "one training window", "clipped_fraction": round(self.clipped / max(1, self.examples), 4),
                "max_example_grad_norm": round(self.max_norm_seen, 4)}
