"""The one training loop: anchor pretraining, owner expert training, router tuning and the unrestricted-MoE
baseline differ only in which tensors are trainable (decided when the FastOlmo is built) and in their data.

Per optimiser step: global_batch sequences = micro_batch x accumulation x ranks; rank r at micro-step m
reads global samples step*G + (m*world + r)*micro + [0, micro), so a single process with the same global
batch reads the same samples. The data order is a function of (seed, sample index), and checkpoints carry
trainable weights + AdamW state, so a resumed run reproduces an uninterrupted one bit for bit."""
from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path

import torch

from . import distributed as D
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import LoopConfig
from .data import Order, batch, fixed_batches
from .model import FastOlmo, count_matmul_flops
from .objective import objective
from .schedule import lr_at

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


def measure_matmul_peak(dtype: torch.dtype, n: int = 1024, reps: int = 8) -> float:
    """FLOP/s of a square matmul in `dtype` on this machine, now (the MFU denominator)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(2):
        a @ b
    best = math.inf
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 * reps / best


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
    for rows in fixed_batches(windows, cfg.micro_batch, cfg.eval_batches):
        logits, _ = model(rows[:, :-1])
        _, ce = objective(logits, rows[:, 1:], logits.new_zeros(()), 0.0, 0.0)
        total, n = total + float(ce) * len(rows), n + len(rows)
    model.train(was_training)
    return total / n


def train(model: FastOlmo, windows, cfg: LoopConfig, run_dir, val_windows=None, label: str = "train") -> dict:
    """Train `model` in place (resuming from run_dir/checkpoints if there are any); returns the summary."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dist = D.setup()
    run_dir = Path(run_dir)
    dtype = DTYPES[cfg.dtype]
    model.compute_dtype = dtype
    per_rank = cfg.micro_batch * dist.world
    if cfg.global_batch % per_rank:
        raise ValueError(f"global_batch {cfg.global_batch} is not a multiple of micro_batch x ranks = {per_rank}")
    accum = cfg.global_batch // per_rank
    if len(windows) == 0:
        raise ValueError("no training windows")

    inner = model.to(D.device(dist))
    trainable = {n for n, p in inner.named_parameters() if p.requires_grad}
    flops = count_matmul_flops(inner.cfg, inner.moe, cfg.seq_len,
                               lambda name: name in trainable or f"w.{name}" in trainable
                               or _slot_param(name) in trainable)
    wrapped = D.wrap(inner, dist, cfg.distributed)
    forward = torch.compile(wrapped) if cfg.compile else wrapped
    optimizer = make_optimizer(wrapped, cfg)

    start_step, resumed_from, meta = 0, None, {}
    found = latest_checkpoint(run_dir)
    if found is not None:
        meta = load_checkpoint(found, wrapped, optimizer)
        start_step, resumed_from = int(meta["step"]), found.name
        inner.clear_cast_cache()

    peak = measure_matmul_peak(dtype)
    order = Order(len(windows), cfg.seed)
    tokens_per_step = cfg.global_batch * cfg.seq_len
    live = bar = None
    if dist.main:
        from dvclive import Live

        live = Live(dir=str(run_dir / "dvclive"), resume=start_step > 0, save_dvc_exp=False, dvcyaml=False)
        if cfg.progress:
            from tqdm import tqdm

            bar = tqdm(total=cfg.steps, initial=start_step, desc=label, unit="step", dynamic_ncols=True)

    wrapped.train()
    losses: list[float] = []
    timed_steps, timed_seconds = 0, 0.0
    val_history = []
    for step in range(start_step, cfg.steps):
        t0 = time.perf_counter()
        lr = lr_at(step, cfg.lr, cfg.warmup, cfg.steps, cfg.final_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = group_lr(group, lr, cfg)
        step_ce = 0.0
        for m in range(accum):
            rows = batch(windows, order, step * cfg.global_batch + (m * dist.world + dist.rank) * cfg.micro_batch,
                         cfg.micro_batch)
            sync = m == accum - 1 or not hasattr(wrapped, "no_sync")
            with (contextlib.nullcontext() if sync else wrapped.no_sync()):
                logits, router_z = forward(rows[:, :-1])
                loss, ce = objective(logits, rows[:, 1:], router_z, cfg.router_z_loss, cfg.logit_z_loss)
                (loss / accum).backward()
            step_ce += float(ce) / accum
        grad_norm = torch.nn.utils.clip_grad_norm_([p for p in wrapped.parameters() if p.requires_grad],
                                                   cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        inner.project_after_step()
        step_ce = D.mean(step_ce, dist)
        losses.append(step_ce)
        seconds = time.perf_counter() - t0
        if step > start_step or cfg.steps - start_step == 1:  # the first step pays for warm-up/compilation
            timed_steps, timed_seconds = timed_steps + 1, timed_seconds + seconds
        done = step + 1
        if cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.steps:
            val_history.append((done, evaluate(wrapped, val_windows, cfg)))
        if live is not None:
            live.step = done
            live.log_metric(f"{label}/loss", step_ce)
            live.log_metric(f"{label}/lr", lr)
            live.log_metric(f"{label}/tokens_per_s", tokens_per_step / seconds)
            live.log_metric(f"{label}/grad_norm", float(grad_norm))
            if val_history and val_history[-1][0] == done and val_history[-1][1] is not None:
                live.log_metric(f"{label}/val_loss", val_history[-1][1])
            live.next_step()
        if bar is not None:
            bar.set_postfix(loss=f"{step_ce:.3f}", tok_s=f"{tokens_per_step / seconds:,.0f}", lr=f"{lr:.2e}")
            bar.update(1)
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            save_checkpoint(run_dir, done, wrapped, optimizer, {"label": label, "last_loss": step_ce},
                            cfg.keep_checkpoints, dist.main)
            D.barrier(dist)
    if bar is not None:
        bar.close()

    val_loss = evaluate(wrapped, val_windows, cfg)
    tokens_per_s = tokens_per_step * timed_steps / timed_seconds if timed_seconds else None
    achieved = flops["train_step"] * tokens_per_s if tokens_per_s else None
    summary = {
        "label": label, "steps": cfg.steps, "resumed_from": resumed_from, "world_size": dist.world,
        "global_batch": cfg.global_batch, "micro_batch": cfg.micro_batch, "accumulation": accum,
        "seq_len": cfg.seq_len, "tokens": cfg.steps * tokens_per_step, "lr": cfg.lr, "warmup": cfg.warmup,
        "weight_decay": cfg.weight_decay, "dtype": cfg.dtype, "seed": cfg.seed,
        "train_loss": (sum(losses[-10:]) / len(losses[-10:])) if losses else meta.get("last_loss"),
        "first_loss": losses[0] if losses and start_step == 0 else None,
        "val_loss": val_loss, "val_history": val_history,
        "wall_seconds": round(timed_seconds, 3), "tokens_per_s": tokens_per_s,
        "train_flops_per_token": flops["train_step"], "matmul_peak_flops": peak,
        "mfu": (achieved / peak) if achieved else None,
        "trainable_params": sum(p.numel() for p in inner.parameters() if p.requires_grad),
    }
    if live is not None:
        if val_loss is not None:
            live.summary[f"{label}/val_loss"] = val_loss
        live.end()
    return summary


def _slot_param(name: str) -> str:
    """Internal tensor name -> the module parameter name (`layers.0.q` -> `layers.0.w.q`, `embed` -> `w.embed`)."""
    if name.startswith("layers."):
        _, i, local = name.split(".", 2)
        return f"layers.{i}.w.{local}"
    return f"w.{name}"
