"""Write a safetensors file one tensor at a time, deterministically.

safetensors' own `save_file` needs every tensor in memory and copies each to bytes first (peak ~2x the
file). A merge of a large model should not: the header is computed from shapes alone, then each tensor is
produced, written and dropped. The format (8-byte header length, JSON header, raw little-endian data) is
the published safetensors layout; files load with `safetensors.safe_open` / `load_file`. Tensors and metadata
keys are written in sorted order, so identical tensors give identical bytes (safetensors' `save_file` writes
`__metadata__` keys in a per-process order)."""
from __future__ import annotations

import json
import os
import struct
from typing import Callable, Iterable

import torch
from .errors import InputError, MissingInput

DTYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
               torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.int8: "I8", torch.bool: "BOOL"}

TensorSpec = tuple[str, torch.dtype, tuple[int, ...], Callable[[], torch.Tensor]]


def write_streaming(path: str | os.PathLike, specs: Iterable[TensorSpec], metadata: dict[str, str] | None = None) -> None:
    """`specs`: (name, dtype, shape, produce) per tensor; `produce()` is called once, in name order."""
    specs = sorted(specs, key=lambda s: s[0])
    header: dict = {"__metadata__": dict(sorted(metadata.items()))} if metadata else {}
    offset = 0
    for name, dtype, shape, _ in specs:
        size = torch.empty((), dtype=dtype).element_size()
        for dim in shape:
            size *= dim
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(raw)))
        handle.write(raw)
        for name, dtype, shape, produce in specs:
            tensor = produce()
            if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
                raise InputError(f"{name}: produced {tensor.dtype} {tuple(tensor.shape)}, declared {dtype} {tuple(shape)}")
            handle.write(tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
            del tensor
        handle.flush()
        os.fsync(handle.fileno())


def save_tensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """`safetensors.torch.save_file`, but byte-identical for identical tensors and metadata."""
    write_streaming(path, [(name, t.dtype, tuple(t.shape), lambda t=t: t) for name, t in tensors.items()], metadata)


def check_safetensors_file(path: str | os.PathLike) -> dict:
    """The header of a safetensors file, after checking that the file is one and is whole; refuses a pickle
    (never unpickled), a truncated file or a corrupt header, naming the file. Reads the header only."""
    path = str(path)
    if not os.path.isfile(path):
        raise MissingInput(f"{path}: missing")
    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        head = handle.read(8)
        if head[:1] == b"\x80" or head[:2] == b"PK":
            raise InputError(f"{path}: is a pickle/zip (torch.save) file, not safetensors; it is never unpickled")
        if len(head) < 8:
            raise InputError(f"{path}: too short to be a safetensors file ({size} bytes)")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8:
            raise InputError(f"{path}: not a safetensors file, or truncated (header of {header_len} bytes, "
                             f"file of {size})")
        try:
            header = json.loads(handle.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise InputError(f"{path}: not a safetensors file (corrupt header)") from None
    if not isinstance(header, dict):
        raise InputError(f"{path}: not a safetensors file (corrupt header)")
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (TypeError, KeyError, IndexError, ValueError):
        raise InputError(f"{path}: not a safetensors file (corrupt header)") from None
    if 8 + header_len + end != size:
        raise InputError(f"{path}: truncated or padded: its header describes {8 + header_len + end} bytes, "
                         f"the file has {size}")
    return header
