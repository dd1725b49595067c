"""Owners' access policies for the server. A YAML file:

    on_forbidden: refuse        # refuse: 403 naming the expert; mask: serve without it, reported as masked
    default: deny               # experts the file does not name: deny (an owner must say who may use theirs)
    keys:                       # API keys are stored as sha256 hex digests, never in clear
      - sha256: 9f86d08...      # `flexolmo serve --hash-key KEY` prints it
        principal: alice
        groups: [clinic-a]
    experts:
      code: {allow: ["group:clinic-a", "bob"]}
      news: {allow: ["*"]}      # every key holder
      math: {withdrawn: true}   # the owner opted out: nobody, whatever `allow` says

The public expert is always allowed. Without a policy file the server has no keys and every expert is open."""
from __future__ import annotations

import hashlib
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from flexolmo_core.errors import InputError

PUBLIC = "public"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class Unauthorized(InputError):
    """No key, or a key the policy does not know: 401."""


@dataclass(frozen=True)
class Principal:
    name: str
    groups: tuple[str, ...] = ()


@dataclass
class Policy:
    keys: dict[str, Principal] = field(default_factory=dict)  # sha256 -> principal
    experts: dict[str, dict] = field(default_factory=dict)
    on_forbidden: str = "refuse"
    default: str = "deny"
    open: bool = False  # no policy file: no keys, every expert allowed
    source: str = "(none)"

    def principal(self, api_key: str | None) -> Principal:
        if self.open:
            return Principal("anonymous")
        if not api_key:
            raise Unauthorized("missing API key (send `Authorization: Bearer <key>`)")
        found = self.keys.get(hash_key(api_key))
        if found is None:
            raise Unauthorized("unknown API key")
        return found

    def may_use(self, who: Principal, expert: str) -> bool:
        if expert == PUBLIC or self.open:
            return True
        rule = self.experts.get(expert)
        if rule is None:
            return self.default == "allow"
        if rule.get("withdrawn"):
            return False
        allow = rule.get("allow") or []
        return "*" in allow or who.name in allow or any(f"group:{g}" in allow for g in who.groups)


def _require(value, kind, where: str):
    if not isinstance(value, kind):
        raise InputError(f"{where}: expected {kind.__name__ if isinstance(kind, type) else kind}, got {value!r}")
    return value


FIELDS = ("on_forbidden", "default", "keys", "experts")  # a policy file's top-level fields
KEY_FIELDS = ("sha256", "principal", "groups")


def _known(entry: dict, fields: tuple[str, ...], where: str) -> None:
    """Refuse fields the policy language does not have: a typo (`principals:` for `keys:`) would otherwise be
    ignored without a word, and every key would get 401."""
    unknown = sorted(str(k) for k in entry if k not in fields)
    if unknown:
        raise InputError(f"{where}: unknown field(s) {unknown}; expected {', '.join(fields)}")


def parse_policy(data, source: str) -> Policy:
    """A policy from the YAML's data; every error names the file and the field."""
    data = _require(data if data is not None else {}, dict, source)
    _known(data, FIELDS, source)
    on_forbidden = data.get("on_forbidden", "refuse")
    if on_forbidden not in ("refuse", "mask"):
        raise InputError(f"{source}: on_forbidden must be 'refuse' or 'mask', got {on_forbidden!r}")
    default = data.get("default", "deny")
    if default not in ("allow", "deny"):
        raise InputError(f"{source}: default must be 'allow' or 'deny', got {default!r}")
    keys = {}
    for i, entry in enumerate(_require(data.get("keys") or [], list, f"{source}: keys")):
        where = f"{source}: keys[{i}]"
        _require(entry, dict, where)
        _known(entry, KEY_FIELDS, where)
        digest = str(entry.get("sha256", "")).lower()
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise InputError(f"{where}.sha256: expected the key's sha256 hex digest (64 hex digits; "
                             "`flexolmo serve --hash-key KEY` prints it), never the key itself")
        name = _require(entry.get("principal"), str, f"{where}.principal")
        groups = tuple(_require(entry.get("groups") or [], list, f"{where}.groups"))
        keys[digest] = Principal(name, tuple(str(g) for g in groups))
    experts = {}
    for name, rule in _require(data.get("experts") or {}, dict, f"{source}: experts").items():
        where = f"{source}: experts.{name}"
        rule = _require(rule if rule is not None else {}, dict, where)
        unknown = set(rule) - {"allow", "withdrawn"}
        if unknown:
            raise InputError(f"{where}: unknown field(s) {sorted(unknown)}; expected allow, withdrawn")
        _require(rule.get("allow") or [], list, f"{where}.allow")
        experts[str(name)] = {"allow": [str(a) for a in rule.get("allow") or []],
                              "withdrawn": bool(rule.get("withdrawn", False))}
    return Policy(keys=keys, experts=experts, on_forbidden=on_forbidden, default=default, source=source)


def load_policy(path: str | os.PathLike | None) -> Policy:
    if path is None:
        return Policy(open=True)

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise InputError(f"{path}: not valid YAML ({err})") from err
    return parse_policy(data, str(path))


class PolicyFile:
    """The policy, reloaded when its file changes (checked at most every `poll_seconds`). A request takes the
    policy current when it arrives and keeps it to the end. A broken edit keeps the last good policy and
    reports the error (/healthz) until the file is fixed."""

    def __init__(self, path: str | os.PathLike | None, poll_seconds: float = 2.0):
        self.path, self.poll_seconds, self._clock = (Path(path) if path else None), poll_seconds, time.monotonic
        self._lock = threading.Lock()
        self.policy, self.error, self._stamp, self._checked = load_policy(self.path), None, self._stat(), 0.0

    def _stat(self):
        if self.path is None:
            return None
        st = self.path.stat()
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def current(self) -> Policy:
        if self.path is None:
            return self.policy
        now = self._clock()
        with self._lock:
            if now - self._checked >= self.poll_seconds:
                self._checked = now
                try:
                    stamp = self._stat()
                    if stamp != self._stamp:
                        self.policy, self._stamp = load_policy(self.path), stamp
                        if self.error:
                            log(f"policy {self.path} reloaded; it is valid again")
                        self.error = None
                except (OSError, InputError) as err:
                    error = f"policy not reloaded, the previous one stays: {err}"
                    if error != self.error:  # once per distinct error, not at every poll
                        log(error)
                    self.error = error
            return self.policy


def log(message: str) -> None:
    """One line in the server's log (stderr)."""
    print(f"flexolmo serve: {message}", file=sys.stderr, flush=True)
