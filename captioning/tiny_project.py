"""A tiny copy of this project as its own git + DVC repo, for the tests and the benchmarks.

It copies the pipeline from the source checkout this package was installed from (editable, as
scripts/setup.sh does), with params small enough for CI on 2 cores. It needs git and DVC but no test
tools, so `bench/` can use it right after README command 1.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

PROJECT = Path(__file__).resolve().parents[1]
PROJECT_FILES = ("dvc.yaml", "params.yaml", "stages", "captioning", ".dvcignore")

# Small enough for CI on 2 cores: 64 px images, 16-unit LSTMs, 2 epochs.
TINY_PARAMS = {
    "demo": {"n_images": 60, "image_size": 64},
    "features": {"image_size": 64, "batch_size": 16},
    "train": {"epochs": 2, "batch_size": 16, "units": 16, "min_count": 1},
    "decode": {"batch_size": 64},
    "plot": {"n_samples": 2, "grid_size": 4},
}


def readme_real_photos() -> tuple[dict, dict]:
    """The README's "Real photos" settings, as its params block says them (without `data`: each caller
    brings its own paths) and as its `dvc exp run -S key=value` line does ({dotted key: value}). The real-photo
    CI test runs them and the extraction benchmark times their image size, so the README is their one source."""
    section = (PROJECT / "README.md").read_text(encoding="utf-8").split("\n## Real photos\n", 1)[1]
    block = yaml.safe_load(section.split("```yaml\n", 1)[1].split("```", 1)[0])
    block.pop("data")
    line = section.split("`dvc exp run ", 1)[1].split("`", 1)[0]
    overrides = {key: yaml.safe_load(value) for key, value in re.findall(r"-S ([\w.]+)=(\S+)", line)}
    return block, overrides


def tool_env() -> dict:
    """The environment with this interpreter's bin folder first, so `dvc` and `python` are the venv's."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def run(args, cwd, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run a command with the venv's tools; with `check`, a failure raises with the tail of its output.

    AssertionError, so that in a test it reads as the failed expectation it is."""
    result = subprocess.run(args, cwd=cwd, env=tool_env(), capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} failed ({result.returncode}):\n"
                             f"--- stdout\n{result.stdout[-4000:]}\n--- stderr\n{result.stderr[-4000:]}")
    return result


def merge(base: dict, changes: dict) -> dict:
    """`base` with `changes` laid over it, section by section (nested dicts merge, other values replace)."""
    out = dict(base)
    for key, value in changes.items():
        out[key] = merge(base.get(key, {}), value) if isinstance(value, dict) else value
    return out


def make_project(dest: Path, params: dict | None = None, demo: bool = True) -> Path:
    """Copy the pipeline into `dest` as its own git + DVC repo with tiny params; generate the demo."""
    if not (PROJECT / "dvc.yaml").exists():
        raise RuntimeError(f"{PROJECT} is not the project's source checkout: install it with `pip install -e .`")
    dest.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        source = PROJECT / name
        if source.is_dir():
            shutil.copytree(source, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, dest / name)
    values = merge(yaml.safe_load((PROJECT / "params.yaml").read_text()), TINY_PARAMS)
    values = merge(values, params or {})
    (dest / "params.yaml").write_text(yaml.safe_dump(values, sort_keys=False))
    (dest / ".gitignore").write_text((PROJECT / ".gitignore").read_text())
    run(["git", "init", "-q"], dest)
    run(["git", "config", "user.email", "tests@example.com"], dest)
    run(["git", "config", "user.name", "tests"], dest)
    run(["dvc", "init", "-q"], dest)
    run(["dvc", "config", "core.analytics", "false"], dest)
    if demo:
        run([sys.executable, "-m", "captioning", "demo"], dest)
    run(["git", "add", "-A"], dest)
    run(["git", "commit", "-qm", "tiny project"], dest)
    return dest


def set_params(project: Path, changes: dict) -> None:
    """Lay `changes` over the project's params.yaml."""
    path = project / "params.yaml"
    path.write_text(yaml.safe_dump(merge(yaml.safe_load(path.read_text()), changes), sort_keys=False))
