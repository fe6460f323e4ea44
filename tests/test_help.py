"""Every command answers `--help` at once (without running, without TensorFlow), and long steps show progress."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml
from helpers import CONSOLE_SCRIPT, plain_decode, stages_env

from captioning.__main__ import _parser
from captioning.scoring import score_captions
from captioning.tiny_project import PROJECT

STAGE_MODULES = sorted(stage["cmd"].split()[-1] for stage in
                       yaml.safe_load((PROJECT / "dvc.yaml").read_text())["stages"].values())
SUBCOMMANDS = sorted(next(action for action in _parser()._actions
                          if isinstance(action, argparse._SubParsersAction)).choices)


@pytest.fixture(scope="module")
def no_tensorflow(tmp_path_factory):
    """An environment where importing TensorFlow fails: `--help` must not need it (it costs seconds)."""
    fake = tmp_path_factory.mktemp("fake_modules")
    (fake / "tensorflow").mkdir()
    (fake / "tensorflow" / "__init__.py").write_text("raise ImportError('--help imported TensorFlow')\n")
    env = stages_env()
    env["PYTHONPATH"] = os.pathsep.join([str(fake), env["PYTHONPATH"]])
    return env


def run_help(args: list[str], env: dict, cwd) -> subprocess.CompletedProcess:
    """Run in an empty folder: a command that ran instead of printing help would fail or write files."""
    result = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert list(cwd.iterdir()) == [], f"{args} wrote files"
    return result


def test_every_stage_file_is_a_dvc_stage():
    files = sorted(f"stages.{path.stem}" for path in (PROJECT / "stages").glob("*.py") if path.stem != "__init__")
    assert STAGE_MODULES == files


@pytest.mark.parametrize("module", STAGE_MODULES)
def test_stage_help_describes_it_and_does_not_run(module, no_tensorflow, tmp_path):
    result = run_help(["-m", module, "--help"], no_tensorflow, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: python -m {module} [-h]")
    docstring = __import__(module, fromlist=["main"]).__doc__
    first_words = " ".join(docstring.split()[:4])
    assert first_words in " ".join(result.stdout.split())
    assert "params.yaml" in result.stdout and "dvc repro" in result.stdout


def test_stage_rejects_arguments(no_tensorflow, tmp_path):
    result = run_help(["-m", "stages.split", "--epochs", "3"], no_tensorflow, tmp_path)
    assert result.returncode == 2 and "unrecognized arguments: --epochs 3" in result.stderr


def test_captioning_help_lists_its_commands(no_tensorflow, tmp_path):
    result = run_help(["-m", "captioning", "--help"], no_tensorflow, tmp_path)
    assert result.returncode == 0, result.stderr
    assert {"caption", "demo", "plots-template"} <= set(SUBCOMMANDS)
    for command in SUBCOMMANDS:
        assert command in result.stdout


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_subcommand_help(command, no_tensorflow, tmp_path):
    result = run_help(["-m", "captioning", command, "--help"], no_tensorflow, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: python -m captioning {command}")
    assert "options:" in result.stdout


def test_serve_flags_default_to_the_servers_own_limits():
    """The flags' defaults were written a second time in the parser (20, 8, 40_000_000, ...): one changed
    alone would make `captioning serve` differ from `create_app()`'s defaults without a word."""
    from captioning.__main__ import _fetch_limits, _serve_limits
    from captioning.fetch import FetchLimits
    from captioning.serve_limits import ServeLimits

    args = _parser().parse_args(["serve"])
    assert _serve_limits(args, _fetch_limits(args)) == ServeLimits()
    assert _fetch_limits(args) == FetchLimits()
    changed = _serve_limits(_parser().parse_args(["serve", "--max-wait-ms", "7", "--max-body-mb", "3",
                                                   "--min-body-rate", "2"]), FetchLimits())
    assert (changed.max_wait_s, changed.max_body_bytes, changed.min_body_rate) == (0.007, 3 * 2**20, 2048)


