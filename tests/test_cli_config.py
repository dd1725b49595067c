"""The CLI is the config: `--params params.yaml` gives exactly the config the DVC stage builds (tasks/*.py
call `load_stage` / `load_section` on the same section), and a flag overrides only the field it names."""
import dataclasses
import typing
from pathlib import Path

import pytest
import yaml

from flexolmo_core.cli.config import field_names
from flexolmo_core.cli.main import parse_args
from flexolmo_core.data.config import PrepareConfig, TokenizerConfig
from flexolmo_core.evaluation.runner import EvalConfig
from flexolmo_core.io.params import load_section
from flexolmo_core.training.config import (
    AnchorConfig,
    DomainEmbeddingConfig,
    ExpertConfig,
    RouterTuneConfig,
    UnrestrictedConfig,
    load_stage,
)

PARAMS = str(Path(__file__).resolve().parents[1] / "params.yaml")
# (command words + required non-config arguments, config class, params section, per-domain stage)
STAGE_COMMANDS = [
    (["anchor", "train", "--tokenizer", "t", "--data", "d", "--out", "o"], AnchorConfig, "anchor", False),
    (["expert", "train", "--anchor", "a", "--domain", "code", "--data", "d", "--out", "o"], ExpertConfig, "expert", True),
    (["embedding", "compute", "--anchor", "a", "--domain", "code", "--data", "d", "--out", "o"],
     DomainEmbeddingConfig, "domain_embedding", True),
    (["router", "tune", "--model", "m", "--public-data", "p", "--out", "o"], RouterTuneConfig, "router_tune", False),
    (["baseline", "unrestricted", "--tokenizer", "t", "--data", "d", "--out", "o", "--experts", "8"],
     UnrestrictedConfig, "unrestricted_moe", False),
    (["prepare"], PrepareConfig, "prepare", False),
    (["tokenizer", "train", "--data", "d", "--out", "o"], TokenizerConfig, "tokenizer", False),
    (["tokenizer", "pack"], TokenizerConfig, "tokenizer", False),
    (["evaluate", "--model", "m"], EvalConfig, "evaluate", False),
]


def parse(argv):
    return parse_args(argv)


def flags(cfg) -> dict:
    """The fields a command line sets (`loop` / `presets` are params.yaml structure, already resolved)."""
    return {name: getattr(cfg, name) for name in field_names(type(cfg))}


@pytest.mark.parametrize("argv,cls,section,per_domain", STAGE_COMMANDS, ids=lambda x: " ".join(x[:2]) if isinstance(x, list) else None)
def test_params_give_the_dvc_stage_config(argv, cls, section, per_domain):
    _, stage, loop = load_stage(cls, section, PARAMS, domain="code" if per_domain else None)
    if cls in (PrepareConfig, TokenizerConfig):  # their tasks/*.py use load_section (evaluate's uses load_stage)
        assert stage == load_section(cls, section, PARAMS)
    args = parse(argv + ["--params", PARAMS])
    assert args.stage == stage  # flags and the params tables without flags (loop, presets, sources)
    assert getattr(args, "loop", None) == loop


@pytest.mark.parametrize("argv,cls,section,per_domain", STAGE_COMMANDS, ids=lambda x: " ".join(x[:2]) if isinstance(x, list) else None)
def test_a_flag_overrides_only_what_it_names(argv, cls, section, per_domain):
    _, stage, loop = load_stage(cls, section, PARAMS, domain="code" if per_domain else None)
    if loop is not None:
        args = parse(argv + ["--params", PARAMS, "--steps", "3"])
        assert args.loop == dataclasses.replace(loop, steps=3) and flags(args.stage) == flags(stage)
    field = next(f for f in dataclasses.fields(cls) if f.type in ("int", "float", int, float) and f.metadata.get("cmd", True))
    value = getattr(stage, field.name) + 1
    args = parse(argv + ["--" + field.name.replace("_", "-"), str(value), "--params", PARAMS])  # order-free
    assert flags(args.stage) == flags(dataclasses.replace(stage, **{field.name: value}))
    assert getattr(args, "loop", None) == loop


def test_expert_train_runs_what_the_section_says():
    """The bug this replaces: argparse defaults (20 steps, seq 64, lr 1e-3, no public mix) beat params.yaml."""
    args = parse(STAGE_COMMANDS[1][0] + ["--params", PARAMS])
    assert (args.loop.steps, args.loop.seq_len, args.loop.lr, args.stage.public_mix) == (50, 256, 2e-3, 0.25)  # tiny
    args = parse(STAGE_COMMANDS[0][0] + ["--params", PARAMS])
    assert args.stage.replay_tokens == 262144 and args.loop.steps == 250


