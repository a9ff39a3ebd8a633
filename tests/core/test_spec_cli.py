"""Spec-driven command lines: every spec field is a flag of both CLIs, with one name; --spec files;
old flag names still work and warn (issue 23)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, Field, ValidationError

from core import cli
from core.spec import METHODS, PruneSpec, RunSpec
from core.spec_cli import add_spec_options, spec_body
from jobs.spec import JobRequest
from prunectl.cli import build_body
from prunectl.cli import build_parser as prunectl_parser

REPO = Path(__file__).resolve().parents[2]


def _leaf_paths(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every leaf field path of a pydantic model, walking nested (optional) models."""
    out = []
    for name, info in model.model_fields.items():
        ann = info.annotation
        args = [a for a in typing.get_args(ann) if a is not type(None)] or [ann]
        sub = args[0] if len(args) == 1 and isinstance(args[0], type) else None
        if sub is not None and issubclass(sub, BaseModel):
            out += _leaf_paths(sub, f"{prefix}{name}.")
        else:
            out.append(f"{prefix}{name}")
    return out


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def _actions_by_field(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest.removeprefix("spec:"): a for a in parser._actions if a.dest.startswith("spec:")}


CORE_PRUNE = _subparser(cli.build_parser(), "prune")
SUBMIT = _subparser(prunectl_parser(), "submit")
CANDIDATES = ("2:4", "0.05", "1", "16", "2GB", "x")


def _get(body: dict[str, Any], path: str) -> Any:
    for key in path.split("."):
        body = body[key]
    return body


def _set_by_both(path: str, core_flag: argparse.Action) -> tuple[list[str], Any]:
    """argv setting ``path`` (a value both CLIs accept) and the value it sets."""
    flag = core_flag.option_strings[0]
    if core_flag.nargs == 0:  # --x / --no-x
        return [core_flag.option_strings[-1]], False
    metavar = str(core_flag.metavar)
    values = [metavar.strip("{}").split(",")[-1]] if metavar.startswith("{") else list(CANDIDATES)
    for v in values:
        try:
            args = CORE_PRUNE.parse_args(["--out", "o", flag, v])
        except cli.UsageError:
            continue
        return [flag, v], _get(spec_body(args), path)
    raise AssertionError(f"{flag} ({path}) accepts none of {values}")


@pytest.mark.parametrize("path", _leaf_paths(RunSpec))
def test_every_spec_field_is_settable_by_both_clis_with_one_flag(path: str) -> None:
    core_actions, ctl_actions = _actions_by_field(CORE_PRUNE), _actions_by_field(SUBMIT)
    assert path in core_actions, f"python -m core prune cannot set {path}"
    assert path in ctl_actions, f"prunectl submit cannot set {path}"
    assert core_actions[path].option_strings == ctl_actions[path].option_strings
    argv, value = _set_by_both(path, core_actions[path])
    ctl_args = SUBMIT.parse_args(["--model", "m", *argv])
    assert _get(build_body(ctl_args), path) == value
    core_args = CORE_PRUNE.parse_args(["--out", "o", *argv])
    assert _get(spec_body(core_args), path) == value


def test_the_walk_reaches_nested_optional_sections_and_the_job_only_fields() -> None:
    paths = _leaf_paths(RunSpec)
    assert {
        "prune.owl_m",
        "prune.dsnot_iters",
        "prune.ria_alpha",
        "sweep.methods",
        "gate.min_sparsity",
    } <= set(paths)
    assert len(paths) >= 45
    ctl = _actions_by_field(SUBMIT)
    for path in _leaf_paths(JobRequest):
        assert path in ctl, f"prunectl submit cannot set {path}"
    body = build_body(
        SUBMIT.parse_args(
            ["--model", "m", "--webhook-url", "https://x/y", "--webhook-events", "started", "completed"]
        )
    )
    assert body["webhook"] == {"url": "https://x/y", "events": ["started", "completed"]}


