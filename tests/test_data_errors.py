"""Bad input: a clear error naming the problem, and no partial output (the previous output survives)."""
from __future__ import annotations

import json

import pytest

from flexolmo_core.data.builtin_sources import package_dir
from flexolmo_core.data.config import PrepareConfig
from flexolmo_core.data.decontam import EvalIndex
from flexolmo_core.data.prepare import build_flexmix

NO_EVAL = EvalIndex.from_texts({}, 13)  # these tests are about input errors, not decontamination
GOOD = [{"text": f"Document number {i}. " + "A plain sentence of real prose, repeated to have some length. " * 3}
        for i in range(12)]


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def build(tmp_path, sources, domains=("public",)):
    config = PrepareConfig(tier="dev", sources=sources)
    return build_flexmix(config, list(domains), tmp_path / "out", eval_index=NO_EVAL)


@pytest.fixture
def previous_output(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "marker").write_text("previous run")
    return out


def assert_untouched(tmp_path, out):
    assert (out / "marker").read_text() == "previous run"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out")) == []


def test_a_good_local_domain_builds(tmp_path):
    card = build(tmp_path, {"public": [{"kind": "jsonl", "path": str(jsonl(tmp_path / "a.jsonl", GOOD))}]})
    assert card["domains"]["public"]["documents"] == len(GOOD)


def test_missing_package_names_the_package_and_the_fix():
    with pytest.raises(FileNotFoundError, match="not-a-real-data-package.*setup.sh"):
        package_dir("not_a_real_data_package", "not-a-real-data-package")


def test_missing_file(tmp_path, previous_output):
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl"):
        build(tmp_path, {"public": [{"kind": "jsonl", "path": str(tmp_path / "nowhere.jsonl")}]})
    assert_untouched(tmp_path, previous_output)


def test_empty_domain(tmp_path, previous_output):
    path = jsonl(tmp_path / "empty.jsonl", [{"text": ""}, {"text": "   "}])
    with pytest.raises(ValueError, match="'public'.*no text"):
        build(tmp_path, {"public": [{"kind": "jsonl", "path": str(path)}]})
    assert_untouched(tmp_path, previous_output)


def test_non_utf8_file(tmp_path, previous_output):
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "good.txt").write_text("fine text " * 20)
    (tmp_path / "txt" / "bad.txt").write_bytes(b"caf\xe9 au lait " * 20)
    with pytest.raises(ValueError, match=r"bad.txt: not valid UTF-8 at byte 3"):
        build(tmp_path, {"public": [{"kind": "txt", "path": str(tmp_path / "txt")}]})
    assert_untouched(tmp_path, previous_output)


def test_malformed_jsonl_line_names_file_and_line(tmp_path, previous_output):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(GOOD[0]) + "\n" + json.dumps(GOOD[1]) + "\n{\"text\": \"unterminated\n")
    with pytest.raises(ValueError, match=r"broken.jsonl:3: malformed JSON"):
        build(tmp_path, {"public": [{"kind": "jsonl", "path": str(path)}]})
    assert_untouched(tmp_path, previous_output)


def test_unknown_text_field_lists_the_fields(tmp_path, previous_output):
    path = jsonl(tmp_path / "a.jsonl", [{"body": "x" * 100}])
    with pytest.raises(ValueError, match=r"a.jsonl:1: unknown text field 'text'; fields are \['body'\]"):
        build(tmp_path, {"public": [{"kind": "jsonl", "path": str(path)}]})
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["x" * 100]}), tmp_path / "a.parquet")
    with pytest.raises(ValueError, match="unknown text field 'text'"):
        build(tmp_path, {"public": [{"kind": "parquet", "path": str(tmp_path / "a.parquet")}]})
    assert_untouched(tmp_path, previous_output)


@pytest.mark.parametrize("name", ["../etc", "Bad-Name", "1st", "a b", "", "code\n"])  # "$" matches before a final \n
def test_unsafe_domain_names_are_refused(tmp_path, previous_output, name):
    with pytest.raises(ValueError, match="not a safe identifier"):
        build(tmp_path, {}, domains=("public", name))
    assert_untouched(tmp_path, previous_output)


def test_a_new_domain_without_sources_and_a_bad_source_field(tmp_path):
    with pytest.raises(ValueError, match="'legal' has no sources.*prepare.sources.legal"):
        build(tmp_path, {}, domains=("legal",))
    with pytest.raises(ValueError, match=r"prepare.sources.public\[0\]: unknown field\(s\) \['txt_field'\]"):
        build(tmp_path, {"public": [{"kind": "jsonl", "path": "x", "txt_field": "t"}]})
    with pytest.raises(ValueError, match="unknown tier|not one of the tiers"):
        build_flexmix(PrepareConfig(tier="huge"), ["public"], tmp_path / "out", eval_index=NO_EVAL)


def test_cli_reports_user_errors_without_traceback(tmp_path, capsys):
    from flexolmo_core.cli.main import main

    (tmp_path / "params.yaml").write_text("domains: {'Bad-Name': {}}\nprepare: {tier: dev}\n")
    assert main(["prepare", "--params", str(tmp_path / "params.yaml"), "--out", str(tmp_path / "out")]) == 2
    assert "not a safe identifier" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
