"""The results pages are generated from the records, so a figure cannot drift from what was measured."""
from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
from pathlib import Path

from benchmarks import results_pages

ROOT = Path(__file__).resolve().parents[1]
# Sections of docs/results.md that quote a `make run` report or a run whose records are not kept here.
EXTERNAL = ("### Levers (issue 14", "### The default run's goals")
BPB = re.compile(r"(?<![\d.])\d\.\d{4}(?!\d)")


def test_every_page_is_what_its_records_give():
    assert results_pages.main(["--check"]) == 0


def test_a_page_edited_by_hand_is_caught(tmp_path, capsys):
    assert results_pages.main(["--out", str(tmp_path)]) == 0
    page = tmp_path / "smollm2_routing.md"
    page.write_text(page.read_text().replace("0.8964", "0.8864", 1))
    assert results_pages.main(["--check", "--out", str(tmp_path)]) == 1
    assert "smollm2_routing.md" in capsys.readouterr().err


def test_every_page_is_stamped_with_commit_and_machine():
    for name, text in results_pages.pages().items():
        assert "Recorded at commit" in text or "measured:" in text or "commit 9125ffb" in text, name
        assert "machine not recorded" not in text, name


def test_a_study_run_from_a_git_archive_snapshot_records_the_snapshots_commit(tmp_path):
    """Long studies run from `git archive HEAD` (no .git there) so that commits can land meanwhile; their
    records must still say which code measured them. The mechanism (export-subst) is replayed in a scratch repo."""
    repo, snap = tmp_path / "repo", tmp_path / "snapshot"
    for name in (".gitattributes", "benchmarks/machine.py", "benchmarks/source_commit.txt"):
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, repo / name)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run(git + ["add", "-A"], cwd=repo, check=True)
    subprocess.run(git + ["commit", "-qm", "snapshot"], cwd=repo, check=True)
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True,
                          check=True).stdout.strip()
    archive = subprocess.run(["git", "archive", "HEAD"], cwd=repo, capture_output=True, check=True).stdout
    snap.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=snap, check=True)  # unpacked inside another repository: its HEAD
    subprocess.run(git + ["commit", "-q", "--allow-empty", "-m", "elsewhere"], cwd=snap, check=True)  # is not ours
    subprocess.run(["tar", "-x", "-C", str(snap)], input=archive, check=True)
    spec = importlib.util.spec_from_file_location("snapshot_machine", snap / "benchmarks" / "machine.py")
    snapshot = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(snapshot)
    assert snapshot.source_commit() == head


def test_bpb_figures_quoted_in_the_narrative_are_in_the_generated_pages():
    generated = "".join(results_pages.pages().values())
    section, missing = "", []
    for line in (ROOT / "docs" / "results.md").read_text().splitlines():
        if line.startswith("#"):
            section = line
        if section.startswith(EXTERNAL):
            continue
        missing += [(section, n) for n in BPB.findall(line) if n not in generated]
    assert not missing, missing