def test_domain_overrides_and_preset_choice(tmp_path):
    params = yaml.safe_load(Path(PARAMS).read_text())
    params["domains"]["code"] = {"steps": 7, "public_mix": 0.5}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    args = parse(STAGE_COMMANDS[1][0] + ["--params", str(path)])
    assert (args.loop.steps, args.stage.public_mix, args.loop.seq_len) == (7, 0.5, 256)
    args = parse(STAGE_COMMANDS[1][0] + ["--params", str(path), "--preset-params", "smoke"])
    assert (args.loop.steps, args.loop.seq_len) == (7, 64)  # the domain's own override beats the preset's


def test_without_params_the_dataclass_defaults_apply():
    args = parse(STAGE_COMMANDS[1][0])
    assert args.stage == ExpertConfig() and args.loop.steps == 100


@pytest.mark.parametrize("argv,cls,section,per_domain", STAGE_COMMANDS, ids=lambda x: " ".join(x[:2]) if isinstance(x, list) else None)
def test_every_field_has_a_flag_with_its_one_line_doc(argv, cls, section, per_domain, capsys):
    with pytest.raises(SystemExit):
        parse([w for w in argv[:2] if not w.startswith("-")] + ["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "__TEMP__" not in text  # simple-parsing's placeholder for a field without a comment
    hints = typing.get_type_hints(cls)
    for name in field_names(cls):  # a nested section (expert.dp) has a flag per field of its own
        names = [f.name for f in dataclasses.fields(hints[name])] if dataclasses.is_dataclass(hints[name]) else [name]
        assert all("--" + n.replace("_", "-") + " " in text for n in names), name
    assert "optimiser steps" in text or cls not in (AnchorConfig, ExpertConfig)  # LoopConfig.steps' comment


@pytest.mark.parametrize("flag, value, message", [
    ("--steps", "0", "loop.steps must be >= 1, got 0"), ("--steps", "-5", "loop.steps must be >= 1, got -5"),
    ("--seq-len", "0", "loop.seq_len must be >= 1, got 0"), ("--micro-batch", "0", "loop.micro_batch must be >= 1"),
    ("--lr", "nan", "loop.lr must be a positive number, got nan"), ("--dtype", "int8", "loop.dtype must be one of")])
def test_loop_values_that_train_on_nothing_are_refused(flag, value, message, tmp_path, capsys):
    """--steps -5 once wrote an untrained package (manifest steps: -5); --seq-len 0 wrote NaN into manifest.json."""
    from flexolmo_core.cli.main import main

    argv = ["expert", "train", "--anchor", "a", "--domain", "code", "--data", "d", "--out", str(tmp_path / "o")]
    assert main(argv + [flag, value]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_loop_values_in_params_are_refused_naming_the_file(tmp_path):
    data = yaml.safe_load(Path(PARAMS).read_text())
    data["expert"]["presets"]["tiny"]["steps"] = -5
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(ValueError, match=r"params.yaml:expert.loop: loop.steps must be >= 1, got -5"):
        load_stage(ExpertConfig, "expert", tmp_path / "params.yaml", domain="code")


def test_version(capsys):
    from importlib.metadata import version

    from flexolmo_core.cli.main import main

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"flexolmo {version('flexolmo')}"


def test_every_option_of_every_command_has_help():
    """Generated or hand-written, each option says what it is; a default is shown only where there is one."""
    import argparse

    from flexolmo_core.cli import main as cli

    def walk(parser, path):
        yield path, parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from walk(sub, [*path, name])

    bare, shown_none = [], []
    for path, parser in walk(cli.build_parser(), []):
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction, argparse._VersionAction)):
                continue
            if not (action.help or "").strip() or "Config." in action.help:
                bare.append(f"{' '.join(path)} {action.option_strings or action.dest}")
        if "(default: None)" in parser.format_help():
            shown_none.append(" ".join(path))
    assert not bare, bare
    assert not shown_none, shown_none


def test_every_command_that_writes_an_out_folder_takes_force():
    """--force comes with --out (cli.config.add_out), on every command that writes a folder."""
    import argparse

    from flexolmo_core.cli import main as cli

    def walk(parser):
        yield parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    yield from walk(sub)

    with_out = [p for p in walk(cli.build_parser()) if any("--out" in a.option_strings for a in p._actions)]
    assert len(with_out) >= 15
    assert all(any("--force" in a.option_strings for a in p._actions) for p in with_out)


def test_params_of_one_command_do_not_leak_into_another(tmp_path):
    """The params choice belongs to the command that runs: `expert train`'s file does not change `anchor train`."""
    data = yaml.safe_load(Path(PARAMS).read_text())
    data["expert"]["presets"]["tiny"]["steps"] = 11
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(data))
    args = parse(STAGE_COMMANDS[1][0] + ["--params", str(tmp_path / "params.yaml")])
    assert args.loop.steps == 11 and args.stage_command == ("expert", "train")
    args = parse(STAGE_COMMANDS[0][0] + ["--params", str(tmp_path / "params.yaml")])
    assert args.loop.steps == 250  # anchor's own section