# Each limit flag, a value given to it, and the field (of ServeLimits, or of its FetchLimits) that must then
# hold it in the server's unit and type. Written out here, not read from the parser's table, so that a wrong
# scale or a flag wired to the wrong field fails.
GIVEN_LIMITS = [
    ("--max-batch", "3", "max_batch", 3),
    ("--max-wait-ms", "7", "max_wait_s", 0.007),
    ("--max-body-mb", "3", "max_body_bytes", 3 * 2**20),
    ("--max-body-mb", "0.5", "max_body_bytes", 2**19),
    ("--max-files", "3", "max_files", 3),
    ("--max-pixels", "3000000", "max_pixels", 3_000_000),
    ("--request-timeout", "2.5", "request_timeout_s", 2.5),
    ("--min-body-rate", "2", "min_body_rate", 2048.0),
    ("--max-connections", "3", "max_connections", 3),
    ("--fetch-timeout", "4", "fetch.timeout_s", 4.0),
    ("--fetch-max-mb", "2", "fetch.max_bytes", 2 * 2**20),
    ("--fetch-max-redirects", "0", "fetch.max_redirects", 0),
]


@pytest.mark.parametrize("flag, given, field, expected", GIVEN_LIMITS)
def test_a_limit_flag_reaches_its_field_in_the_servers_unit(flag, given, field, expected):
    """`--max-wait-ms 7` is 0.007 s, `--max-body-mb 3` is 3 MiB in bytes (an int), and nothing else moves."""
    from dataclasses import asdict

    from captioning.__main__ import _fetch_limits, _serve_limits
    from captioning.serve_limits import ServeLimits

    def by_name(limits: ServeLimits) -> dict:
        fields = asdict(limits)
        fetch = fields.pop("fetch")
        return {**fields, **{f"fetch.{name}": value for name, value in fetch.items()}}

    args = _parser().parse_args(["serve", flag, given])
    limits, defaults = by_name(_serve_limits(args, _fetch_limits(args))), by_name(ServeLimits())
    assert limits[field] == expected and type(limits[field]) is type(expected), (flag, limits[field])
    assert {name: value for name, value in limits.items() if name != field} == \
        {name: value for name, value in defaults.items() if name != field}


def test_every_limit_of_the_server_has_a_flag():
    """A new ServeLimits or FetchLimits field without a serve flag could not be set from the command line."""
    from dataclasses import fields

    from captioning.fetch import FetchLimits
    from captioning.serve_limits import ServeLimits

    limits = {field.name for field in fields(ServeLimits)} - {"fetch"}
    limits |= {f"fetch.{field.name}" for field in fields(FetchLimits)} - {"fetch.allow_private"}  # a switch
    assert {field for _, _, field, _ in GIVEN_LIMITS} == limits


@pytest.mark.parametrize("command", [[], ["serve"]])
def test_usage_names_the_way_the_command_was_run(command, no_tensorflow, tmp_path):
    """The console script printed `usage: python -m captioning ...`, a command the README never tells users
    to type; each way of running it now shows itself."""
    words = " ".join(["captioning", *command])
    script = subprocess.run([str(CONSOLE_SCRIPT), *command, "--help"], cwd=tmp_path, env=no_tensorflow,
                            capture_output=True, text=True, timeout=120)
    assert script.returncode == 0, script.stderr
    assert script.stdout.startswith(f"usage: {words} [-h]")
    module = run_help(["-m", "captioning", *command, "--help"], no_tensorflow, tmp_path)
    assert module.stdout.startswith(f"usage: python -m {words} [-h]")


def test_scoring_shows_a_bar_per_metric_only_when_asked(capsys):
    candidates, references = {"a": "a dog runs", "b": "a cat"}, {"a": ["a dog runs fast"], "b": ["the cat"]}
    quiet, _ = score_captions(candidates, references, meteor=False)
    assert capsys.readouterr().err == ""
    shown, _ = score_captions(candidates, references, meteor=False, progress="scoring the model")
    err = capsys.readouterr().err
    assert "scoring the model: 100%" in err and "3/3" in err and "CIDEr" in err
    assert shown == quiet


def test_decoding_shows_a_bar_over_images_only_when_asked(capsys):
    from captioning.decode import Captioner
    from captioning.model import build_decoder
    from captioning.vocab import Vocabulary

    vocab = Vocabulary.build(["a red circle", "two blue squares"], 1)
    features = np.random.default_rng(0).normal(size=(5, 8)).astype("float32")
    captioner = Captioner(build_decoder(len(vocab), 4, 1e-6, 0.2, features.mean(0), features.var(0)), vocab)
    quiet = captioner.captions(features, **plain_decode(method="greedy", max_length=3, batch_size=2))
    assert capsys.readouterr().err == ""
    shown = captioner.captions(features, **plain_decode(method="greedy", max_length=3, batch_size=2, progress=True))
    err = capsys.readouterr().err
    assert "greedy decoding: 100%" in err and "5/5" in err
    assert shown == quiet
