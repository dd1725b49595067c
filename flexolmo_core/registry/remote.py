"""A registry at any fsspec URL (s3://, gs://, az://, ssh://, file://, memory://, ...), used through a local
mirror that is an ordinary `Registry` directory.

- `pull()` downloads the remote index and every package the mirror lacks (content-addressed paths, so a
  package is never downloaded twice), then replaces the mirror's index last: readers of the mirror never see
  a package the index names but the files lack.
- `publish()` pulls, validates the package into the mirror (the same checks as a local publish), uploads
  the package folder to its content-addressed path, then writes the remote index as one object (a temporary
  name, then a move: one PUT on object stores). Package paths never collide, so a failed upload leaves the
  remote index as it was.
- Writers: the remote index is re-read just before it is replaced and the publish is refused if its version
  moved (someone else published meanwhile); run again to retry. On a `file://` URL (a shared filesystem)
  that check and the move happen under a file lock, so racing writers never lose a publication. Object
  stores have no lock: two writers racing inside that window can still lose one publication (never corrupt
  the index): give each remote registry one writer, or put a lock service in front.

`open_registry(location)` returns a `Registry` for a local path, and the pulled mirror for a URL."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

from flexolmo_core.anchor.model import read_fingerprint
from flexolmo_core.expert.package import MANIFEST_FILE, WEIGHTS_FILE
from flexolmo_core.io.atomic import locked, write_json
from flexolmo_core.registry.local import INDEX_FILE, Entry, Registry, RegistryError, add_entry, check_index, drop_entry

PACKAGE_FILES = (WEIGHTS_FILE, MANIFEST_FILE)  # the manifest last: its presence marks a complete upload

CACHE_ROOT = Path(os.environ.get("FLEXOLMO_CACHE", Path.home() / ".cache" / "flexolmo")) / "registries"


def is_url(location: str | os.PathLike) -> bool:
    return "://" in str(location)


def mirror_dir(url: str) -> Path:
    return CACHE_ROOT / hashlib.sha256(url.encode()).hexdigest()[:16]


class RemoteRegistry:
    def __init__(self, url: str, mirror: str | os.PathLike | None = None):
        from fsspec.core import url_to_fs

        self.url = url.rstrip("/")
        self.fs, self.root = url_to_fs(self.url)
        self.root = self.root.rstrip("/")
        self.mirror = Registry(mirror or mirror_dir(self.url))

    def _remote(self, relative: str) -> str:
        return f"{self.root}/{relative}"

    def remote_index(self) -> dict | None:
        path = self._remote(INDEX_FILE)
        if not self.fs.exists(path):
            return None
        with self.fs.open(path, "r") as handle:
            text = handle.read()
        try:
            index = json.loads(text)
        except json.JSONDecodeError as err:
            raise RegistryError(f"{self.url}/{INDEX_FILE}: not valid JSON: {err}") from None
        return check_index(index, f"{self.url}/{INDEX_FILE}", self.mirror.root)

    def _index_lock(self):
        """A real lock where the filesystem is shared (file://); none on object stores (see above)."""
        if "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)):
            return locked(Path(self.root) / ".lock")
        return contextlib.nullcontext()

    def _write_remote_index(self, index: dict, expected_version: int | None) -> None:
        """Replace the remote index; the caller holds `_index_lock()`. On object stores (no lock) the index
        is re-read first and the write refused if another writer moved it meanwhile."""
        current = self.remote_index()
        now = None if current is None else current["version"]
        if now != expected_version:
            raise RegistryError(f"{self.url}: the registry moved to version {now} while this publish ran "
                                f"(expected {expected_version}); run it again")
        tmp = self._remote(f".{INDEX_FILE}.{uuid.uuid4().hex}")
        with self.fs.open(tmp, "w") as handle:
            json.dump(index, handle, indent=2, sort_keys=True)
        self.fs.mv(tmp, self._remote(INDEX_FILE))

    def _existing_index(self) -> dict:
        index = self.remote_index()
        if index is None:
            raise RegistryError(f"{self.url}: not a registry (no {INDEX_FILE}); create it with "
                                f"`flexolmo registry init {self.url} --anchor ANCHOR_DIR`")
        return index

    def pull(self) -> Registry:
        """Bring the mirror up to the remote index; returns the mirror. Under the mirror's lock: processes
        sharing one mirror (the default, per URL) never download into each other's folders."""
        index = self._existing_index()
        with self.mirror._locked(must_exist=False):
            for entry in index["experts"].values():
                local = self.mirror.root / entry["path"]
                if not (local / MANIFEST_FILE).exists():
                    part = local.with_name(local.name + f".part-{uuid.uuid4().hex[:8]}")
                    part.mkdir(parents=True)
                    for name in PACKAGE_FILES:  # file by file: fsspec's recursive copy rules vary by version
                        self.fs.get_file(self._remote(f"{entry['path']}/{name}"), str(part / name))
                    if local.exists():
                        shutil.rmtree(local)
                    os.replace(part, local)
            write_json(self.mirror.index_path, index)
        return self.mirror

    def init(self, anchor_dir: str | os.PathLike) -> dict:
        fingerprint = read_fingerprint(anchor_dir)
        with self._index_lock():
            index = self.remote_index()
            if index is None:
                with self.mirror._locked(must_exist=False):
                    if self.mirror.exists():  # a mirror of some earlier registry at this URL: start clean
                        self.mirror.index_path.unlink()
                index = self.mirror.init(anchor_dir)
                self.fs.makedirs(self.root, exist_ok=True)
                self._write_remote_index(index, None)
        if index["anchor_fingerprint"] != fingerprint:
            raise RegistryError(f"{self.url}: registry is for anchor {index['anchor_fingerprint']}, "
                                f"not {fingerprint} ({anchor_dir})")
        self.pull()
        return index

    def publish(self, package_dir: str | os.PathLike, replace: bool = False) -> Entry:
        """Validate in this process's own staging folder, then decide against the remote index read under
        the lock: either the package is uploaded and indexed, or it is refused and nothing of it is left."""
        self.pull()
        with self.mirror.staged(package_dir) as package, self._index_lock():
            index = self._existing_index()
            base = index["version"]
            record, changed = add_entry(index, package, replace, package_dir)
            if changed:
                target = self._remote(record["path"])
                uploaded = not self.fs.exists(f"{target}/{MANIFEST_FILE}")
                if uploaded:  # content-addressed: a complete copy (manifest last) is never uploaded twice
                    self.fs.makedirs(target, exist_ok=True)
                    for name in PACKAGE_FILES:
                        self.fs.put_file(str(package.path / name), f"{target}/{name}")
                try:
                    self._write_remote_index(index, base)
                except BaseException:
                    if uploaded:
                        self.fs.rm(target, recursive=True)
                    raise
        self.pull()
        return self.mirror.entry(package.domain, record)

    def remove(self, domain: str) -> None:
        with self._index_lock():
            index = self._existing_index()
            base = index["version"]
            drop_entry(index, domain, self.url)
            self._write_remote_index(index, base)
        self.pull()

    def gc(self, apply: bool = False) -> list[dict]:
        """Garbage in the local mirror (see Registry.gc); the remote is left to its own tooling."""
        self.pull()
        return self.mirror.gc(apply)


def registry_id(location: str | os.PathLike) -> str:
    """How events and deployments name a registry: its URL, or its absolute local path."""
    return str(location).rstrip("/") if is_url(location) else str(Path(location).resolve())


def open_registry(location: str | os.PathLike) -> Registry:
    """A local registry directory as it is; a URL pulled into its local mirror (read-only use)."""
    return RemoteRegistry(str(location)).pull() if is_url(location) else Registry(location)


def writable_registry(location: str | os.PathLike) -> Registry | RemoteRegistry:
    """What publish/init/remove go through: the registry itself, or the remote wrapper."""
    return RemoteRegistry(str(location)) if is_url(location) else Registry(location)
