"""Helpers the tests share (fixtures stay in conftest.py; the tiny project is captioning.tiny_project)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from captioning.tiny_project import PROJECT, tool_env


def stages_env(**extra: str) -> dict:
    """tool_env() where `python -m stages.x` works from any folder: the stages are entry points in the
    project root, not part of the installed package."""
    env = tool_env()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def stages_run(output: str) -> list[str]:
    """The stages a `dvc repro` ran, in order, from its output."""
    return [line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")]


def copy_project(source: Path, dest: Path) -> Path:
    """A copy of a finished project (DVC's cache links kept as links), so the source stays untouched."""
    shutil.copytree(source, dest, symlinks=True)
    return dest
