"""A model folder (anchor, owner, merged, opt-out or baseline checkpoint): the one reader of its weights.

Config and integrity (`check_checkpoint`), tensor names with one tensor or one expert's slice at a time
(`checkpoint_getter`), dtypes and shapes from the headers (`checkpoint_meta`, `checkpoint_dtype`), the whole
state (`load_state`) and a merged model cut to some experts (`read_kept_experts`). The safetensors format itself
(streamed reads and writes, shard indexes) is `io/stream_safetensors.py`; the merged manifest (flexolmo.json) is
read by `merge/merging.read_manifest`."""
from __future__ import annotations

import os
from pathlib import Path

import torch

import flexolmo_core.io.layout as layout
from flexolmo_core.errors import MissingInput, read_json
from flexolmo_core.io.stream_safetensors import TensorFiles, check_safetensors_file, read_index


def check_checkpoint(model_dir: str | os.PathLike) -> dict:
    """A transformers checkpoint folder's config.json (a JSON object) after checking that every safetensors
    file in it is whole and that its index names no shard outside it: bad files are refused by name before
    transformers or safetensors parse them."""
    model_dir = Path(model_dir)
    config = read_json(model_dir / "config.json", what="model config")
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise MissingInput(f"{model_dir}: no .safetensors weights")
    read_index(model_dir)  # transformers opens the shards an index names: none may lie outside the folder
    for file in files:
        check_safetensors_file(file)
    return config


def checkpoint_getter(model_dir: str | os.PathLike):
    """(names, get) over a checkpoint's safetensors files (shards too); `get(name, expert)` reads one tensor or
    one expert's slice from disk, nothing else (stream_safetensors.TensorFiles)."""
    files = TensorFiles(model_dir)
    return files.names(), files.get


def checkpoint_meta(model_dir: str | os.PathLike) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """dtype and shape of every tensor, read from the safetensors headers only."""
    files = TensorFiles(model_dir)
    return {name: files.meta(name) for name in files.names()}


def checkpoint_dtype(model_dir: str | os.PathLike) -> torch.dtype:
    """The storage dtype of a checkpoint folder: that of its embedding (read from the safetensors header)."""
    return checkpoint_meta(model_dir)["model.embed_tokens.weight"][0]


def load_state(model_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint, read once (for models small enough to hold; merges stream instead)."""
    names, get = checkpoint_getter(model_dir)
    return {name: get(name, None) for name in names}


def read_kept_experts(model_dir: str | os.PathLike, keep_idx: list[int]) -> dict[str, torch.Tensor]:
    """A MoE checkpoint (either form) cut to the kept experts, in the fused form transformers 5's modules hold
    (for load_state_dict), reading only the kept experts' matrices."""
    names, get = checkpoint_getter(model_dir)
    reader = layout.MoEReader(names, get)
    state = {name: get(name, None) for name in names if not layout.is_moe_tensor(name)}
    for i in sorted(reader.routers):
        state.update(layout.runtime_moe_state(reader, i, keep_idx))
    return state
