"""A registry behind an fsspec URL (memory:// and file:// here; s3://, gs://, ssh://... the same way)."""
from __future__ import annotations

import json
import shutil

import pytest

from flexolmo_core.errors import PackageError
from flexolmo_core.registry.local import RegistryError
from flexolmo_core.registry.remote import RemoteRegistry, open_registry


@pytest.fixture(params=["memory", "file"])
def url(request, tmp_path):
    if request.param == "memory":
        return f"memory://flexolmo-test/{tmp_path.name}/registry"
    return (tmp_path / "remote").as_uri()


def test_publish_pull_and_refusals_through_a_url(url, tmp_path, smoke_anchor, packages):
    owner = RemoteRegistry(url, mirror=tmp_path / "owner_mirror")
    owner.init(smoke_anchor)
    entry = owner.publish(packages["code"])
    assert entry.version == 1 and owner.remote_index()["version"] == 1
    assert owner.publish(packages["code"]).version == 1 and owner.remote_index()["version"] == 1  # idempotent

    # a second machine (its own mirror) sees the package, byte for byte, and it validates there
    maintainer = RemoteRegistry(url, mirror=tmp_path / "maintainer_mirror")
    local = maintainer.pull()
    assert local.contents() == {"code": entry.sha256} and local.verify() == {"code": "ok"}
    assert (local.package_paths()[0] / "expert.safetensors").read_bytes() == \
        (packages["code"] / "expert.safetensors").read_bytes()

    maintainer.publish(packages["news"])
    assert set(owner.pull().contents()) == {"code", "news"}

    # a corrupt package is refused and the remote index does not move
    bad = tmp_path / "bad"
    shutil.copytree(packages["news"], bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["domain"] = "legal"
    (bad / "manifest.json").write_text(json.dumps(manifest))
    raw = bytearray((bad / "expert.safetensors").read_bytes())
    raw[-5] ^= 0x40  # one bit inside the last tensor's data
    (bad / "expert.safetensors").write_bytes(bytes(raw))
    before = owner.remote_index()
    with pytest.raises(PackageError, match="sha256|NaN|corrupt"):
        owner.publish(bad)
    assert owner.remote_index() == before

    owner.remove("news")
    assert set(open_registry(url).contents()) == {"code"}


def test_another_anchor_is_refused(url, tmp_path, smoke_anchor, smoke_tokenizer):
    from flexolmo_core.anchor.model import init_anchor

    RemoteRegistry(url, mirror=tmp_path / "a").init(smoke_anchor)
    other = tmp_path / "other_anchor"
    init_anchor("smoke", smoke_tokenizer, other, seed=1)
    with pytest.raises(RegistryError, match="registry is for anchor"):
        RemoteRegistry(url, mirror=tmp_path / "b").init(other)


def test_two_writers_racing_never_lose_a_publication(tmp_path, smoke_anchor, packages, monkeypatch):
    """Two real writers publish at once, each through its own mirror. The index move is slowed down so both
    are inside the read-check-move window together: one lands, the other is refused ("moved to version")
    and lands when run again. Nothing that reported success may be missing from the index."""
    import threading
    import time

    import fsspec.implementations.local as local_fs

    url = (tmp_path / "remote").as_uri()  # a shared filesystem: the only kind with a lock (object stores: none)
    RemoteRegistry(url, mirror=tmp_path / "init").init(smoke_anchor)
    slow_mv = local_fs.LocalFileSystem.mv
    monkeypatch.setattr(local_fs.LocalFileSystem, "mv", lambda self, *a, **k: (time.sleep(0.5), slow_mv(self, *a, **k)))
    writers = {d: RemoteRegistry(url, mirror=tmp_path / f"mirror_{d}") for d in ("code", "news")}
    start, outcome = threading.Barrier(2), {}

    def publish(domain):
        start.wait()
        try:
            outcome[domain] = writers[domain].publish(packages[domain]).version
        except RegistryError as err:
            outcome[domain] = str(err)

    threads = [threading.Thread(target=publish, args=(d,)) for d in writers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    landed = {d for d, v in outcome.items() if isinstance(v, int)}
    refused = [v for v in outcome.values() if isinstance(v, str)]
    assert landed and all("moved to version" in v for v in refused), outcome
    assert landed <= set(open_registry(url).contents())  # no lost update
    for domain in set(writers) - landed:
        writers[domain].publish(packages[domain])
    assert set(open_registry(url).contents()) == {"code", "news"}
    assert RemoteRegistry(url, mirror=tmp_path / "check").remote_index()["version"] == 2
