"""Expert packages: what an owner publishes. A directory with `expert.safetensors` (expert 1's FFN and
router rows for every layer, bias if used) and `manifest.json` (format version, domain, anchor fingerprint,
tensor names/shapes/dtypes/hashes, training and data summaries: counts and hashes, never data).

Loading validates everything and refuses with a message naming the file and the problem."""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from flexolmo_core.data.config import check_domain_name
from flexolmo_core.errors import InputError, PackageError, read_json, require
from flexolmo_core.expert.canary import compute_canary
from flexolmo_core.io.atomic import atomic_dir, write_json
from flexolmo_core.io.dtypes import dtype_name
from flexolmo_core.io.stream_safetensors import TensorFiles, check_safetensors_file, save_tensors

FORMAT_VERSION = 1
WEIGHTS_FILE = "expert.safetensors"
MANIFEST_FILE = "manifest.json"
PACKAGE_SIGNATURE = (MANIFEST_FILE, WEIGHTS_FILE)  # what every package folder has


def tensor_sha256(tensor: torch.Tensor) -> str:
    t = tensor.detach().contiguous().cpu().reshape(-1)  # 0-d tensors cannot be viewed as bytes
    return hashlib.sha256(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"").hexdigest()


def expected_shapes(n_layers: int, d_model: int, ffn_hidden: int, with_bias: bool) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for i in range(n_layers):
        shapes[f"layers.{i}.gate_up_proj"] = (2 * ffn_hidden, d_model)
        shapes[f"layers.{i}.down_proj"] = (d_model, ffn_hidden)
        shapes[f"layers.{i}.router"] = (d_model,)
        shapes[f"layers.{i}.public_router"] = (d_model,)
        if with_bias:
            shapes[f"layers.{i}.logit_bias"] = ()
    return shapes


def package_tensors(owner_model) -> dict[str, torch.Tensor]:
    """Expert 1's tensors of a trained owner model, under package names."""
    tensors = {}
    for i, layer in enumerate(owner_model.model.layers):
        experts, gate = layer.mlp.experts, layer.mlp.gate
        tensors[f"layers.{i}.gate_up_proj"] = experts.trainable_gate_up_proj[0].detach().contiguous()
        tensors[f"layers.{i}.down_proj"] = experts.trainable_down_proj[0].detach().contiguous()
        tensors[f"layers.{i}.router"] = gate.trainable_rows[0].detach().contiguous()
        tensors[f"layers.{i}.public_router"] = gate.frozen_rows[0].detach().contiguous()
        if gate.logit_bias is not None:
            tensors[f"layers.{i}.logit_bias"] = gate.logit_bias.detach().clamp(max=0.0)[0].contiguous()
    return tensors


def save_package(tensors: dict[str, torch.Tensor], out: str | os.PathLike, domain: str, anchor_fingerprint: str,
                 training: dict | None = None, data: dict | None = None, anchor_dir: str | os.PathLike | None = None) -> dict:
    """Write a package atomically from its tensors (package names: `package_tensors` of an HF owner model,
    or `layout.to_package` of internal tensors); returns the manifest. With `anchor_dir` (the anchor it was
    trained against) it records the canary that merge checks (flexolmo_core.expert.canary); merge needs one."""
    check_domain_name(domain, expert=True)
    n_layers = sum(1 for name in tensors if name.endswith(".down_proj"))
    d_model, ffn_hidden = tensors["layers.0.down_proj"].shape
    manifest = {
        "format_version": FORMAT_VERSION,
        "domain": domain,
        "anchor_fingerprint": anchor_fingerprint,
        "shapes": {"n_layers": n_layers, "d_model": d_model, "ffn_hidden": ffn_hidden},
        "uses_bias": any(k.endswith("logit_bias") for k in tensors),
        "tensors": {name: {"shape": list(t.shape), "dtype": dtype_name(t.dtype),
                           "sha256": tensor_sha256(t)} for name, t in sorted(tensors.items())},
        "training": training or {},
        "data": data or {},
    }
    with atomic_dir(out, signature=PACKAGE_SIGNATURE) as tmp:
        save_tensors(tensors, tmp / WEIGHTS_FILE, metadata={"format": "pt", "domain": domain})
        write_json(tmp / MANIFEST_FILE, manifest)
        if anchor_dir is not None:
            from transformers import AutoConfig

            manifest["canary"] = compute_canary(anchor_dir, AutoConfig.from_pretrained(anchor_dir), load_package(tmp))
            write_json(tmp / MANIFEST_FILE, manifest)
    return manifest


