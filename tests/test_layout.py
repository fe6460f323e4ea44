"""dvc.yaml and the code must not drift apart: each stage lists exactly the package code it runs, the
resume fingerprint hashes exactly train_lstm's code, and the paths in captioning/layout.py are the
paths dvc.yaml declares."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from captioning import checkpoints, layout

PROJECT = Path(__file__).resolve().parents[1]
STAGES = yaml.safe_load((PROJECT / "dvc.yaml").read_text())["stages"]


def module_file(name: str) -> Path | None:
    """captioning.x -> captioning/x.py or captioning/x/__init__.py (None for a name that is not a module)."""
    base = PROJECT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(path: Path) -> set[str]:
    """Every captioning module `path` imports, at the top or inside functions."""
    found = set()
    package = ".".join(path.relative_to(PROJECT).with_suffix("").parts[:-1])
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import inside a subpackage
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(filter(None, [*parts, base]))
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return {name for name in found if name.startswith("captioning.") and module_file(name)}


def code_closure(entry: Path) -> set[str]:
    """The package files that running `entry` can execute (the top-level __init__ is a docstring)."""
    seen, todo = set(), [entry]
    while todo:
        for name in imported_modules(todo.pop()):
            path = module_file(name)
            rel = str(path.relative_to(PROJECT))
            if rel not in seen:
                seen.add(rel)
                todo.append(path)
    return seen


def listed_code(stage: str) -> set[str]:
    return {dep for dep in STAGES[stage]["deps"] if isinstance(dep, str) and dep.startswith("captioning/")}


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_each_stage_lists_exactly_the_code_it_runs(stage):
    entry = PROJECT / "stages" / f"{stage}.py"
    assert f"stages/{stage}.py" in STAGES[stage]["deps"]
    assert listed_code(stage) == code_closure(entry)


def test_resume_fingerprint_hashes_exactly_train_lstms_code():
    hashed = {str(path.relative_to(PROJECT)) for path in checkpoints.TRAINING_CODE}
    assert hashed == listed_code("train_lstm")
    assert all(path.is_file() for path in checkpoints.TRAINING_CODE)


def declared_paths_of(stage: str) -> set[str]:
    entries = [e for kind in ("outs", "metrics", "plots") for e in STAGES[stage].get(kind, [])]
    return {next(iter(e)) if isinstance(e, dict) else e for e in entries}


def test_layout_paths_are_dvc_yaml_outputs():
    outputs = set().union(*(declared_paths_of(stage) for stage in STAGES))
    for name in ("CAPTIONS_TABLE", "IMAGE_LIST", "PARSE_REPORT", "SPLIT_DIR", "SPLIT_REPORT", "FEATURES_DIR",
                 "EXTRACT_REPORT", "MODEL_DIR", "TRAIN_METRICS", "PREDICTIONS", "EVAL_METRICS"):
        assert str(getattr(layout, name)) in outputs, name
    assert any(path.startswith(f"{layout.LIVE_DIR}/") for path in outputs)
    assert any(path.startswith(f"{layout.PLOTS_DIR}/") for path in outputs)
    for out, stage in layout.WRITTEN_BY.items():
        written = declared_paths_of(stage)
        assert str(out) in written or any(p.startswith(f"{out}/") for p in written), (out, stage)

