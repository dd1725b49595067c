"""Command-line flags shared by the training commands: every LoopConfig field, optionally based on a
params.yaml section (flags override it)."""
from __future__ import annotations

import dataclasses

from .config import LoopConfig, load_stage

FLAG_HELP = {"global_batch": "sequences per optimiser step (all ranks)", "micro_batch": "sequences per forward pass"}


def add_loop_args(p, skip=()) -> None:
    for f in dataclasses.fields(LoopConfig):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            p.add_argument(flag, dest=f.name, default=None, action="store_true")
        else:
            kind = {"int": int, "float": float, "str": str}.get(f.type if isinstance(f.type, str) else f.type.__name__, str)
            p.add_argument(flag, dest=f.name, type=kind, default=None, help=FLAG_HELP.get(f.name, f"LoopConfig.{f.name}"))
    p.add_argument("--params", default=None, help="params.yaml to start from (its section for this stage)")
    p.add_argument("--preset-params", default=None, help="which preset's overrides to apply (default: params.yaml's)")


def loop_from_args(args, section_cls, section: str, base: dict | None = None):
    """(stage config or None, LoopConfig): params.yaml section if --params, then explicit flags."""
    stage = None
    if args.params:
        _, stage, loop = load_stage(section_cls, section, args.params, preset=args.preset_params)
    else:
        loop = LoopConfig(**(base or {}))
    changes = {f.name: getattr(args, f.name) for f in dataclasses.fields(LoopConfig)
               if getattr(args, f.name, None) is not None}
    return stage, dataclasses.replace(loop, **changes)
