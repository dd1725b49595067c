"""safetensors one tensor at a time, both ways, deterministically.

Writing: safetensors' own `save_file` needs every tensor in memory and copies each to bytes first (peak ~2x
the file). A merge of a large model should not: the header is computed from shapes alone, then each tensor
is produced, written and dropped; a tensor may also be produced in pieces along its first dimension (one
expert at a time), so not even the largest tensor need be whole in memory. `write_model` splits a model
into shards with an index, in transformers' layout (`model-00001-of-00003.safetensors` +
`model.safetensors.index.json`; one `model.safetensors` when it fits one shard), which `from_pretrained` reads.

Reading: `TensorFiles` reads a checkpoint's tensors (or one expert's slice) with plain file reads. Why not
`safe_open`: it memory-maps the file, and every page it touches stays in the process's resident set until the
file is closed, so a merge holding its inputs open would count all of them in its peak RSS.

The format (8-byte header length, JSON header, raw little-endian data) is the published safetensors layout;
files load with `safetensors.safe_open` / `load_file`. Tensors and metadata keys are written in sorted order,
so identical tensors give identical bytes (safetensors' `save_file` writes `__metadata__` keys in a
per-process order)."""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Callable, Iterable

import torch

from flexolmo_core.errors import InputError, MissingInput

DTYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
               torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.int8: "I8", torch.bool: "BOOL"}

DTYPES = {v: k for k, v in DTYPE_NAMES.items()}
TensorSpec = tuple[str, torch.dtype, tuple[int, ...], Callable[[], "torch.Tensor | list[torch.Tensor]"]]
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
DEFAULT_SHARD_BYTES = 5 * 10**9  # transformers' default max_shard_size ("5GB")


def nbytes(dtype: torch.dtype, shape) -> int:
    size = torch.empty((), dtype=dtype).element_size()
    for dim in shape:
        size *= dim
    return size


def write_streaming(path: str | os.PathLike, specs: Iterable[TensorSpec], metadata: dict[str, str] | None = None) -> None:
    """`specs`: (name, dtype, shape, produce) per tensor; `produce()` is called once, in name order."""
    specs = sorted(specs, key=lambda s: s[0])
    header: dict = {"__metadata__": dict(sorted(metadata.items()))} if metadata else {}
    offset = 0
    for name, dtype, shape, _ in specs:
        size = nbytes(dtype, shape)
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(raw)))
        handle.write(raw)
        for name, dtype, shape, produce in specs:
            _write_tensor(handle, name, dtype, tuple(shape), produce())
        handle.flush()
        os.fsync(handle.fileno())


def _write_tensor(handle, name: str, dtype, shape: tuple, produced) -> None:
    """One tensor, whole or as pieces along dim 0 (a list or generator), each checked against the header."""
    pieces = [produced] if isinstance(produced, torch.Tensor) else produced
    rows = 0
    for piece in pieces:
        if piece.dtype != dtype or tuple(piece.shape[1:]) != shape[1:] or (not shape and piece.dim()):
            raise InputError(f"{name}: produced {piece.dtype} {tuple(piece.shape)}, declared {dtype} {shape}")
        rows += piece.shape[0] if shape else 1
        handle.write(piece.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
        del piece
    if rows != (shape[0] if shape else 1):
        raise InputError(f"{name}: produced {rows} rows, declared {dtype} {shape}")


def shard_plan(specs: list[TensorSpec], shard_bytes: int) -> list[list[TensorSpec]]:
    """Specs in name order, cut into shards of at most `shard_bytes` (a larger tensor gets a shard of its own)."""
    shards: list[list[TensorSpec]] = [[]]
    used = 0
    for spec in sorted(specs, key=lambda s: s[0]):
        size = nbytes(spec[1], spec[2])
        if shards[-1] and used + size > shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(spec)
        used += size
    return shards


def write_model(folder: str | os.PathLike, specs: Iterable[TensorSpec], shard_bytes: int = DEFAULT_SHARD_BYTES,
                metadata: dict[str, str] | None = None, progress=None) -> list[str]:
    """A model's weights into `folder` (which the caller writes atomically): one file, or shards + index.
    `progress(done, total, file)` after each shard. Returns the file names written."""
    if shard_bytes < 1:
        raise InputError(f"shard size must be at least 1 byte, got {shard_bytes}")
    folder = Path(folder)
    shards = shard_plan(list(specs), shard_bytes)
    if len(shards) == 1:
        write_streaming(folder / SINGLE_FILE, shards[0], metadata)
        return [SINGLE_FILE]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map, total = {}, 0
    for i, (name, shard) in enumerate(zip(names, shards)):
        write_streaming(folder / name, shard, metadata)
        for spec in shard:
            weight_map[spec[0]] = name
            total += nbytes(spec[1], spec[2])
        if progress is not None:
            progress(i + 1, len(shards), name)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return names + [INDEX_FILE]


def parse_size(text: str | int) -> int:
    """Bytes from 5000000000, "5GB", "500MB", "2GiB" (decimal units as transformers' max_shard_size)."""
    if isinstance(text, int):
        return text
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "KB": 10**3, "MB": 10**6, "GB": 10**9,
             "TB": 10**12, "B": 1}
    raw = str(text).strip().upper().replace(" ", "")
    for unit, scale in units.items():
        if raw.endswith(unit) and raw[:-len(unit)].replace(".", "", 1).isdigit():
            return int(float(raw[:-len(unit)]) * scale)
    if raw.isdigit():
        return int(raw)
    raise InputError(f"shard size {text!r}: expected bytes or a size such as 5GB, 500MB, 2GiB")


