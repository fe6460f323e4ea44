"""The shared params checks (captioning.params.SCHEMA), in-process: fast and without TensorFlow."""
from __future__ import annotations

import pytest
import yaml

from captioning.errors import UserError
from captioning.params import SCHEMA, read_params
from captioning.tiny_project import PROJECT


def write(tmp_path, params: dict):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def test_project_params_pass_every_rule(monkeypatch):
    monkeypatch.chdir(PROJECT)  # data paths and a weights file path are relative to the project
    checked = read_params(*SCHEMA, path=PROJECT / "params.yaml")
    raw = yaml.safe_load((PROJECT / "params.yaml").read_text())
    assert set(checked) == set(SCHEMA)
    for section, rules in SCHEMA.items():
        assert set(rules) <= set(raw[section]), section  # every rule has its knob in params.yaml
        assert checked[section] == {key: raw[section][key] for key in rules}


def test_only_the_requested_keys_are_checked_and_returned(tmp_path):
    path = write(tmp_path, {"data": {"images": "pics", "captions": 5}, "train": {"epochs": "many"}})
    assert read_params("data.images", path=path) == {"data": {"images": "pics"}}


@pytest.mark.parametrize("key, given, expected", [
    ("learning_rate", "1e-3", 0.001),  # PyYAML reads 1e-3 (no dot) as a string
    ("epochs", 4.0, 4),
    ("l1", 0, 0.0),
    ("dropout", 0, 0.0),
])
def test_values_are_converted(tmp_path, key, given, expected):
    params = yaml.safe_load((PROJECT / "params.yaml").read_text())
    params["train"][key] = given
    value = read_params("train", path=write(tmp_path, params))["train"][key]
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize("key, given", [
    ("epochs", True), ("epochs", 2.5), ("epochs", "3"), ("seed", -1), ("seed", 2**32), ("units", None),
    # float("nan") is written as YAML's .nan, which PyYAML reads back as a float NaN: the quoted string ".nan"
    # never reached the finiteness check (float(".nan") fails first), so accepting NaN went unnoticed.
    ("learning_rate", 0), ("learning_rate", float("nan")), ("learning_rate", "inf"), ("dropout", 1.0),
    ("l1", -1e-6),
    ("optimizer", "Adam"), ("clipnorm", [1.0]), ("strategy", "horovod"), ("l1", 10 ** 400),
])
def test_bad_values_name_key_and_value(tmp_path, key, given):
    params = yaml.safe_load((PROJECT / "params.yaml").read_text())
    params["train"][key] = given
    with pytest.raises(UserError, match=rf"^params\.yaml: train\.{key} is .*; use .*\.$"):
        read_params("train", path=write(tmp_path, params))


def test_the_last_ensemble_member_needs_a_valid_seed_too(tmp_path):
    from captioning.params import MAX_SEED, read_section

    params = yaml.safe_load((PROJECT / "params.yaml").read_text())
    params["train"].update(seed=MAX_SEED, ensemble=2)
    with pytest.raises(UserError, match=f"last decoder seed {MAX_SEED + 1}, above {MAX_SEED}"):
        read_section("train", path=write(tmp_path, params))


def test_invalid_yaml(tmp_path):
    (tmp_path / "params.yaml").write_text("train:\n  epochs: [1,\n")
    with pytest.raises(UserError, match="is not valid YAML"):
        read_params("train", path=tmp_path / "params.yaml")


@pytest.mark.parametrize("encoding", ["cp1252", "utf-16"])
def test_params_not_in_utf8_are_named_not_a_traceback(tmp_path, encoding):
    """Saved by an editor in its legacy encoding, with a non-ASCII path: a stage, or `python -m captioning demo`
    run directly (DVC refuses such a file itself), says which file and what to do."""
    text = (PROJECT / "params.yaml").read_text().replace("data/demo/images", "data/démo/images")
    (tmp_path / "params.yaml").write_bytes(text.encode(encoding))
    with pytest.raises(UserError, match=r"params\.yaml is not UTF-8 text \(byte 0x[0-9a-f]{2} at offset \d+\): "
                                        r"save it as UTF-8\.$"):
        read_params("data.images", path=tmp_path / "params.yaml")


