"""The expert registry: a directory of validated expert packages for one anchor.

    <registry>/
      registry.json                 anchor fingerprint + shapes, and the published experts (the index)
      packages/<domain>/<sha16>/    expert.safetensors + manifest.json, exactly as the owner wrote them
      .lock                         file lock serialising writers (atomic.locked)
      .staging/                     copies being validated (never visible in the index)

A package is visible only once `registry.json` names it, and `registry.json` is replaced in one rename,
so readers never see a half-published package and need no lock. Publishing copies the package into
staging, validates the *copy* (fingerprint, shapes, tensor hashes; a wrong-anchor, corrupt or
duplicate-domain package is refused and the registry is left unchanged), then, under the lock,
re-checks the index, renames the copy into place and rewrites the index. Pure Python: the event that
tells a re-merge to run is emitted by the orchestration layer (flows/), not here.

This is a local directory; in production it is synced through a DVC remote (`dvc add`/`push`) or an
fsspec mount. Two machines must not write the same registry directory without a shared lock."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from flexolmo_core.anchor.model import read_fingerprint
from flexolmo_core.data.config import check_domain_name
from flexolmo_core.errors import InputError, PackageError, read_json, require
from flexolmo_core.expert.package import MANIFEST_FILE, WEIGHTS_FILE, ExpertPackage, load_package, privacy_of
from flexolmo_core.io.atomic import dead_writer, locked, temp_dir, write_json, writer_tag

INDEX_FILE = "registry.json"
FORMAT_VERSION = 1


class RegistryError(InputError):
    """A registry operation that was refused; the registry is unchanged."""


@dataclass(frozen=True)
class Entry:
    domain: str
    sha256: str  # of expert.safetensors; the merged model's manifest records the same hash
    path: Path  # absolute path of the package directory inside the registry
    published_at: float
    version: int  # the registry version in which this entry was published
    privacy: dict | None = None  # a DP-trained expert's {epsilon, delta} (training/privacy.py); None: not private


STAGING = ".staging"


def package_path(package: ExpertPackage) -> str:
    """Where a package lives inside a registry (content-addressed: the same path on a remote and a mirror)."""
    return f"packages/{package.domain}/{package.sha256[:16]}"


def add_entry(index: dict, package: ExpertPackage, replace: bool, source) -> tuple[dict, bool]:
    """The one publishing rule, applied to an index read under the writer's lock: (the domain's record,
    whether the index changed). Same weights again: unchanged; other weights: refused unless `replace`."""
    current = index["experts"].get(package.domain)
    if current is not None and current["sha256"] == package.sha256:
        return current, False
    if current is not None and not replace:
        raise RegistryError(f"{source}: domain '{package.domain}' is already published "
                            f"(package {current['sha256'][:16]}); use replace to publish a new version")
    version = index["version"] + 1
    record = {"sha256": package.sha256, "path": package_path(package), "published_at": time.time(), "version": version,
              "privacy": privacy_of(package.manifest)}
    index["experts"][package.domain] = record
    index["version"] = version
    index["history"].append({"version": version, "action": "replace" if current else "publish",
                             "domain": package.domain, "sha256": package.sha256})
    return record, True


def drop_entry(index: dict, domain: str, where) -> None:
    """The one unpublishing rule, applied to an index read under the writer's lock."""
    if domain not in index["experts"]:
        raise RegistryError(f"{where}: domain '{domain}' is not published; published: {sorted(index['experts'])}")
    old = index["experts"].pop(domain)
    index["version"] += 1
    index["history"].append({"version": index["version"], "action": "remove", "domain": domain, "sha256": old["sha256"]})


