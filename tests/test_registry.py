"""Expert registry: atomic, validated, concurrency-safe publishing (flexolmo_core/registry/local.py)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from flexolmo_core.errors import PackageError
from flexolmo_core.registry.local import Registry, RegistryError, merged_contents

ROOT = Path(__file__).resolve().parents[1]


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file in the registry except the lock file, with its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def as_domain(src: Path, dst: Path, domain: str) -> Path:
    """A valid package with another domain name (weights unchanged, so its hashes still check)."""
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["domain"] = domain
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


@pytest.fixture
def registry(tmp_path, smoke_anchor) -> Registry:
    reg = Registry(tmp_path / "registry")
    reg.init(smoke_anchor)
    return reg


def test_publish_lists_and_is_idempotent(registry, packages):
    entry = registry.publish(packages["code"])
    assert entry.domain == "code" and entry.version == 1
    assert (entry.path / "expert.safetensors").read_bytes() == (packages["code"] / "expert.safetensors").read_bytes()
    again = registry.publish(packages["code"])  # same weights: no new version
    assert again.version == 1 and registry.index()["version"] == 1
    registry.publish(packages["news"])
    assert list(registry.contents()) == ["code", "news"] and registry.index()["version"] == 2
    assert registry.verify() == {"code": "ok", "news": "ok"}
    assert not list((registry.root / ".staging").iterdir())


def test_wrong_anchor_is_refused_and_registry_unchanged(registry, packages, tmp_path):
    registry.publish(packages["code"])
    before = snapshot(registry.root)
    bad = tmp_path / "bad"
    shutil.copytree(packages["news"], bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["anchor_fingerprint"] = "anchor-" + "0" * 32
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(PackageError) as err:
        registry.publish(bad)
    assert "anchor-" + "0" * 32 in str(err.value) and registry.anchor_fingerprint in str(err.value)
    assert str(bad) in str(err.value)  # names the user's path, not the staging copy
    assert snapshot(registry.root) == before


def test_corrupt_package_is_refused_and_registry_unchanged(registry, packages, tmp_path):
    before = snapshot(registry.root)
    bad = tmp_path / "corrupt"
    shutil.copytree(packages["code"], bad)
    raw = bytearray((bad / "expert.safetensors").read_bytes())
    raw[-5] ^= 0x40  # flip one bit inside the last tensor's data
    (bad / "expert.safetensors").write_bytes(bytes(raw))
    with pytest.raises(PackageError, match="sha256|NaN|corrupt"):
        registry.publish(bad)
    (bad / "expert.safetensors").unlink()
    with pytest.raises(PackageError, match="missing"):
        registry.publish(bad)
    assert snapshot(registry.root) == before


def test_duplicate_domain_refused_unless_replace(registry, packages, tmp_path):
    registry.publish(packages["code"])
    before = snapshot(registry.root)
    other = as_domain(packages["news"], tmp_path / "code2", "code")
    with pytest.raises(RegistryError, match="already published"):
        registry.publish(other)
    assert snapshot(registry.root) == before
    entry = registry.publish(other, replace=True)
    assert entry.version == 2 and registry.contents()["code"] == entry.sha256
    assert [h["action"] for h in registry.index()["history"]] == ["publish", "replace"]
    registry.remove("code")
    assert registry.contents() == {}
    with pytest.raises(RegistryError, match="not published"):
        registry.remove("code")


def test_registry_refuses_another_anchor_at_init(registry, tmp_path, smoke_tokenizer):
    from flexolmo_core.anchor.model import init_anchor

    other = tmp_path / "other_anchor"
    init_anchor("smoke", smoke_tokenizer, other, seed=1)
    with pytest.raises(RegistryError, match="registry is for anchor"):
        registry.init(other)


def test_merged_contents_matches_registry(registry, packages, smoke_anchor, tmp_path):
    from flexolmo_core.merge.merging import merge

    registry.publish(packages["code"])
    registry.publish(packages["news"])
    manifest = merge(smoke_anchor, registry.package_paths(), tmp_path / "m")
    assert merged_contents(manifest) == registry.contents()


def _cli(*args) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "flexolmo_core.cli.main", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_concurrent_publishes_do_not_corrupt(registry, packages, tmp_path):
    """Four processes at once: two domains, plus two different packages racing for one new domain."""
    a = as_domain(packages["code"], tmp_path / "a", "math")
    b = as_domain(packages["news"], tmp_path / "b", "math")
    procs = [_cli("publish", str(p), "--registry", str(registry.root))
             for p in (packages["code"], packages["news"], a, b)]
    results = [(p.wait(timeout=120), *p.communicate()) for p in procs]
    codes = [r[0] for r in results]
    assert codes[:2] == [0, 0], results
    assert sorted(codes[2:]) == [0, 2], results  # exactly one of the racing math packages wins
    loser = results[2] if codes[2] else results[3]
    assert "already published" in loser[2]
    index = registry.index()
    assert sorted(index["experts"]) == ["code", "math", "news"] and index["version"] == 3
    assert registry.verify() == {"code": "ok", "math": "ok", "news": "ok"}
    assert not list((registry.root / ".staging").iterdir())


def test_cli_publish_refusal_is_a_clear_error(registry, packages, tmp_path, capsys):
    from flexolmo_core.cli.main import main

    assert main(["publish", str(packages["code"]), "--registry", str(registry.root)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["domain"] == "code" and out["event_emitted"] is False  # says so: only the schedule will see it
    assert "flows.deploy serve" in out["remerge"] and "flows.owner publish" in out["remerge"]
    assert main(["publish", str(tmp_path / "nope"), "--registry", str(registry.root)]) == 2
    assert "missing" in capsys.readouterr().err
    assert main(["registry", "list", str(registry.root)]) == 0
    assert list(json.loads(capsys.readouterr().out)["experts"]) == ["code"]


def test_gc_lists_then_removes_only_what_no_one_uses(registry, packages, tmp_path, capsys):
    import socket

    from flexolmo_core.cli.main import main

    registry.publish(packages["code"])
    registry.publish(packages["news"])
    registry.remove("news")  # its files stay until gc
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = registry.root / ".staging" / f"pkg-{socket.gethostname()}.{int(dead.stdout)}.abcd1234"
    live = registry.root / ".staging" / f"pkg-{socket.gethostname()}.{os.getpid()}.abcd1234"  # a publish in progress
    for folder in (stale, live):
        folder.mkdir(parents=True)
        (folder / "expert.safetensors").write_bytes(b"x" * 10)
    partial = registry.root / "packages" / "code" / "0123456789abcdef.part-1a2b3c4d"
    partial.mkdir()
    before = snapshot(registry.root)
    assert main(["registry", "gc", str(registry.root)]) == 0  # a dry run by default
    report = json.loads(capsys.readouterr().out)
    news_dir = registry.root / "packages" / "news"
    listed = {Path(item["path"]) for item in report["would_remove"]}
    assert listed == {stale, partial, *news_dir.iterdir()} and "--apply" in report["hint"]
    assert snapshot(registry.root) == before
    assert main(["registry", "gc", str(registry.root), "--apply"]) == 0
    assert not stale.exists() and not partial.exists() and not list(news_dir.iterdir()) and live.exists()
    assert registry.verify() == {"code": "ok"} and registry.gc() == []
