"""Bad input on the command line: every case exits 2 with one line that names the file or field, shows no
traceback, and leaves earlier outputs as they were. Cases are data (`CASES`); each builds its bad input in
its own folder from copies of the session's smoke anchor, packages and merged model."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from flexolmo_core.cli.main import main
from flexolmo_core.io.stream_safetensors import TensorFiles

LOOP = ["--steps", "1", "--global-batch", "2", "--micro-batch", "2", "--seq-len", "32", "--progress", "false"]


def tree_sha(path: Path) -> str:
    """Hash of whether `path` exists and of every file under it (names and bytes): what 'intact' means."""
    h = hashlib.sha256(str(Path(path).exists()).encode())
    for f in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode() + hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


@pytest.fixture(scope="module")
def world(tmp_path_factory, smoke_anchor, packages, merged, owner_data) -> dict:
    root = tmp_path_factory.mktemp("bad_inputs")
    shutil.copytree(smoke_anchor, root / "anchor")
    for domain, path in packages.items():
        shutil.copytree(path, root / f"pkg_{domain}")
    shutil.copytree(merged, root / "merged")
    return {"root": root, "anchor": root / "anchor", "code": root / "pkg_code", "news": root / "pkg_news",
            "merged": root / "merged", "data": owner_data["code"], "jsonl": owner_data["news"]}


# ---- how each case makes its bad input (in `tmp`, from copies); returns argv, the message part, what must stay
def copy(world, name, tmp) -> Path:
    shutil.copytree(world[name], tmp / name)
    return tmp / name


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    path.write_text(json.dumps(change(data)))


def domain_with_newline(w, tmp):
    return ["expert", "train", "--anchor", str(w["anchor"]), "--domain", "code\n", "--data", str(w["data"]),
            "--out", str(tmp / "pkg"), *LOOP], "not a safe identifier", []


def only_empty(w, tmp):
    return ["generate", "--model", str(w["merged"]), "--only", "", "hi"], "--only names no expert", []


def only_comma(w, tmp):
    return ["generate", "--model", str(w["merged"]), "--only", ",", "hi"], "--only names no expert", []


def merge_over_a_user_folder(w, tmp):
    (tmp / "mine").mkdir()
    (tmp / "mine" / "notes.txt").write_text("my own work")
    return (["merge", "--anchor", str(w["anchor"]), "--expert", str(w["code"]), "--out", str(tmp / "mine")],
            "is not a previous output of this command", [tmp / "mine"])


def merge_onto_the_anchor(w, tmp):
    anchor = copy(w, "anchor", tmp)
    return (["merge", "--anchor", str(anchor), "--expert", str(w["code"]), "--out", str(anchor)],
            "would overwrite the source", [anchor])


def merge_onto_a_package(w, tmp):
    package = copy(w, "code", tmp)
    return (["merge", "--anchor", str(w["anchor"]), "--expert", str(package), "--out", str(package), "--force"],
            "would overwrite the source", [package])


def expert_onto_the_anchor(w, tmp):
    anchor = copy(w, "anchor", tmp)
    return (["expert", "train", "--anchor", str(anchor), "--domain", "code", "--data", str(w["data"]),
             "--out", str(anchor), *LOOP], "would overwrite the source", [anchor])


def tokenizer_over_a_folder(w, tmp):
    (tmp / "docs").mkdir()
    (tmp / "docs" / "report.txt").write_text("quarterly numbers")
    return (["tokenizer", "train", "--data", str(w["data"]), "--out", str(tmp / "docs"), "--vocab-size", "300"],
            "is not a previous output of this command", [tmp / "docs"])


def manifest_lists_fewer_experts(w, tmp):
    model = copy(w, "merged", tmp)
    edit_json(model / "flexolmo.json", lambda m: {**m, "experts": m["experts"][:2]})
    return (["generate", "--model", str(model), "--exclude", "code", "hi"], "flexolmo.json: lists 2 experts", [model])


def steps_zero(w, tmp):
    return (["expert", "train", "--anchor", str(w["anchor"]), "--domain", "code", "--data", str(w["data"]),
             "--out", str(tmp / "pkg"), *LOOP, "--steps", "0"], "loop.steps must be >= 1", [])


def steps_negative(w, tmp):
    return (["expert", "train", "--anchor", str(w["anchor"]), "--domain", "code", "--data", str(w["data"]),
             "--out", str(tmp / "pkg"), *LOOP, "--steps", "-5"], "loop.steps must be >= 1", [])


def seq_len_zero(w, tmp):
    return (["expert", "train", "--anchor", str(w["anchor"]), "--domain", "code", "--data", str(w["data"]),
             "--out", str(tmp / "pkg"), *LOOP, "--seq-len", "0"], "loop.seq_len must be >= 1", [])


def resume_with_other_arguments(w, tmp):
    argv = ["expert", "train", "--anchor", str(w["anchor"]), "--domain", "code", "--data", str(w["data"]),
            "--out", str(tmp / "pkg"), *LOOP]
    assert main(argv) == 0
    return ([*argv[:5], "docs", "--data", str(w["jsonl"]), *argv[8:], "--lr", "0.05"],
            "holds checkpoints of another run (data_sha256", [tmp / "pkg", tmp / "pkg.run"])


def registry_path_escapes(w, tmp):
    remote = tmp / "remote"
    assert main(["registry", "init", f"file://{remote}", "--anchor", str(w["anchor"])]) == 0
    edit_json(remote / "registry.json", lambda i: {**i, "experts": {"code": {
        "sha256": "0" * 64, "path": "../../../escaped", "published_at": 0, "version": 1}}})
    return ["registry", "list", f"file://{remote}"], "leaves the registry", [remote]


def registry_absolute_path(w, tmp):
    registry = tmp / "registry"
    assert main(["registry", "init", str(registry), "--anchor", str(w["anchor"])]) == 0
    edit_json(registry / "registry.json", lambda i: {**i, "experts": {"code": {
        "sha256": "0" * 64, "path": str(tmp / "elsewhere"), "published_at": 0, "version": 1}}})
    return ["registry", "verify", str(registry)], "leaves the registry", [registry]


def registry_index_missing_keys(w, tmp):
    registry = tmp / "registry"
    assert main(["registry", "init", str(registry), "--anchor", str(w["anchor"])]) == 0
    edit_json(registry / "registry.json", lambda i: {"experts": {}})
    return ["registry", "list", str(registry)], "registry.json: missing field 'anchor_fingerprint'", [registry]


def registry_index_corrupt(w, tmp):
    registry = tmp / "registry"
    assert main(["registry", "init", str(registry), "--anchor", str(w["anchor"])]) == 0
    (registry / "registry.json").write_text('{"experts": ')
    return ["registry", "list", str(registry)], "registry.json: not valid JSON", [registry]


def package_manifest(change, message):
    def case(w, tmp):
        package = copy(w, "code", tmp)
        path = package / "manifest.json"
        path.write_text(change(json.loads(path.read_text())))
        return ["inspect", str(package)], message, [package]
    return case


def without(key):
    def change(manifest):
        name = sorted(manifest["tensors"])[0]
        manifest["tensors"][name].pop(key)
        return json.dumps(manifest)
    return change


def truncated(name, keep):
    def case(w, tmp):
        model = copy(w, "merged", tmp)
        data = (model / name).read_bytes()
        (model / name).write_bytes(data[:keep(len(data))])
        return ["generate", "--model", str(model), "hi"], f"{name}: ", [model]
    return case


def jsonl_text(value):
    def case(w, tmp):
        (tmp / "d.jsonl").write_text(json.dumps({"text": value}) + "\n")
        return (["expert", "train", "--anchor", str(w["anchor"]), "--domain", "code", "--data", str(tmp / "d.jsonl"),
                 "--out", str(tmp / "pkg"), *LOOP], "d.jsonl:1", [])
    return case


def registry_gc_not_a_registry(w, tmp):
    return ["registry", "gc", str(tmp / "nowhere")], "not a registry (no registry.json)", [tmp / "nowhere"]


def registry_remove_not_a_registry(w, tmp):
    return ["registry", "remove", str(tmp / "nowhere"), "code"], "not a registry", [tmp / "nowhere"]


def merge_top_k_zero(w, tmp):
    return (["merge", "--anchor", str(w["anchor"]), "--expert", str(w["code"]), "--out", str(tmp / "m"),
             "--top-k", "0"], "--top-k must be between 1", [])


def generate_unknown_expert(w, tmp):
    return ["generate", "--model", str(w["merged"]), "--exclude", "cooking", "hi"], "unknown expert(s) ['cooking']", []


def merge_missing_anchor(w, tmp):
    return (["merge", "--anchor", str(tmp / "nowhere"), "--expert", str(w["code"]), "--out", str(tmp / "m")],
            "nowhere", [])


def merge_pickled_weights(w, tmp):
    package = copy(w, "code", tmp)
    import pickle

    (package / "expert.safetensors").write_bytes(pickle.dumps({"a": 1}))
    return (["merge", "--anchor", str(w["anchor"]), "--expert", str(package), "--out", str(tmp / "m")],
            "never unpickled", [package])


def merge_duplicate_domain(w, tmp):
    return (["merge", "--anchor", str(w["anchor"]), "--expert", str(w["code"]), "--expert", str(w["code"]),
             "--out", str(tmp / "m")], "code", [])


def evaluate_batch_size_zero(w, tmp):
    return ["evaluate", "--model", str(w["merged"]), "--batch-size", "0"], "evaluate.batch_size must be >= 1", []


def evaluate_workers_zero(w, tmp):
    return ["evaluate", "--model", str(w["merged"]), "--workers", "0"], "evaluate.workers must be >= 1", []


def published_anchor(w, tmp) -> Path:
    """The smoke anchor as a published checkpoint: config, weights and tokenizer only."""
    src = tmp / "published"
    src.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(w["anchor"] / name, src / name)
    return src


def import_shard_path_escapes(w, tmp):
    """The index names a file outside the folder (a valid shard there): refused before any shard is opened (it
    was once read, and imported)."""
    src = published_anchor(w, tmp)
    (tmp / "outside").mkdir()
    shutil.copyfile(src / "model.safetensors", tmp / "outside" / "model.safetensors")
    names = TensorFiles(tmp / "outside").names()
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        n: "../outside/model.safetensors" for n in names}}))
    return (["anchor", "import", "--from", str(src), "--out", str(tmp / "anchor")],
            "shard path '../outside/model.safetensors' leaves the checkpoint folder", [src])


def import_shard_path_absolute(w, tmp):
    src = published_anchor(w, tmp)
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "/etc/passwd"}}))
    return (["anchor", "import", "--from", str(src), "--out", str(tmp / "anchor")],
            "shard path '/etc/passwd' leaves the checkpoint folder", [src])


def generate_index_escapes(w, tmp):
    """Any model folder, not only an import: transformers opens the shards an index names."""
    model = copy(w, "merged", tmp)
    names = TensorFiles(model).names()
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {n: "../x.safetensors" for n in names}}))
    return (["generate", "--model", str(model), "hi"], "shard path '../x.safetensors' leaves the checkpoint folder",
            [model])


def import_config_has_no_layers(w, tmp):
    """config.json says 0 layers beside weights for 2: once imported as a 0-layer anchor."""
    src = published_anchor(w, tmp)
    edit_json(src / "config.json", lambda c: {**c, "num_hidden_layers": 0})
    return (["anchor", "import", "--from", str(src), "--out", str(tmp / "anchor")],
            "config.json: num_hidden_layers is 0, but the weights hold 2 layers", [src])


def import_config_other_ffn_width(w, tmp):
    src = published_anchor(w, tmp)
    edit_json(src / "config.json", lambda c: {**c, "intermediate_size": c["intermediate_size"] * 2})
    return (["anchor", "import", "--from", str(src), "--out", str(tmp / "anchor")],
            "but the config (intermediate_size, hidden_size) implies", [src])


def import_config_other_kv_heads(w, tmp):
    src = published_anchor(w, tmp)
    edit_json(src / "config.json", lambda c: {**c, "num_key_value_heads": c["num_attention_heads"] // 2})
    return (["anchor", "import", "--from", str(src), "--out", str(tmp / "anchor")],
            "k_proj.weight as", [src])


def import_tokenizer_larger_than_the_embedding(w, tmp):
    """Config and weights agree on 24 rows fewer than the tokenizer has ids."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, size = tmp / "published", len(AutoTokenizer.from_pretrained(w["anchor"]))
    model = AutoModelForCausalLM.from_pretrained(w["anchor"])
    model.resize_token_embeddings(size - 24)
    model.save_pretrained(src)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(w["anchor"] / name, src / name)
    return (["anchor", "import", "--from", str(src), "--out", str(tmp / "anchor")],
            f"the tokenizer has {size} tokens, but the embedding has {size - 24} rows", [src])


