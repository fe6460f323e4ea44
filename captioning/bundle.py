"""The trained model bundle as the caption command and the server see it, before TensorFlow loads:
is it complete, and which decode settings go with it.

Both entry points call these same functions, so a model the caption command refuses is refused by
the server with the same line, and both decode with the same settings (no train/serve skew).
"""
from __future__ import annotations

from pathlib import Path

from captioning.errors import UserError
from captioning.params import DECODE_METHODS, PARAMS_FILE, read_params

BUNDLE_FILES = ("model.keras", "vocab.json", "backbone.json")
DEFAULT_DECODE = {"method": "beam", "beam_size": 3, "length_penalty": 0.0, "rerank": "consensus",
                  "no_repeat_ngram": 3, "max_length": 20}  # as params.yaml
MAX_BEAM_SIZE = 16  # a per-request override above this would let one request take the server's time


def check_bundle(model_dir: Path) -> None:
    """Stop with one line when the model is missing or incomplete."""
    model_dir = Path(model_dir)
    if not (model_dir / "model.keras").exists():
        raise UserError(f"no trained model in {model_dir}: run `dvc repro` first (or pass --model-dir).")
    missing = [name for name in BUNDLE_FILES if not (model_dir / name).exists()]
    if missing:
        raise UserError(f"the model in {model_dir} is incomplete (no {', '.join(missing)}): "
                        "rerun `dvc repro` (or pass --model-dir).")


def decode_settings(model_dir: Path) -> dict:
    """The decode settings `evaluate` used for this model: decode.* from params.yaml (checked like the
    evaluate stage's), or the defaults outside a project. The one place that decides it."""
    settings = dict(DEFAULT_DECODE)
    if PARAMS_FILE.exists():
        settings = read_params(*(f"decode.{key}" for key in DEFAULT_DECODE))["decode"]
    return settings


def with_overrides(settings: dict, method: str | None = None, beam_size: int | None = None) -> dict:
    """`settings` with a caller's method / beam width, checked (UserError names the bad value).
    A beam width of 1 means greedy, as `--beam 1` always has."""
    settings = dict(settings)
    if method is not None:
        if method not in DECODE_METHODS:
            raise UserError(f"method must be one of {', '.join(DECODE_METHODS)}, got {method!r}")
        settings["method"] = method
    if beam_size is not None:
        if isinstance(beam_size, bool) or not isinstance(beam_size, int) or not 1 <= beam_size <= MAX_BEAM_SIZE:
            raise UserError(f"beam size must be a whole number from 1 to {MAX_BEAM_SIZE}, got {beam_size!r}")
        settings["beam_size"] = beam_size
        if method is None:
            settings["method"] = "greedy" if beam_size == 1 else "beam"
    return settings