def test_a_misspelt_key_is_named_with_the_likely_one(tmp_path, monkeypatch):
    monkeypatch.chdir(PROJECT)
    params = yaml.safe_load((PROJECT / "params.yaml").read_text())
    params["train"]["epoch"] = 3  # meant train.epochs: silently ignored, the default would run
    with pytest.raises(UserError, match=r"train\.epoch \(did you mean train\.epochs\?\)"):
        read_params("train", path=write(tmp_path, params))
    with pytest.raises(UserError, match=r"train\.epoch"):  # also when a stage reads only one key of it
        read_params("train.seed", path=write(tmp_path, params))
    assert read_params("decode", path=write(tmp_path, params))["decode"]  # other sections are unaffected


@pytest.mark.parametrize("section, right, wrong", [
    ("train", "epochs", "epoch"), ("data", "split_dir", "split_directory"), ("decode", "beam_size", "beam_width")])
def test_a_misspelling_that_replaced_its_key_is_named_with_the_likely_one(tmp_path, section, right, wrong):
    """Renamed rather than added, the misspelt key still gets the hint, not only "missing train.epochs"."""
    params = yaml.safe_load((PROJECT / "params.yaml").read_text())
    params[section][wrong] = params[section].pop(right)
    path = write(tmp_path, params)
    hint = rf"{section}\.{wrong} \(did you mean {section}\.{right}\?\)"
    with pytest.raises(UserError, match=hint):
        read_params(section, path=path)
    with pytest.raises(UserError, match=hint):  # a stage that reads another key of the section meets it too
        read_params(f"{section}.{next(key for key in SCHEMA[section] if key != right)}", path=path)


def test_a_missing_key_is_named(tmp_path):
    params = yaml.safe_load((PROJECT / "params.yaml").read_text())
    del params["train"]["epochs"]
    with pytest.raises(UserError, match=r"^params\.yaml is missing train\.epochs; add it"):
        read_params("train", path=write(tmp_path, params))


def test_split_fractions_must_leave_a_test_split(tmp_path):
    from captioning.params import read_section

    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"split": {"seed": 1, "train_fraction": 0.8,
                                                                    "dev_fraction": 0.3}}))
    with pytest.raises(UserError, match="must be below 1"):
        read_section("split", path=tmp_path / "params.yaml")


def test_each_section_is_a_frozen_dataclass_of_its_knobs():
    from dataclasses import FrozenInstanceError

    from captioning.params import read_section

    config = read_section("train", path=PROJECT / "params.yaml")
    assert config.epochs == yaml.safe_load((PROJECT / "params.yaml").read_text())["train"]["epochs"]
    with pytest.raises(FrozenInstanceError):
        config.epochs = 1


@pytest.mark.parametrize("beside", [True, False])
def test_a_misspelt_section_is_named_with_its_line_and_the_likely_one(tmp_path, beside):
    """`trian:` beside `train:` (or instead of it) was ignored while train's defaults ran: whatever section
    a stage reads, the loader stops with the misspelt section, its line and the likely intended name."""
    text = (PROJECT / "params.yaml").read_text()
    text = text + "trian:\n  epochs: 3\n" if beside else text.replace("\ntrain:\n", "\ntrian:\n")
    (tmp_path / "params.yaml").write_text(text)
    line = text.splitlines().index("trian:") + 1
    with pytest.raises(UserError, match=rf"params\.yaml has unknown sections: trian \(did you mean train\?\) "
                                        rf"on line {line}; its sections are data, demo, "):
        read_params("decode", path=tmp_path / "params.yaml")


def test_a_misspelt_key_is_named_with_its_line(tmp_path):
    text = (PROJECT / "params.yaml").read_text().replace("\n  beam_size:", "\n  beam_width:")
    (tmp_path / "params.yaml").write_text(text)
    line = next(number for number, row in enumerate(text.splitlines(), 1) if row.startswith("  beam_width:"))
    with pytest.raises(UserError, match=rf"decode\.beam_width \(did you mean decode\.beam_size\?\) on line {line};"):
        read_params("decode", path=tmp_path / "params.yaml")