def test_a_field_added_to_the_spec_gets_a_flag_with_no_cli_change() -> None:
    class Recovery(BaseModel):
        """Recovery after pruning (a section another change may add)."""

        steps: int = Field(default=0, ge=0, description="Training steps.")
        schedule: typing.Literal["cosine", "linear"] = "cosine"
        enabled: bool = False
        lr: float | typing.Literal["auto"] = "auto"
        weights: dict[str, float] = Field(default_factory=dict)

    class Extended(RunSpec):
        recovery: Recovery | None = None

    p = argparse.ArgumentParser(exit_on_error=False)
    add_spec_options(p, Extended)
    args = p.parse_args(
        ["--model", "m", "--recovery-steps", "20", "--recovery-schedule", "linear", "--recovery"]
    )
    assert spec_body(args)["recovery"] == {"steps": 20, "schedule": "linear", "enabled": True}
    args = p.parse_args(["--recovery-lr", "0.001", "--recovery-weights", '{"a": 1.5}'])
    assert spec_body(args)["recovery"] == {"lr": 0.001, "weights": {"a": 1.5}}
    assert spec_body(p.parse_args(["--recovery-lr", "auto"]))["recovery"] == {"lr": "auto"}
    assert "Training steps." in p.format_help() and "{cosine,linear}" in p.format_help()
    with pytest.raises(argparse.ArgumentError, match=r"recovery\.steps"):
        p.parse_args(["--recovery-steps", "-1"])


