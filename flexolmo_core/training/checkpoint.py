"""Atomic, resumable checkpoints: trainable weights + AdamW state as safetensors, the rest as JSON.

A checkpoint is `checkpoints/step-<N>/` written through a temporary directory and one rename, so a
SIGKILL at any moment leaves either the previous set or the new one. Frozen weights are not saved: they
are rebuilt from the run's inputs (the anchor), which is what makes a 7B owner's checkpoint small.
Nothing is pickled (the RNG state is a uint8 tensor in the safetensors file)."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from flexolmo_core.errors import InputError, read_json
from flexolmo_core.io.atomic import atomic_dir, write_json

RUN_RECORD = "run.json"
# loop settings that may change between a run and its resume: they do not change what the steps so far computed
RESUMABLE_CHANGES = ("steps", "checkpoint_every", "keep_checkpoints", "eval_batches", "eval_every", "threads",
                     "progress", "compile", "distributed", "micro_batch", "device")
STEP_DIR = re.compile(r"step-(\d{8})")  # fullmatch
HYPER = ("lr", "betas", "eps", "weight_decay")


def _state(model, optimizer):
    # full (unsharded) state on every rank under FSDP; plain names under DDP
    return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_checkpoint(run_dir, step: int, model, optimizer, extra: dict, keep: int, is_main: bool = True) -> Path | None:
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    model_sd, optim_sd = _state(model, optimizer)  # collective under FSDP: every rank calls it
    if not is_main:
        return None
    names = {_clean(n) for n in trainable}
    tensors = {f"model/{n}": t.detach().contiguous() for n, t in model_sd.items() if n in names}
    for name, state in optim_sd["state"].items():
        for key, value in state.items():
            tensors[f"optim/{name}/{key}"] = torch.as_tensor(value).detach().contiguous()
    tensors["rng/torch"] = torch.get_rng_state()
    groups = [{k: g[k] for k in HYPER if k in g} | {"params": list(g["params"])} for g in optim_sd["param_groups"]]
    final = Path(run_dir) / "checkpoints" / f"step-{step:08d}"
    with atomic_dir(final) as tmp:
        save_file(tensors, str(tmp / "state.safetensors"))
        write_json(tmp / "state.json", {"step": step, "param_groups": groups, **extra})
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _clean(name: str) -> str:
    return name.removeprefix("module.")


def list_checkpoints(run_dir) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if STEP_DIR.fullmatch(p.name) and (p / "state.json").exists()]
    return sorted(done, key=lambda p: int(STEP_DIR.fullmatch(p.name).group(1)))


def latest_checkpoint(run_dir) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def load_checkpoint(path, model, optimizer) -> dict:
    """Restore trainable weights, optimiser state and RNG in place; returns state.json."""
    path = Path(path)
    meta = json.loads((path / "state.json").read_text())
    tensors = load_file(str(path / "state.safetensors"))
    model_sd = {k.removeprefix("model/"): v for k, v in tensors.items() if k.startswith("model/")}
    optim_state: dict = {}
    for key, value in tensors.items():
        if key.startswith("optim/"):
            name, field = key.removeprefix("optim/").rsplit("/", 1)
            optim_state.setdefault(name, {})[field] = value
    current = optimizer.state_dict()["param_groups"]
    groups = [{**cur_g, **{k: (tuple(v) if k == "betas" else v) for k, v in saved.items()}}
              for cur_g, saved in zip(current, meta["param_groups"])]
    set_state_dict(model, optimizer, model_state_dict=model_sd,
                   optim_state_dict={"state": optim_state, "param_groups": groups},
                   options=StateDictOptions(full_state_dict=True, strict=False))
    torch.set_rng_state(tensors["rng/torch"])
    return meta


def check_run_record(run_dir, record: dict, is_main: bool = True) -> None:
    """A run folder records what its checkpoints were trained from (arguments, data hash, anchor
    fingerprint); resuming it with different ones is refused, naming each difference, since the result
    would be the old weights under a manifest that describes the new arguments."""
    path = Path(run_dir) / RUN_RECORD
    record = json.loads(json.dumps(record, sort_keys=True))  # compare as JSON reads it back (tuples are lists)
    if path.exists() and latest_checkpoint(run_dir) is not None:
        old = read_json(path, what="run record")
        changed = [f"{key}: {old.get(key)!r} then, {record.get(key)!r} now"
                   for key in sorted(set(old) | set(record)) if old.get(key) != record.get(key)]
        if changed:
            raise InputError(f"{run_dir}: holds checkpoints of another run ({'; '.join(changed)}); resume it with "
                             "its own arguments, or give a fresh run folder (or delete this one) to start over")
    if is_main:
        write_json(path, record)
