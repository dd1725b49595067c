"""Package canaries (flexolmo_core/expert/canary.py): the weights back the anchor fingerprint a package claims."""
from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch
from transformers import AutoConfig

from flexolmo_core.errors import PackageError
from flexolmo_core.expert.canary import ATOL, check_canary, compute_canary
from flexolmo_core.expert.package import load_package
from flexolmo_core.merge.merging import merge


@pytest.fixture(scope="module")
def forged(tmp_path_factory, smoke_tokenizer, smoke_anchor, owner_data):
    """A package trained against another anchor (same tokenizer and shapes, seed 1), its manifest edited to
    claim the smoke anchor's fingerprint."""
    from flexolmo_core.anchor.model import init_anchor, read_fingerprint
    from flexolmo_core.training.config import LoopConfig
    from flexolmo_core.training.stages import train_expert

    root = tmp_path_factory.mktemp("forged")
    init_anchor("smoke", smoke_tokenizer, root / "other_anchor", seed=1)
    loop = LoopConfig(steps=2, global_batch=2, micro_batch=2, seq_len=32, warmup=0, checkpoint_every=2,
                      eval_batches=1, progress=False)
    train_expert(root / "other_anchor", "code", [owner_data["code"]], root / "run", loop, package_dir=root / "pkg")
    manifest = json.loads((root / "pkg" / "manifest.json").read_text())
    manifest["anchor_fingerprint"] = read_fingerprint(smoke_anchor)
    (root / "pkg" / "manifest.json").write_text(json.dumps(manifest))
    return root / "pkg"


def test_a_forged_fingerprint_is_refused_by_the_weights(smoke_anchor, forged, tmp_path):
    claimed = json.loads((forged / "manifest.json").read_text())["canary"]["sha256"]
    with pytest.raises(PackageError, match="trained against another anchor") as err:
        merge(smoke_anchor, [forged], tmp_path / "m")
    assert claimed[:16] in str(err.value)
    assert not (tmp_path / "m").exists()


def test_the_canary_agrees_across_thread_counts_within_the_tolerance(smoke_anchor, packages):
    package = load_package(packages["code"])
    config = AutoConfig.from_pretrained(smoke_anchor)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = compute_canary(smoke_anchor, config, package)
    finally:
        torch.set_num_threads(threads)
    recorded = package.manifest["canary"]
    worst = max(abs(a - b) for ra, rb in zip(one["logits"], recorded["logits"]) for a, b in zip(ra, rb))
    assert worst < ATOL / 10  # the noise is far below the tolerance
    assert max(abs(v) for row in one["logits"] for v in row) > 100 * ATOL  # and the tolerance far below the values
    check_canary(smoke_anchor, config, package)


@pytest.mark.parametrize("shift, refused", [(ATOL / 4, False), (0.05, True)])
def test_edited_canary_values_are_judged_by_the_tolerance(smoke_anchor, packages, tmp_path, shift, refused):
    edited = tmp_path / "pkg"
    shutil.copytree(packages["code"], edited)
    manifest = json.loads((edited / "manifest.json").read_text())
    manifest["canary"]["logits"][3][5] += shift
    manifest["canary"]["sha256"] = hashlib.sha256(json.dumps(manifest["canary"]["logits"]).encode()).hexdigest()
    (edited / "manifest.json").write_text(json.dumps(manifest))
    package, config = load_package(edited), AutoConfig.from_pretrained(smoke_anchor)
    if refused:
        with pytest.raises(PackageError, match="largest difference"):
            check_canary(smoke_anchor, config, package)
    else:
        check_canary(smoke_anchor, config, package)


def test_a_package_without_a_canary_cannot_be_merged(smoke_anchor, packages, tmp_path):
    bare = tmp_path / "pkg"
    shutil.copytree(packages["code"], bare)
    manifest = json.loads((bare / "manifest.json").read_text())
    del manifest["canary"]
    (bare / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(PackageError, match="no canary"):
        merge(smoke_anchor, [bare], tmp_path / "m")


def test_canary_values_that_disagree_with_their_hash_are_refused(smoke_anchor, packages, tmp_path):
    edited = tmp_path / "pkg"
    shutil.copytree(packages["code"], edited)
    manifest = json.loads((edited / "manifest.json").read_text())
    manifest["canary"]["logits"][0][0] += 1.0
    (edited / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(PackageError, match="do not match its own sha256"):
        check_canary(smoke_anchor, AutoConfig.from_pretrained(smoke_anchor), load_package(edited))