def check_index(index: dict, where, root: Path) -> dict:
    """Refuse an index (local, or fetched from a remote) that is malformed or points outside `root`: a
    package path is relative and resolves inside the registry (or the mirror), never `../..` or absolute."""
    if not isinstance(index, dict):
        raise RegistryError(f"{where}: expected a JSON object, got {type(index).__name__}")
    require(index, "anchor_fingerprint", str, where)
    require(index, "version", int, where)
    require(index, "history", list, where)
    shapes = require(index, "anchor_shapes", dict, where)
    for key in ("n_layers", "d_model", "ffn_hidden"):
        require(shapes, key, int, f"{where}: anchor_shapes")
    root = Path(root).resolve()
    for domain, entry in require(index, "experts", dict, where).items():
        record = f"{where}: experts.{domain}"
        try:
            check_domain_name(domain, expert=True)
        except ValueError as err:
            raise RegistryError(f"{record}: {err}") from None
        require(entry, "sha256", str, record)
        require(entry, "published_at", (int, float), record)
        require(entry, "version", int, record)
        relative = require(entry, "path", str, record)
        if Path(relative).is_absolute() or not (root / relative).resolve().is_relative_to(root):
            raise RegistryError(f"{record}: path {relative!r} leaves the registry; a package path is relative "
                                "to it (packages/<domain>/<hash>)")
    return index


def anchor_shapes_of(anchor_dir: str | os.PathLike) -> dict:
    """{"n_layers", "d_model", "ffn_hidden"} read from the anchor's config.json (no weights loaded)."""
    cfg = read_json(Path(anchor_dir) / "config.json", what="the anchor's config")
    for key in ("num_hidden_layers", "hidden_size", "intermediate_size"):
        require(cfg, key, int, Path(anchor_dir) / "config.json")
    return {"n_layers": cfg["num_hidden_layers"], "d_model": cfg["hidden_size"], "ffn_hidden": cfg["intermediate_size"]}


