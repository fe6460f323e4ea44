"""The trained model bundle as the caption command and the server see it, before TensorFlow loads:
is it complete, and which decode settings go with it.

Both entry points call these same functions, so a model the caption command refuses is refused by
the server with the same line, and both decode with the same settings (no train/serve skew).
"""
from __future__ import annotations

import zipfile
from pathlib import Path

from captioning import files, layout
from captioning.errors import UserError, clipped
from captioning.params import DECODE_METHODS, SCHEMA, check_values

BUNDLE_FILES = (layout.MODEL_FILE, layout.VOCAB_FILE, layout.BACKBONE_SPEC)
MAX_BEAM_SIZE = 16  # a per-request override above this would let one request take the server's time


def check_bundle(model_dir: Path) -> None:
    """Stop with one line when the model is missing or incomplete."""
    model_dir = Path(model_dir)
    if not (model_dir / layout.MODEL_FILE).exists():
        raise UserError(f"no trained model in {model_dir}: run `dvc repro` first (or pass --model-dir).")
    missing = [name for name in BUNDLE_FILES if not (model_dir / name).exists()]
    if missing:
        raise UserError(f"the model in {model_dir} is incomplete (no {', '.join(missing)}): "
                        "rerun `dvc repro` (or pass --model-dir).")
    for name, check in _READABLE.items():
        path = model_dir / name
        if not path.exists():
            continue  # the rerank files are optional (older models); decoding says when one is needed
        try:
            check(path)
        except (OSError, ValueError, TypeError, KeyError, zipfile.BadZipFile) as err:
            raise UserError(f"the model in {model_dir} is damaged: {name} cannot be read ({type(err).__name__}: "
                            f"{err}); copy the whole folder again or rerun `dvc repro` (or pass --model-dir)."
                            ) from None


# A bundle copied in part (an interrupted copy, a full disk) has every file but not every file's contents:
# each one is opened as loading will, here, so the user gets one line naming it instead of a JSON or zip
# traceback from deep inside loading. model.keras needs no check: decode_settings compares its sha256.
def _backbone_json(path: Path) -> None:
    from captioning.feature_files import BackboneSpec  # pandas: only once a model is being loaded

    BackboneSpec(**files.read_json(path))  # not an object, or not a spec's keys: TypeError


def _vocab_json(path: Path) -> None:
    words = files.read_json(path)["words"]
    if not isinstance(words, list) or not all(isinstance(word, str) for word in words):
        raise ValueError("'words' is not a list of words")


def _ngram_json(path: Path) -> None:
    stored = files.read_json(path)
    if not isinstance(stored["document_frequency"], dict) or not isinstance(stored["n_documents"], int):
        raise ValueError("not the n-gram statistics train_lstm writes")


def _neighbours_npz(path: Path) -> None:
    # The zip's directory only (it is at the end, so a cut-off file fails here); the arrays, up to a
    # few hundred MB at COCO scale, are read once, by the loader.
    with zipfile.ZipFile(path) as archive:
        missing = {"features.npy", "caption_counts.npy", "captions.npy"} - set(archive.namelist())
    if missing:
        raise ValueError(f"it lacks {', '.join(sorted(missing))}")


_READABLE = {layout.BACKBONE_SPEC: _backbone_json, layout.VOCAB_FILE: _vocab_json,
             layout.NGRAM_STATISTICS: _ngram_json, layout.NEIGHBOUR_INDEX: _neighbours_npz}


def save_decode_settings(path: Path, model_dir: Path, settings: dict) -> None:
    """What `evaluate` writes: the decode settings it captioned the test images with, and which model
    (by sha256) they belong to, so the caption command and the server decode exactly as it did."""
    files.write_json(path, {"model_sha256": files.sha256(Path(model_dir) / layout.MODEL_FILE), "settings": settings})


def decode_settings(model_dir: Path, path: Path = layout.DECODE_SETTINGS) -> dict:
    """The decode settings `evaluate` used for this model (see save_decode_settings)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} not found: `evaluate` writes the decode settings it used there. Run `dvc repro` "
                        "(or pass --decode-settings with the file that belongs to this model).")
    try:
        saved = files.read_json(path)
    except (OSError, ValueError) as err:
        raise UserError(f"{path} is not readable decode settings ({err}). Run `dvc repro` to write them again, "
                        "or pass --decode-settings with the file `evaluate` wrote for this model.") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("settings"), dict):
        raise UserError(f"{path} is not a decode settings file (it has no 'settings'). Pass --decode-settings "
                        "with the file `evaluate` wrote for this model (data/decode.json).")
    if saved.get("model_sha256") != files.sha256(Path(model_dir) / layout.MODEL_FILE):
        raise UserError(f"{path} belongs to another model than {model_dir} (the model changed after evaluate ran): "
                        "run `dvc repro`, or pass the --decode-settings file of this model.")
    return _checked_settings(saved["settings"], path)


def _checked_settings(settings: dict, path: Path) -> dict:
    """The settings through params.yaml's own `decode` rules. A hand-edited file (beam_size: "5", a key
    deleted, method: beams) otherwise failed deep in TensorFlow with a traceback, or decoded otherwise
    without a word (an unknown method was taken for beam search, max_length 0 gave empty captions)."""
    # `neighbours` came after decode.json did: settings saved before it have none, and need none.
    missing = [key for key in SCHEMA["decode"] if key not in settings and key != "neighbours"]
    advice = "Pass --decode-settings with the file `evaluate` wrote for this model, or run `dvc repro` to write it."
    if missing:
        raise UserError(f"{path} has no settings.{', settings.'.join(missing)}. {advice}")
    present = tuple(key for key in SCHEMA["decode"] if key in settings)
    try:
        return {**settings, **check_values(settings, "decode", present, source=path, label="settings")}
    except UserError as err:
        raise UserError(f"{err} {advice}") from None


def with_overrides(settings: dict, method: str | None = None, beam_size: int | None = None) -> dict:
    """`settings` with a caller's method / beam width, checked (UserError names the bad value).
    A beam width of 1 means greedy, as `--beam 1` always has."""
    settings = dict(settings)
    if method is not None:
        if method not in DECODE_METHODS:
            raise UserError(f"method must be one of {', '.join(DECODE_METHODS)}, got {clipped(repr(method))}")
        settings["method"] = method
    if beam_size is not None:
        if isinstance(beam_size, bool) or not isinstance(beam_size, int) or not 1 <= beam_size <= MAX_BEAM_SIZE:
            raise UserError(f"beam size must be a whole number from 1 to {MAX_BEAM_SIZE}, "
                            f"got {clipped(repr(beam_size))}")
        settings["beam_size"] = beam_size
        if method is None:
            settings["method"] = "greedy" if beam_size == 1 else "beam"
    return settings
