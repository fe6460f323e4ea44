"""The decode settings evaluate saves with its model are the ones the caption command and server use."""
from __future__ import annotations

import pytest
import yaml

from captioning.bundle import decode_settings, save_decode_settings, with_overrides
from captioning.errors import UserError
from captioning.tiny_project import PROJECT


@pytest.fixture
def model_dir(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.keras").write_bytes(b"a trained model")
    return folder


def test_settings_come_back_for_their_model(model_dir, tmp_path):
    settings = yaml.safe_load((PROJECT / "params.yaml").read_text())["decode"]
    save_decode_settings(tmp_path / "decode.json", model_dir, settings)
    assert decode_settings(model_dir, tmp_path / "decode.json") == settings


def test_settings_of_another_model_are_refused(model_dir, tmp_path):
    save_decode_settings(tmp_path / "decode.json", model_dir, {"method": "greedy"})
    (model_dir / "model.keras").write_bytes(b"retrained since")
    with pytest.raises(UserError, match="belongs to another model"):
        decode_settings(model_dir, tmp_path / "decode.json")


def test_missing_settings_say_how_to_get_them(model_dir, tmp_path):
    with pytest.raises(UserError, match="evaluate` writes the decode settings"):
        decode_settings(model_dir, tmp_path / "nothing.json")


def test_overrides_are_checked():
    assert with_overrides({"method": "beam", "beam_size": 3}, beam_size=1) == {"method": "greedy", "beam_size": 1}
    with pytest.raises(UserError, match="beam size"):
        with_overrides({"method": "beam", "beam_size": 3}, beam_size=0)
