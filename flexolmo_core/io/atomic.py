"""Never leave a half-written artifact: write into a temporary sibling, then rename into place.

Replacing a folder commits in one step: Linux's renameat2(RENAME_EXCHANGE) swaps the new folder and the old
one atomically, so the output path always names a whole folder (old or new), whatever is killed when; the
old one is then deleted from where the new one was written. Where the filesystem cannot exchange (non-Linux,
some network filesystems), two renames are used and a kill between them is repaired by the next writer: it
restores the old folder. Temporary and old folders carry the host and pid of their writer, and the next
writer of the same output sweeps those whose process is gone.

An output folder that exists, is not empty and is not a previous output of the same kind (it lacks the
files that kind always has) is refused, unless the command runs under `replacing_allowed()` (--force).

Artifacts follow the process umask (as `open` and `mkdir` do), so a team sharing a filesystem with
umask 002 can read each other's models and registries; `tempfile` alone would make them 0700/0600."""
from __future__ import annotations

import contextlib
import contextvars
import ctypes
import errno
import json
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Iterator

from filelock import FileLock

from flexolmo_core.errors import InputError, OutputExists

_FORCE = contextvars.ContextVar("flexolmo_replacing_allowed", default=False)


def writer_tag() -> str:
    """Names a temporary folder's writer (host and pid, read now: a forked child has its own), for the sweep."""
    return f"{socket.gethostname()}.{os.getpid()}."


def current_umask() -> int:
    mask = os.umask(0)  # the only portable way to read it is to set it
    os.umask(mask)
    return mask


def temp_dir(parent: str | os.PathLike, prefix: str) -> Path:
    """A fresh directory under `parent`, with the permissions `mkdir` would give it."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(path, 0o777 & ~current_umask())
    return path


def follow_umask(root: Path) -> None:
    """Give everything under `root` the mode `open`/`mkdir` would: some writers (safetensors' save_file,
    tempfile) create files 0600, which a team on a shared filesystem cannot read."""
    mask = current_umask()
    for path in [root, *root.rglob("*")]:
        if not path.is_symlink():
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


@contextlib.contextmanager
def locked(lock_path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive inter-process lock on `lock_path` (created if missing) for the block."""
    lock_path = Path(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(lock_path), mode=0o666 & ~current_umask()):
        yield


@contextlib.contextmanager
def replacing_allowed() -> Iterator[None]:
    """Within the block, outputs replace whatever folder is at their path (the CLI's --force)."""
    token = _FORCE.set(True)
    try:
        yield
    finally:
        _FORCE.reset(token)


def check_replaceable(final: Path, signature: tuple[str, ...]) -> None:
    """Refuse to replace `final` unless it is missing, empty, or a previous output of this kind (it has
    every file of `signature`); --force (replacing_allowed) lifts the refusal."""
    if not signature or _FORCE.get() or not (final.exists() or final.is_symlink()):
        return
    if not final.is_dir():
        raise OutputExists(f"{final}: exists and is not a folder; choose another output path (or --force to replace it)")
    if any(final.iterdir()) and not all((final / name).exists() for name in signature):
        raise OutputExists(f"{final}: exists and is not a previous output of this command (it lacks "
                           f"{', '.join(signature)}); choose another output path, or --force to replace what it holds")


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2); False where the OS or filesystem cannot."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(code, os.strerror(code), str(b))


def dead_writer(name: str, prefix: str) -> bool:
    match = re.fullmatch(re.escape(prefix) + r"(?P<host>.+)\.(?P<pid>\d+)\.[^.]+", name)
    if match is None or match["host"] != socket.gethostname():
        return False  # another host's writer may still be running: never sweep what we cannot check
    try:
        os.kill(int(match["pid"]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, owned by someone else
        return False
    return False


def sweep_stale(final: Path) -> list[Path]:
    """Remove temporary and old siblings of `final` left by killed writers on this host; if a kill between
    two renames left `final` missing, put the old folder back first. Returns what was removed."""
    removed = []
    tmp_prefix, old_prefix = f".{final.name}.tmp-", f".{final.name}.old-"
    for sibling in sorted(final.parent.glob(f".{glob_escape(final.name)}.*-*")):
        for prefix in (old_prefix, tmp_prefix):
            if sibling.name.startswith(prefix) and dead_writer(sibling.name, prefix):
                if prefix == old_prefix and not final.exists() and (sibling / final.name).exists():
                    os.replace(sibling / final.name, final)
                shutil.rmtree(sibling, ignore_errors=True)
                removed.append(sibling)
    return removed


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, overwrite: bool = True, signature: tuple[str, ...] = ()) -> Iterator[Path]:
    """Yield a temporary directory next to `final`; on success it replaces `final` in one atomic step.
    `signature`: the files every output of this kind has (see check_replaceable); empty = replace anything."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(final)
    if final.exists() and not overwrite:
        raise OutputExists(f"{final} already exists")
    check_replaceable(final, signature)
    tmp = temp_dir(final.parent, f".{final.name}.tmp-{writer_tag()}")
    try:
        yield tmp
        follow_umask(tmp)
        if not final.exists():
            os.replace(tmp, final)
        elif _exchange(tmp, final):  # the commit point: `final` is now the new folder, `tmp` the old one
            shutil.rmtree(tmp, ignore_errors=True)
        else:  # two renames; a kill between them is repaired by sweep_stale at the next write
            trash = temp_dir(final.parent, f".{final.name}.old-{writer_tag()}")
            os.replace(final, trash / final.name)
            os.replace(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(final: str | os.PathLike, mode: str = "w") -> Iterator:
    """Open a temporary file next to `final` for writing; rename it over `final` when closed cleanly."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.tmp-", dir=final.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def refuse_overwriting_inputs(out: str | os.PathLike, *inputs: str | os.PathLike) -> None:
    """An output folder that is, contains or lies inside an input would destroy it when replaced: refuse."""
    target = Path(out).resolve()
    for source in inputs:
        source = Path(source).resolve()
        if target == source or source.is_relative_to(target) or target.is_relative_to(source):
            raise InputError(f"{out}: the output would overwrite the source {source} (an input); "
                             "choose another output folder")


def write_json(path: str | os.PathLike, obj) -> None:
    with atomic_file(path) as handle:
        json.dump(obj, handle, indent=2, sort_keys=True)
        handle.write("\n")