@dataclass
class ExpertPackage:
    path: Path
    manifest: dict
    sha256: str  # hash of the weight file: identifies this exact package in a merged model's manifest
    tensor_names: list[str] = field(default_factory=list)

    @property
    def domain(self) -> str:
        return self.manifest["domain"]

    @property
    def uses_bias(self) -> bool:
        return bool(self.manifest["uses_bias"])

    def tensor(self, name: str) -> torch.Tensor:
        """Read one tensor (lazily, from disk; a copy, so the file may be replaced afterwards)."""
        return TensorFiles(self.path / WEIGHTS_FILE).get(name)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_package(path: str | os.PathLike, anchor_fingerprint: str | None = None,
                 anchor_shapes: dict | None = None, expected_dtype: str | None = None) -> ExpertPackage:
    """Validate a package directory and return a lazy handle to it.

    `anchor_shapes` = {"n_layers", "d_model", "ffn_hidden"} and `expected_dtype` (e.g. "float32") of the
    anchor it will be merged into; without them the package must at least be consistent in itself."""
    path = Path(path)
    manifest_path, weights_path = path / MANIFEST_FILE, path / WEIGHTS_FILE
    if not path.is_dir():
        raise PackageError(f"{path}: not a package directory")
    if not manifest_path.exists():
        raise PackageError(f"{manifest_path}: missing (a package needs {MANIFEST_FILE} and {WEIGHTS_FILE})")
    if not weights_path.exists():
        raise PackageError(f"{weights_path}: missing (a package needs {MANIFEST_FILE} and {WEIGHTS_FILE})")
    try:
        manifest = read_json(manifest_path, what="package manifest")
        version = manifest.get("format_version")
        if version != FORMAT_VERSION:
            raise PackageError(f"{manifest_path}: unknown format_version {version!r} (this software reads {FORMAT_VERSION})")
        require(manifest, "domain", str, manifest_path)
        require(manifest, "anchor_fingerprint", str, manifest_path)
        require(manifest, "uses_bias", bool, manifest_path)
        for key in ("n_layers", "d_model", "ffn_hidden"):
            require(require(manifest, "shapes", dict, manifest_path), key, int, f"{manifest_path}: shapes")
        for name, record in require(manifest, "tensors", dict, manifest_path).items():
            require(record, "sha256", str, f"{manifest_path}: tensors.{name}")
            require(record, "dtype", str, f"{manifest_path}: tensors.{name}")
    except InputError as err:
        raise PackageError(str(err)) from None
    try:
        check_domain_name(manifest["domain"], expert=True)
    except ValueError as err:
        raise PackageError(f"{manifest_path}: {err}") from None
    if anchor_fingerprint is not None and manifest["anchor_fingerprint"] != anchor_fingerprint:
        raise PackageError(f"{path}: trained against anchor {manifest['anchor_fingerprint']}, but the anchor here is "
                           f"{anchor_fingerprint}; an expert only works with the exact anchor it was trained against")
    shapes = anchor_shapes or manifest["shapes"]
    if anchor_shapes is not None and {k: manifest["shapes"].get(k) for k in anchor_shapes} != dict(anchor_shapes):
        raise PackageError(f"{manifest_path}: shapes {manifest['shapes']} do not match the anchor's {dict(anchor_shapes)}")
    expected = expected_shapes(shapes["n_layers"], shapes["d_model"], shapes["ffn_hidden"], manifest["uses_bias"])

    try:
        check_safetensors_file(weights_path)
    except InputError as err:
        raise PackageError(str(err)) from None
    try:
        handle = TensorFiles(weights_path)  # plain reads: validating a 7B-class expert does not map it all in
        for name in handle.names():
            handle.meta(name)
    except InputError as err:
        raise PackageError(f"{weights_path}: unreadable safetensors file: {err}") from err
    names = set(handle.names())
    missing, extra = sorted(set(expected) - names), sorted(names - set(expected))
    if missing:
        raise PackageError(f"{weights_path}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if extra:
        raise PackageError(f"{weights_path}: unexpected tensors {extra[:5]}{' ...' if len(extra) > 5 else ''}")
    if set(manifest["tensors"]) != names:
        raise PackageError(f"{manifest_path}: lists tensors {sorted(manifest['tensors'])[:5]}... that differ from "
                           f"those in {WEIGHTS_FILE}")
    dtypes = {record.get("dtype") for record in manifest["tensors"].values()}
    if len(dtypes) != 1:
        raise PackageError(f"{manifest_path}: tensors have mixed dtypes {sorted(map(str, dtypes))}; expected one")
    if expected_dtype is not None and dtypes != {expected_dtype}:
        raise PackageError(f"{weights_path}: tensors are {dtypes.pop()}, the anchor's weights are {expected_dtype}")
    for name in sorted(names):
        tensor = handle.get(name)
        record = manifest["tensors"][name]
        if tuple(tensor.shape) != expected[name]:
            raise PackageError(f"{weights_path}: tensor {name} has shape {tuple(tensor.shape)}, expected {expected[name]}")
        dtype = dtype_name(tensor.dtype)
        if dtype != record["dtype"] or not tensor.is_floating_point():
            raise PackageError(f"{weights_path}: tensor {name} has dtype {dtype}, manifest says {record['dtype']} "
                               "(a floating-point dtype is required)")
        if not torch.isfinite(tensor).all():
            raise PackageError(f"{weights_path}: tensor {name} contains NaN or Inf")
        if tensor_sha256(tensor) != record["sha256"]:
            raise PackageError(f"{weights_path}: tensor {name} does not match its sha256 in the manifest (corrupt?)")
        if name.endswith("logit_bias") and float(tensor) > 0:
            raise PackageError(f"{weights_path}: tensor {name} is {float(tensor)} but the bias must be <= 0")
    return ExpertPackage(path=path, manifest=manifest, sha256=_sha256_file(weights_path), tensor_names=sorted(names))


def privacy_of(manifest: dict) -> dict | None:
    """A package's DP guarantee as its manifest records it (the training summary's `dp`), or None."""
    dp = (manifest.get("training") or {}).get("dp")
    return {"epsilon": dp["epsilon"], "delta": dp["delta"]} if dp else None
