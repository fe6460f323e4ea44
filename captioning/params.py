"""Reading `params.yaml` with clear errors instead of KeyErrors deep inside a stage."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from captioning.errors import UserError

PARAMS_FILE = Path("params.yaml")


def load_params(path: str | Path = PARAMS_FILE) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} not found: run from the project folder (the one with dvc.yaml).")
    try:
        params = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise UserError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(params, dict):
        raise UserError(f"{path} must be a mapping of sections (data, split, features, train, ...).")
    return params


def section(params: dict[str, Any], name: str, required: tuple[str, ...] = ()) -> dict[str, Any]:
    """Return one section, failing with the missing key's full name (e.g. `train.epochs`)."""
    values = params.get(name)
    if not isinstance(values, dict):
        raise UserError(f"params.yaml has no `{name}:` section; copy it from the project's params.yaml.")
    missing = [key for key in required if key not in values]
    if missing:
        names = ", ".join(f"{name}.{key}" for key in missing)
        raise UserError(f"params.yaml is missing {names}; copy it from the project's params.yaml.")
    return values


def choice(value: Any, allowed: tuple[str, ...], key: str) -> str:
    if value not in allowed:
        raise UserError(f"params.yaml: {key} is {value!r}; use one of: {', '.join(allowed)}.")
    return value


def positive(value: Any, key: str, kind: type = int) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise UserError(f"params.yaml: {key} must be a positive number, got {value!r}.")
    return kind(value)
