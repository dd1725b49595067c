"""The one training loop: anchor pretraining, owner expert training, router tuning and the unrestricted-MoE
baseline differ only in which tensors are trainable (decided when the FastOlmo is built) and in their data.

Per optimiser step: global_batch sequences = micro_batch x accumulation x ranks; rank r at micro-step m
reads global samples step*G + (m*world + r)*micro + [0, micro), so a single process with the same global
batch reads the same samples. The data order is a function of (seed, sample index), and checkpoints carry
trainable weights + AdamW state, so a resumed run reproduces an uninterrupted one bit for bit."""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import itertools
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

import flexolmo_core.training.distributed as D
from flexolmo_core.errors import InputError
from flexolmo_core.io.dtypes import compute_dtype, dtype_name
from flexolmo_core.training.checkpoint import (
    RESUMABLE_CHANGES,
    check_run_record,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from flexolmo_core.training.config import LoopConfig
from flexolmo_core.training.data import Order, batch, batch_labels, fixed_batches
from flexolmo_core.training.model import FastOlmo, count_matmul_flops
from flexolmo_core.training.objective import objective, reference_objective
from flexolmo_core.training.privacy import PrivateGradients
from flexolmo_core.training.schedule import lr_at


def measure_matmul_peak(dtype: torch.dtype, device: torch.device | str = "cpu", n: int | None = None,
                        reps: int = 8) -> float:
    """FLOP/s of a square matmul in `dtype` on `device`, now (the MFU denominator). On a GPU the matrices are
    large (8192) so the tensor cores, not the launch, set the time."""
    device = torch.device(device)
    n = n or (8192 if device.type == "cuda" else 1024)
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(2):
        a @ b
    sync()
    best = math.inf
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync()
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 * reps / best


def drop_torn_summary(live_dir: Path) -> None:
    """dvclive rewrites its summary (metrics.json) in place at every logged step, so a run killed in the middle
    of that write leaves torn JSON, and dvclive's resume cannot read it (a kill-and-resume test hit this). The
    summary is rewritten at the next step, so a torn one is dropped; the curves (.tsv, appended) stay."""
    summary = Path(live_dir) / "metrics.json"
    try:
        json.loads(summary.read_text())
    except FileNotFoundError:
        pass
    except (json.JSONDecodeError, UnicodeDecodeError):
        summary.unlink()


def make_optimizer(model, cfg: LoopConfig) -> torch.optim.AdamW:
    """AdamW with groups: matrices (decayed), norms (not decayed), router rows (decayed) and router biases
    (not decayed); `group_lr` gives each group its learning rate on every step."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            local = name.rsplit(".", 1)[-1]
            router = local.startswith(("router_", "bias_"))
            no_decay = "norm" in local or local.startswith("bias_")
            groups.setdefault((router, no_decay), []).append(p)
    param_groups = [{"params": params, "weight_decay": 0.0 if no_decay else cfg.weight_decay, "router": router}
                    for (router, no_decay), params in sorted(groups.items())]
    # The fused kernel is one pass per tensor (at tiny: 10 -> 4 ms per anchor step); FSDP's sharded DTensor
    # parameters keep the default implementation.
    fused = cfg.distributed != "fsdp"
    return torch.optim.AdamW(param_groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused)


def group_lr(group: dict, lr: float, cfg: LoopConfig) -> float:
    """The scheduled lr for one optimiser group. The router scale is read from the config, not stored in the
    group, so a resumed run follows the config it is resumed with."""
    return lr * (cfg.router_lr_scale if group["router"] else 1.0)


@torch.no_grad()
def evaluate(model, windows, cfg: LoopConfig) -> float | None:
    """Mean token cross-entropy over fixed validation batches (identical for every model compared)."""
    if windows is None or len(windows) == 0:
        return None
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    device = next(itertools.chain(model.parameters(), model.buffers())).device
    for rows in fixed_batches(windows, cfg.micro_batch, cfg.eval_batches):
        rows = rows.to(device)
        logits, _ = model(rows[:, :-1])
        _, ce = objective(logits, rows[:, 1:], logits.new_zeros(()), 0.0, 0.0)
        total, n = total + float(ce) * len(rows), n + len(rows)
    model.train(was_training)
    return total / n


SPEED_WINDOW = 20  # steps in the moving average of tokens/s shown while training
PLAIN_REPORTS = 20  # progress lines per training run when there is no terminal for a bar


@dataclass
class Run:
    """What one training run holds between steps (built by `setup`)."""

    cfg: LoopConfig
    dist: object
    run_dir: Path
    label: str
    inner: FastOlmo  # the model itself (for casts, projections and parameter counts)
    wrapped: object  # DDP / FSDP around it, or the model
    forward: object  # `wrapped`, compiled or not
    optimizer: torch.optim.AdamW
    windows: object
    order: Order
    accum: int
    flops: dict
    peak: float
    device: torch.device = torch.device("cpu")  # where the model, the batches and the reductions live
    dtype_rates: dict = field(default_factory=dict)  # matmul FLOP/s by dtype that chose `loop.dtype: auto`
    start_step: int = 0
    resumed_from: str | None = None
    meta: dict = field(default_factory=dict)
    live: object = None
    bar: object = None
    report_every: int = 0  # without a terminal: a plain `[k/N]` line every this many steps
    losses: list = field(default_factory=list)
    val_history: list = field(default_factory=list)
    timed_steps: int = 0
    timed_seconds: float = 0.0
    recent_seconds: collections.deque = field(default_factory=lambda: collections.deque(maxlen=SPEED_WINDOW))
    private: PrivateGradients | None = None  # DP-SGD (owner experts, expert.dp); None: plain gradients

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.global_batch * self.cfg.seq_len


def train(model: FastOlmo, windows, cfg: LoopConfig, run_dir, val_windows=None, label: str = "train",
          inputs: dict | None = None, private: PrivateGradients | None = None) -> dict:
    """Train `model` in place (resuming from run_dir/checkpoints if there are any); returns the summary.
    `inputs` (data hash, anchor fingerprint, ...) joins the loop settings in the run record a resume must match.
    `private`: DP-SGD's per-example clipping and noise replace the global gradient clip (training/privacy.py)."""
    if private is not None and cfg.router_aux_ce:
        raise InputError(f"{label}: expert.dp and loop.router_aux_ce cannot be combined (DP trains owners; the "
                         "routing cross-entropy is router tuning's)")
    if cfg.router_aux_ce and not hasattr(windows, "label_of"):
        raise InputError(f"{label}: loop.router_aux_ce needs windows labelled by proxy set (router tuning's "
                         f"Mixture); these are {type(windows).__name__}")
    run = setup(model, windows, cfg, run_dir, label, inputs or {})
    if private is not None:
        if run.dist.world > 1:
            raise InputError(f"{label}: expert.dp runs in one process (noise is added once per step)")
        private.bind(run.inner)
        run.private = private
    run.wrapped.train()
    for step in range(run.start_step, cfg.steps):
        t0 = time.perf_counter()
        lr, step_ce, grad_norm = train_step(run, step)
        seconds = time.perf_counter() - t0
        if step > run.start_step or cfg.steps - run.start_step == 1:  # the first step pays for warm-up/compilation
            run.timed_steps, run.timed_seconds = run.timed_steps + 1, run.timed_seconds + seconds
        done = step + 1
        if cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.steps:
            run.val_history.append((done, evaluate(run.wrapped, val_windows, cfg)))
        log_step(run, done, lr, step_ce, grad_norm, seconds)
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            save_checkpoint(run.run_dir, done, run.wrapped, run.optimizer, {"label": label, "last_loss": step_ce},
                            cfg.keep_checkpoints, run.dist.main)
            D.barrier(run.dist)
    if run.bar is not None:
        run.bar.close()
    return summarize(run, evaluate(run.wrapped, val_windows, cfg))


def setup(model: FastOlmo, windows, cfg: LoopConfig, run_dir, label: str, inputs: dict | None = None) -> Run:
    """Check the batch arithmetic, place and wrap the model, build the optimiser, resume from the latest
    checkpoint, measure the matmul peak and open the dvclive log and progress bar."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dist = D.setup(cfg.device)
    run_dir = Path(run_dir)
    per_rank = cfg.micro_batch * dist.world
    if cfg.global_batch % per_rank:
        raise InputError(f"global_batch {cfg.global_batch} is not a multiple of micro_batch x ranks = {per_rank}")
    if len(windows) == 0:
        raise InputError("no training windows")

    device = D.device(dist, cfg.device)
    # every rank measures, and all choose from the mean over ranks (one compute dtype for the whole run)
    dtype, rates = compute_dtype(cfg.dtype, device, lambda dt, on: D.mean(measure_matmul_peak(dt, on), dist, on))
    model.compute_dtype = dtype
    inner = model.to(device)
    trainable = {n for n, p in inner.named_parameters() if p.requires_grad}
    flops = count_matmul_flops(inner.cfg, inner.moe, cfg.seq_len,
                               lambda name: name in trainable or f"w.{name}" in trainable
                               or _slot_param(name) in trainable)
    wrapped = D.wrap(inner, dist, cfg.distributed)
    run = Run(cfg, dist, run_dir, label, inner, wrapped, torch.compile(wrapped) if cfg.compile else wrapped,
              make_optimizer(wrapped, cfg), windows, Order(len(windows), cfg.seed), cfg.global_batch // per_rank,
              flops, 0.0, device=device, dtype_rates=rates)
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RESUMABLE_CHANGES}
    check_run_record(run_dir, {"label": label, "loop": settings, **(inputs or {})}, dist.main)
    found = latest_checkpoint(run_dir)
    if found is not None:
        run.meta = load_checkpoint(found, wrapped, run.optimizer)
        run.start_step, run.resumed_from = int(run.meta["step"]), found.name
        inner.clear_cast_cache()
    run.peak = rates.get(dtype_name(dtype)) or measure_matmul_peak(dtype, device)
    if dist.main and rates:
        print(f"{label}: loop.dtype auto -> {dtype_name(dtype)} (matmul here: "
              + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in rates.items()) + " GFLOP/s)", flush=True)
    if dist.main:
        from dvclive import Live

        drop_torn_summary(run_dir / "dvclive")
        run.live = Live(dir=str(run_dir / "dvclive"), resume=run.start_step > 0, save_dvc_exp=False, dvcyaml=False)
        if cfg.progress and sys.stderr.isatty():
            run.bar = tqdm(total=cfg.steps, initial=run.start_step, desc=label, unit="step", dynamic_ncols=True)
        elif cfg.progress:  # a log file or the Prefect UI: a bar's carriage returns would be one line per step
            run.report_every = max(1, cfg.steps // PLAIN_REPORTS)
    return run


def train_step(run: Run, step: int) -> tuple[float, float, torch.Tensor]:
    """One optimiser step (micro-batches accumulated, gradients clipped, router biases projected);
    returns (lr, mean cross-entropy over ranks, gradient norm)."""
    cfg, dist, wrapped = run.cfg, run.dist, run.wrapped
    lr = lr_at(step, cfg.lr, cfg.warmup, cfg.steps, cfg.final_lr_ratio)
    for group in run.optimizer.param_groups:
        group["lr"] = group_lr(group, lr, cfg)
    step_ce = 0.0
    for m in range(run.accum):
        start = step * cfg.global_batch + (m * dist.world + dist.rank) * cfg.micro_batch
        rows = batch(run.windows, run.order, start, cfg.micro_batch).to(run.device, non_blocking=True)
        if cfg.router_aux_ce:
            run.inner.set_router_targets(batch_labels(run.windows, run.order, start, cfg.micro_batch).to(run.device))
        if run.private is not None:  # each example's gradient clipped before it joins the sum
            if run.private.cfg.vectorized:
                _, ce = run.private.add_batch(rows, lambda out, targets: reference_objective(
                    out[0], targets, out[1], cfg.router_z_loss, cfg.logit_z_loss))
                step_ce += float(ce.sum()) / cfg.global_batch
                continue
            for row in rows:  # the reference: one example's backward at a time
                logits, router_z = run.forward(row[None, :-1])
                loss, ce = objective(logits, row[None, 1:], router_z, cfg.router_z_loss, cfg.logit_z_loss)
                run.private.add_example(loss)
                step_ce += float(ce) / cfg.global_batch
            continue
        sync = m == run.accum - 1 or not hasattr(wrapped, "no_sync")
        with (contextlib.nullcontext() if sync else wrapped.no_sync()):
            logits, router_z = run.forward(rows[:, :-1])
            loss, ce = objective(logits, rows[:, 1:], router_z, cfg.router_z_loss, cfg.logit_z_loss)
            if cfg.router_aux_ce:
                loss = loss + cfg.router_aux_ce * run.inner.routing_ce()
                run.inner.set_router_targets(None)  # validation and checkpoints run without labels
            (loss / run.accum).backward()
        step_ce += float(ce) / run.accum
    trainable = [p for p in wrapped.parameters() if p.requires_grad]
    if run.private is not None:
        run.private.release(cfg.global_batch, step)
        grad_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in trainable]))
    else:
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.inner.project_after_step()
    step_ce = D.mean(step_ce, dist, run.device)
    run.losses.append(step_ce)
    return lr, step_ce, grad_norm


def log_step(run: Run, done: int, lr: float, step_ce: float, grad_norm, seconds: float) -> float:
    """dvclive metrics and the progress bar (rank 0 only). tokens/s is the mean over the last SPEED_WINDOW
    steps: one step's figure swings with the machine's other work (92 to 6,926 on 2 shared cores)."""
    run.recent_seconds.append(seconds)
    label = run.label
    tokens_per_s = run.tokens_per_step * len(run.recent_seconds) / sum(run.recent_seconds)
    if run.live is not None:
        run.live.step = done
        run.live.log_metric(f"{label}/loss", step_ce)
        run.live.log_metric(f"{label}/lr", lr)
        run.live.log_metric(f"{label}/tokens_per_s", tokens_per_s)
        run.live.log_metric(f"{label}/grad_norm", float(grad_norm))
        if run.val_history and run.val_history[-1][0] == done and run.val_history[-1][1] is not None:
            run.live.log_metric(f"{label}/val_loss", run.val_history[-1][1])
        run.live.next_step()
    if run.bar is not None:
        run.bar.set_postfix(loss=f"{step_ce:.3f}", tok_s=f"{tokens_per_s:,.0f}", lr=f"{lr:.2e}")
        run.bar.update(1)
    elif run.report_every and (done % run.report_every == 0 or done == run.cfg.steps):
        print(f"{label}: [{done}/{run.cfg.steps}] loss {step_ce:.3f}, {tokens_per_s:,.0f} tokens/s, lr {lr:.2e}",
              file=sys.stderr, flush=True)
    return tokens_per_s


def summarize(run: Run, val_loss: float | None) -> dict:
    """The run's summary (what summary.json and the package manifest record); closes the dvclive log."""
    cfg, losses = run.cfg, run.losses
    tokens_per_s = run.tokens_per_step * run.timed_steps / run.timed_seconds if run.timed_seconds else None
    achieved = run.flops["train_step"] * tokens_per_s if tokens_per_s else None
    summary = {
        "label": run.label, "steps": cfg.steps, "resumed_from": run.resumed_from, "world_size": run.dist.world,
        "global_batch": cfg.global_batch, "micro_batch": cfg.micro_batch, "accumulation": run.accum,
        "seq_len": cfg.seq_len, "tokens": cfg.steps * run.tokens_per_step, "lr": cfg.lr, "warmup": cfg.warmup,
        "weight_decay": cfg.weight_decay, "seed": cfg.seed,
        "dtype": dtype_name(run.inner.compute_dtype), "dtype_rates": run.dtype_rates or None,
        "train_loss": (sum(losses[-10:]) / len(losses[-10:])) if losses else run.meta.get("last_loss"),
        "first_loss": losses[0] if losses and run.start_step == 0 else None,
        "val_loss": val_loss, "val_history": run.val_history,
        "wall_seconds": round(run.timed_seconds, 3), "tokens_per_s": tokens_per_s,
        "train_flops_per_token": run.flops["train_step"], "matmul_peak_flops": run.peak,
        "mfu": (achieved / run.peak) if achieved else None,
        "trainable_params": sum(p.numel() for p in run.inner.parameters() if p.requires_grad),
        **({"dp": run.private.record()} if run.private is not None else {}),
    }
    if run.live is not None:
        if val_loss is not None:
            run.live.summary[f"{run.label}/val_loss"] = val_loss
        run.live.end()
    return summary


def _slot_param(name: str) -> str:
    """Internal tensor name -> the module parameter name (`layers.0.q` -> `layers.0.w.q`, `embed` -> `w.embed`)."""
    if name.startswith("layers."):
        _, i, local = name.split(".", 2)
        return f"layers.{i}.w.{local}"
    return f"w.{name}"