class TensorFiles:
    """Every tensor of a checkpoint folder's safetensors files (shards included), read on request with plain
    file reads (no memory map: see the module docstring). Headers are checked when the folder is opened."""

    def __init__(self, folder: str | os.PathLike):
        """`folder`: a checkpoint folder (every *.safetensors in it), or one .safetensors file."""
        folder = Path(folder)
        files = [folder] if folder.is_file() else sorted(folder.glob("*.safetensors"))
        if not files:
            raise MissingInput(f"{folder}: no .safetensors weights")
        self.where: dict[str, tuple[Path, int, dict]] = {}
        for f in files:
            header = check_safetensors_file(f)
            with open(f, "rb") as handle:
                start = 8 + struct.unpack("<Q", handle.read(8))[0]  # where the data section begins
            for name, record in header.items():
                if name != "__metadata__":
                    self.where[name] = (f, start, record)

    def names(self) -> list[str]:
        return list(self.where)

    def meta(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        record = self.where[name][2]
        if record["dtype"] not in DTYPES:
            raise InputError(f"{self.where[name][0]}: tensor {name} has unsupported dtype {record['dtype']}")
        return DTYPES[record["dtype"]], tuple(record["shape"])

    def get(self, name: str, index: int | None = None) -> torch.Tensor:
        """The tensor, or its `index`-th slice along dim 0 (one expert of a fused tensor, one embedding row)."""
        path, start, record = self.where[name]
        dtype, shape = self.meta(name)
        begin, end = record["data_offsets"]
        if index is not None:
            if not 0 <= index < shape[0]:
                raise IndexError(f"{name}: index {index} out of range for shape {shape}")
            row = nbytes(dtype, shape[1:])
            begin, end, shape = begin + index * row, begin + (index + 1) * row, shape[1:]
        buffer = bytearray(end - begin)
        with open(path, "rb") as handle:
            handle.seek(start + begin)
            if handle.readinto(buffer) != len(buffer):
                raise InputError(f"{path}: truncated while reading {name}")
        if not buffer:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(buffer, dtype=dtype).reshape(shape)


def shard_in_folder(folder, index_path, name) -> "Path":
    """The shard file an index names, refused before anything is opened when the name, as written, leaves the
    checkpoint folder: absolute, with a `..` part, or not a plain relative path. The test is on the name and not
    on where the file resolves, so a hub-cache snapshot stays allowed: its files are symlinks into the cache's
    blobs/, which the hub client made; what the index may not do is name a path outside the folder."""
    parts = Path(name).parts if isinstance(name, str) and name else ()
    if not parts or Path(name).is_absolute() or ".." in parts or "\\" in name:
        raise InputError(f"{index_path}: shard path {name!r} leaves the checkpoint folder")
    return Path(folder) / name


def read_index(folder) -> dict[str, str] | None:
    """The weight map of a sharded checkpoint's index (tensor -> shard file), after checking that it is one and
    that every shard it names lies inside the folder; None when the folder has no index."""
    index_path = Path(folder) / INDEX_FILE
    if not index_path.is_file():
        return None
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
        names = sorted(set(weight_map.values()), key=str)
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as err:
        raise InputError(f"{index_path}: expected JSON with a `weight_map` ({err})") from None
    for name in names:
        shard_in_folder(folder, index_path, name)
    return weight_map


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
        head = handle.read(9)
        # A safetensors header is JSON, so byte 8 is "{"; only then is a first byte of 0x80 a header length (it is
        # also a pickle's protocol marker: a header of 128 + 256k bytes starts with it).
        if (head[:1] == b"\x80" or head[:2] == b"PK") and head[8:9] != b"{":
            raise InputError(f"{path}: is a pickle/zip (torch.save) file, not safetensors; it is never unpickled")
        head = head[:8]
        handle.seek(8)
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