class Registry:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).resolve()

    # ---- reading (no lock: the index is replaced atomically) ------------------------------------------
    @property
    def index_path(self) -> Path:
        return self.root / INDEX_FILE

    def exists(self) -> bool:
        return self.index_path.exists()

    def index(self) -> dict:
        if not self.exists():
            raise RegistryError(f"{self.root}: not a registry (no {INDEX_FILE}); create it with "
                                f"`flexolmo registry init {self.root} --anchor ANCHOR_DIR`")
        return check_index(read_json(self.index_path, what="registry index"), self.index_path, self.root)

    @property
    def anchor_fingerprint(self) -> str:
        return self.index()["anchor_fingerprint"]

    def entries(self) -> dict[str, Entry]:
        index = self.index()
        return {d: self.entry(d, e) for d, e in sorted(index["experts"].items())}

    def package_paths(self) -> list[Path]:
        """The published packages, sorted by domain (the merge order)."""
        return [e.path for e in self.entries().values()]

    def contents(self) -> dict[str, str]:
        """{domain: package sha256}: what a merged model must contain to be current."""
        return {d: e.sha256 for d, e in self.entries().items()}

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.contents(), sort_keys=True).encode()).hexdigest()[:16]

    # ---- writing ------------------------------------------------------------------------------------
    def _locked(self, must_exist: bool = True):
        if must_exist:
            self.index()  # refuse a folder that is not a registry before the lock file would create it
        return locked(self.root / ".lock")

    def init(self, anchor_dir: str | os.PathLike) -> dict:
        """Create the registry for this anchor. Idempotent for the same anchor; refused for another."""
        fingerprint, shapes = read_fingerprint(anchor_dir), anchor_shapes_of(anchor_dir)
        with self._locked(must_exist=False):
            if self.exists():
                index = self.index()
                if index["anchor_fingerprint"] != fingerprint:
                    raise RegistryError(f"{self.root}: registry is for anchor {index['anchor_fingerprint']}, "
                                        f"not {fingerprint} ({anchor_dir})")
                return index
            index = {"format_version": FORMAT_VERSION, "anchor_fingerprint": fingerprint, "anchor_shapes": shapes,
                     "version": 0, "experts": {}, "history": []}
            write_json(self.index_path, index)
            return index

    @contextlib.contextmanager
    def staged(self, package_dir: str | os.PathLike) -> Iterator[ExpertPackage]:
        """Copy a package into this process's own staging folder and validate the copy (not the source,
        which could change under us); the folder is gone afterwards, whatever happens."""
        index, source = self.index(), Path(package_dir)
        staging = self.root / STAGING
        staging.mkdir(parents=True, exist_ok=True)
        tmp = temp_dir(staging, f"pkg-{writer_tag()}")
        try:
            for name in (MANIFEST_FILE, WEIGHTS_FILE):
                if not (source / name).is_file():
                    raise PackageError(f"{source / name}: missing (a package needs {MANIFEST_FILE} and {WEIGHTS_FILE})")
                shutil.copyfile(source / name, tmp / name)
            try:
                package = load_package(tmp, anchor_fingerprint=index["anchor_fingerprint"],
                                       anchor_shapes=index["anchor_shapes"])
            except PackageError as err:
                raise PackageError(str(err).replace(str(tmp), str(source))) from None
            yield package
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def publish(self, package_dir: str | os.PathLike, replace: bool = False) -> Entry:
        """Validate and add one package. Same domain + same weights again is a no-op (idempotent);
        same domain + other weights is refused unless `replace` (an owner publishing a new version)."""
        with self.staged(package_dir) as package, self._locked():
            index = self.index()  # read under the lock: what another writer published meanwhile counts
            record, changed = add_entry(index, package, replace, package_dir)
            if changed:
                final = self.root / record["path"]
                final.parent.mkdir(parents=True, exist_ok=True)
                if final.exists():  # left by an earlier publish that was then replaced or removed
                    shutil.rmtree(final)
                os.replace(package.path, final)
                write_json(self.index_path, index)
            return self.entry(package.domain, record)

    def entry(self, domain: str, record: dict) -> Entry:
        return Entry(domain=domain, sha256=record["sha256"], path=self.root / record["path"],
                     published_at=record["published_at"], version=record["version"], privacy=record.get("privacy"))

    def gc(self, apply: bool = False) -> list[dict]:
        """What `registry gc` removes (with `apply`, removes it): staging folders of writers that are gone,
        half-downloaded `.part-*` folders, and package folders the index no longer names (removed or
        replaced domains; merged models hold their own copies). Holds the writers' lock, so a publish in
        progress is never taken for garbage."""
        found = []
        with self._locked():
            named = {self.root / e["path"] for e in self.index()["experts"].values()}
            for tmp in sorted((self.root / STAGING).glob("pkg-*")):
                if dead_writer(tmp.name, "pkg-"):
                    found.append({"path": str(tmp), "why": "staging left by a killed publish"})
            for folder in sorted((self.root / "packages").glob("*/*")):
                if ".part-" in folder.name:
                    found.append({"path": str(folder), "why": "partial download"})
                elif folder not in named:
                    found.append({"path": str(folder), "why": "not in the index (removed or replaced)"})
            for item in found:
                item["bytes"] = sum(f.stat().st_size for f in Path(item["path"]).rglob("*") if f.is_file())
                if apply:
                    shutil.rmtree(item["path"], ignore_errors=True)
        return found

    def remove(self, domain: str) -> None:
        """Unpublish a domain (an owner opting out). Its files stay until `gc`; merged models keep working."""
        with self._locked():
            index = self.index()
            drop_entry(index, domain, self.root)
            write_json(self.index_path, index)

    def verify(self) -> dict[str, str]:
        """Re-validate every published package; returns {domain: "ok" | error message}."""
        index = self.index()
        report = {}
        for domain, entry in self.entries().items():
            try:
                package = load_package(entry.path, anchor_fingerprint=index["anchor_fingerprint"],
                                       anchor_shapes=index["anchor_shapes"])
                report[domain] = "ok" if package.sha256 == entry.sha256 else \
                    f"weights hash {package.sha256[:16]} differs from the index's {entry.sha256[:16]}"
            except PackageError as err:
                report[domain] = str(err)
        return report


def merged_contents(manifest: dict) -> dict[str, str]:
    """{domain: package sha256} of a merged model's flexolmo.json (the public expert excluded)."""
    return {e["domain"]: e["package_sha256"] for e in manifest.get("experts", []) if e["domain"] != "public"}