def test_help_lists_every_method_and_the_owl_dsnot_ria_and_sweep_options() -> None:
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    for cmd in (["-m", "core", "prune", "--help"], ["-m", "prunectl", "submit", "--help"]):
        res = subprocess.run([sys.executable, *cmd], cwd=REPO, env=env, capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
        assert "{" + ",".join(METHODS) + "}" in res.stdout and "ria" in METHODS
        for flag in (
            "--allocation",
            "--owl-m",
            "--owl-lambda",
            "--refine",
            "--dsnot-iters",
            "--dsnot-threshold",
            "--dsnot-var-power",
            "--ria-alpha",
            "--ria-permute",
            "--sweep-sparsities",
            "--sweep-patterns",
            "--sweep-methods",
            "--spec",
            "--recon-tokens",
            "--eval-tasks",
        ):
            assert flag in res.stdout, (cmd, flag)
        assert "RIA: exponent" in res.stdout  # help texts are the field descriptions


def test_spec_file_with_flags_laid_over_it(tmp_path: Path) -> None:
    spec = tmp_path / "job.yaml"
    spec.write_text(
        "model:\n  source: /m\nprune:\n  method: wanda\n  ignore: [a, b]\nevaluation:\n  max_windows: 3\n"
    )
    argv = ["--spec", str(spec), "--sparsity", "0.6", "--ignore", "c", "--no-dense-baseline", "--out", "o"]
    run = cli.spec_from_args(CORE_PRUNE.parse_args(argv))
    assert run.prune.method == "wanda" and run.prune.sparsity == 0.6 and run.prune.ignore == ["c"]
    assert run.evaluation.max_windows == 3 and run.evaluation.dense_baseline is False
    js = tmp_path / "job.json"
    js.write_text(json.dumps({"model": {"source": "/x"}, "prune": {"method": "ria", "ria_alpha": 1.0}}))
    run = cli.spec_from_args(CORE_PRUNE.parse_args(["--spec", str(js), "--out", "o", "--model", "/y"]))
    assert run.model.source == "/y" and run.prune.method == "ria" and run.prune.ria_alpha == 1.0


def test_bad_spec_file_or_no_model_exits_2_with_one_line(tmp_path: Path, capsys) -> None:
    (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
    for argv, message in (
        (["--spec", str(tmp_path / "bad.yaml")], "cannot parse"),
        (["--spec", str(tmp_path / "missing.json")], "cannot read"),
        ([], "a model is required"),
        (["--model", "m", "--owl-m", "0"], "prune.owl_m"),
        (["--model", "m", "--owl-m", "7"], "only apply with allocation 'owl'"),
        (["--model", "m", "--sparsity", "0"], "prunes nothing"),
    ):
        assert cli.main(["prune", *argv, "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()


# -- renamed flags --------------------------------------------------------------------------------

RENAMED_PRUNE = [
    (["--eval-data", "c4"], ["--eval-source", "c4"]),
    (["--no-dense-eval"], ["--no-dense-baseline"]),
    (["--text-field", "body"], ["--calibration-text-field", "body", "--eval-text-field", "body"]),
    (["--no-model"], ["--no-export-model"]),
]


@pytest.mark.parametrize(("old", "new"), RENAMED_PRUNE)
def test_old_prune_flags_still_work_and_warn(old: list[str], new: list[str], capsys) -> None:
    base = ["--model", "m", "--out", "o"]
    assert set(cli.RENAMED_PRUNE_FLAGS) == {o[0] for o, _ in RENAMED_PRUNE}
    expected = cli.spec_from_args(CORE_PRUNE.parse_args([*base, *new]))
    assert "deprecated" not in capsys.readouterr().err
    got = cli.spec_from_args(CORE_PRUNE.parse_args([*base, *old]))
    assert got == expected and got != cli.spec_from_args(CORE_PRUNE.parse_args(base))
    err = capsys.readouterr().err
    assert f"warning: {old[0]} is deprecated" in err and new[0] in err


def test_old_eval_flags_still_work_and_warn(capsys) -> None:
    ev = _subparser(cli.build_parser(), "eval")
    old = ev.parse_args(
        [
            "--model",
            "m",
            "--data",
            "c4",
            "--windows",
            "2",
            "--seqlen",
            "32",
            "--batch-size",
            "3",
            "--text-field",
            "body",
        ]
    )
    err = capsys.readouterr().err
    new = ev.parse_args(
        [
            "--model",
            "m",
            "--eval-source",
            "c4",
            "--eval-windows",
            "2",
            "--eval-seqlen",
            "32",
            "--eval-batch-size",
            "3",
            "--eval-text-field",
            "body",
        ]
    )
    assert vars(old) == vars(new)
    assert set(cli.RENAMED_EVAL_FLAGS) == {"--data", "--windows", "--seqlen", "--batch-size", "--text-field"}
    for flag in cli.RENAMED_EVAL_FLAGS:
        assert f"warning: {flag} is deprecated" in err
    with pytest.raises(cli.UsageError, match=r"evaluation\.max_windows"):
        ev.parse_args(["--model", "m", "--windows", "0"])  # the old flag is checked as the new one


def test_prunes_nothing_is_refused_once_by_the_spec_for_every_entry_point() -> None:
    for body in (
        {"model": {"source": "m"}, "prune": {"sparsity": 0.0}},
        {"model": {"source": "m"}, "prune": {"pattern": "2:4", "ignore": ["*"]}},
    ):
        for model in (RunSpec, JobRequest):
            with pytest.raises(ValidationError, match="prune"):
                model.model_validate(body)
    PruneSpec(sparsity=0.0)  # the section alone may hold 0 (the whole run is what is refused)


def test_summary_sparsity_is_renamed_measured_sparsity_and_the_old_name_still_read() -> None:
    from jobs.spec import JobSummary

    old_record = JobSummary.model_validate_json('{"sparsity": 0.5}')  # stored before the rename
    assert old_record.measured_sparsity == 0.5
    new = JobSummary(measured_sparsity=0.4).model_dump(mode="json")
    assert new["measured_sparsity"] == new["sparsity"] == 0.4  # old readers still find it
    prop = JobSummary.model_json_schema()["properties"]["sparsity"]
    assert prop["deprecated"] is True
    with pytest.warns(DeprecationWarning, match="measured_sparsity"):
        assert old_record.sparsity == 0.5