PLAIN = [
    domain_with_newline, only_empty, only_comma, merge_over_a_user_folder, merge_onto_the_anchor, merge_onto_a_package,
    expert_onto_the_anchor, tokenizer_over_a_folder, manifest_lists_fewer_experts, steps_zero, steps_negative,
    seq_len_zero, resume_with_other_arguments, registry_path_escapes, registry_absolute_path,
    registry_index_missing_keys, registry_index_corrupt, registry_gc_not_a_registry, registry_remove_not_a_registry,
    merge_top_k_zero, generate_unknown_expert, merge_missing_anchor, merge_pickled_weights, merge_duplicate_domain,
    evaluate_batch_size_zero, evaluate_workers_zero, import_shard_path_escapes, import_shard_path_absolute,
    generate_index_escapes, import_config_has_no_layers,
    import_config_other_ffn_width, import_config_other_kv_heads, import_tokenizer_larger_than_the_embedding,
]
CASES = {case.__name__: case for case in PLAIN} | {
    "manifest_is_a_string": package_manifest(lambda m: json.dumps("hello"), "expected a JSON object"),
    "manifest_is_an_array": package_manifest(lambda m: json.dumps([1, 2]), "expected a JSON object"),
    "manifest_not_json": package_manifest(lambda m: "{oops", "manifest.json: not valid JSON"),
    "record_without_sha256": package_manifest(without("sha256"), "missing field 'sha256'"),
    "record_without_dtype": package_manifest(without("dtype"), "missing field 'dtype'"),
    "shapes_as_a_string": package_manifest(lambda m: json.dumps({**m, "shapes": "2x64"}), "field 'shapes' must be"),
    "truncated_config": truncated("config.json", lambda n: n // 2),
    "truncated_weights": truncated("model.safetensors", lambda n: n - 100),
    "weights_cut_in_the_header": truncated("model.safetensors", lambda n: 20),
    "corrupt_flexolmo_json": truncated("flexolmo.json", lambda n: n // 2),
    "jsonl_text_is_a_number": jsonl_text(12345),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_one_clear_line(name, world, tmp_path, capsys):
    argv, message, intact = CASES[name](world, tmp_path)
    capsys.readouterr()
    before = {p: tree_sha(p) for p in intact} | {"world": tree_sha(world["root"])}
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err and "internal error" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("flexolmo ") and message in last, err
    assert {p: tree_sha(p) for p in intact} | {"world": tree_sha(world["root"])} == before


def test_an_operating_system_refusal_is_one_line(monkeypatch, capsys, tmp_path):
    """A read-only output folder (root ignores modes, so the refusal is raised where the write would be)."""
    import flexolmo_core.cli.commands.core as core

    def read_only(args):
        raise PermissionError(13, "Permission denied", str(tmp_path / "out" / "model.safetensors"))

    monkeypatch.setattr(core, "cmd_merge", read_only)
    rc = main(["merge", "--anchor", "a", "--expert", "p", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert err.strip() == f"flexolmo merge: error: {tmp_path / 'out' / 'model.safetensors'}: Permission denied"


def test_a_bug_shows_its_traceback_and_says_so(monkeypatch, capsys):
    import flexolmo_core.cli.commands.core as core

    monkeypatch.setattr(core, "cmd_merge", lambda args: {}["missing"])
    rc = main(["merge", "--anchor", "a", "--expert", "p", "--out", "o"])
    err = capsys.readouterr().err
    assert rc == 70 and "Traceback" in err and "KeyError" in err and "this is a bug in flexolmo" in err


def test_force_replaces_a_folder_that_is_not_an_output(world, tmp_path, capsys):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("old")
    argv = ["merge", "--anchor", str(world["anchor"]), "--expert", str(world["code"]), "--out", str(tmp_path / "mine")]
    assert main(argv) == 2
    assert main([*argv, "--force"]) == 0
    assert not (tmp_path / "mine" / "notes.txt").exists() and (tmp_path / "mine" / "flexolmo.json").exists()
    assert main(argv) == 0  # a previous merge output is replaced without --force


def test_resume_with_more_steps_is_allowed(world, tmp_path):
    argv = ["expert", "train", "--anchor", str(world["anchor"]), "--domain", "code", "--data", str(world["data"]),
            "--out", str(tmp_path / "pkg"), *LOOP]
    assert main(argv) == 0
    assert main([*argv, "--steps", "2"]) == 0
    assert json.loads((tmp_path / "pkg" / "manifest.json").read_text())["training"]["steps"] == 2


def test_a_stage_process_reports_bad_params_in_one_line(tmp_path):
    """`python -m tasks.<stage>` (what dvc repro and the Prefect stage flows run) uses the CLI's handler: a bad
    params value is one line naming the file and section, exit 2, no traceback in the stage's log."""
    import os
    import subprocess
    import sys

    import yaml

    root = Path(__file__).resolve().parents[1]
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["domains"] = {"math": {"steps": 0}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = subprocess.run([sys.executable, "-m", "tasks.expert", "math"], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(root)})
    assert out.returncode == 2, out.stderr
    assert "expert math: error: params.yaml:expert.loop: loop.steps must be >= 1, got 0" in out.stderr
    assert "Traceback" not in out.stderr + out.stdout


STAGE_MODULES = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "tasks").glob("*.py")
                       if p.stem != "__init__")


@pytest.mark.parametrize("stage", STAGE_MODULES)
def test_every_stage_module_answers_help_and_refuses_unknown_flags(stage, monkeypatch, capsys):
    """`python -m tasks.<stage>` parses its command line with one convention (`--params FILE`, a domain as the
    one positional where the stage has one): --help is help (exit 0); an unknown flag or an extra word is
    refused (exit 2) before the stage runs. (`tasks.merge --help` once parsed "- - h e l p" one character at
    a time, and `tasks.expert --help` took --help for a domain name.)"""
    import importlib

    import tasks

    main = importlib.import_module(f"tasks.{stage}").main
    for argv, code in ((["--help"], 0), (["--bogus"], 2), (["--params", "params.yaml", "one", "two"], 2)):
        monkeypatch.setattr("sys.argv", [f"tasks/{stage}.py", *argv])
        with pytest.raises(SystemExit) as stop:
            tasks.run(main)  # argparse exits before main would run
        out = capsys.readouterr()
        assert stop.value.code == code, (argv, out.err)
        assert f"usage: python -m tasks.{stage} [-h] [--params FILE]" in out.out + out.err, out
