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



def test_image_names_survive_the_line_files_between_stages(tmp_path, monkeypatch):
    """parse_pickle keeps an image name holding U+2028, U+2029 or U+0085 (no control character, no path);
    data/images.txt and data/split/*.txt must give it back whole to extraction, training and evaluation,
    not cut into names of no image (str.splitlines() splits on those too), which dropped its captions."""
    from captioning import files
    from captioning.captions import load_captions

    monkeypatch.chdir(tmp_path)
    names = ["plain.jpg", "my photo.jpg", "sunset\u2028beach.jpg", "para\u2029graph.jpg", "caf\x85.jpg"]
    (tmp_path / "images").mkdir()
    for name in names:
        (tmp_path / "images" / name).write_bytes(b"")  # parse_pickle compares names only, opens no image
    (tmp_path / "captions.txt").write_text(
        "".join(f"{name}#{k}\ta dog runs on the beach .\n" for name in names for k in range(5)), encoding="utf-8")
    table, _ = load_captions("captions.txt", "images", allow_pandas_pickle=False, max_skipped_fraction=0.5)
    kept = sorted(table["image"].unique())
    assert kept == sorted(names)

    files.write_lines(layout.IMAGE_LIST, kept)  # as parse_pickle and split write them
    for split in layout.SPLITS:
        files.write_lines(layout.split_file(split), kept)
    for split in layout.SPLITS:
        assert layout.read_split(split) == kept, split
    assert layout.read_image_list() == kept  # what extract_resnet_features reads


def named_params() -> list[str]:
    """The params the stages list by section or key (not split's whole-file entry, which reruns only split)."""
    return [param for stage in STAGES.values() for param in stage.get("params", []) if isinstance(param, str)]


def params_read_by(stage: str) -> set[str]:
    """The sections and keys stages/<stage>.py asks read_params / read_section for."""
    calls = [node for node in ast.walk(ast.parse((PROJECT / "stages" / f"{stage}.py").read_text()))
             if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("read_params", "read_section")]
    return {arg.value for call in calls for arg in call.args if isinstance(arg, ast.Constant)}


def test_every_section_a_stage_reads_is_listed_whole_by_some_stage():
    """Stages refuse unknown keys in a section they read, but only when they run: a key added to a section
    that every stage lists key by key (`data.split_directory:` for `data.split_dir:`) would rerun nothing
    but for split's listing of the whole file, and reran only split, not the other readers of the section."""
    read = {param.split(".")[0] for param in named_params()}
    assert read - {"data"} <= set(named_params())  # data: split reads it, and lists the whole file


def test_split_lists_the_whole_params_file():
    """A section no stage names (`trian:` beside `train:`) changes no listed param: only a stage that lists
    the whole file reruns on it, and split, the cheapest, stops there on the misspelling."""
    assert {"params.yaml": None} in STAGES["split"]["params"]


def test_every_knob_of_params_yaml_is_a_param_of_some_stage():
    """A knob that no stage lists is invisible to DVC: `dvc exp run -S demo.n_images=500` reran nothing while
    the demo params were read only by `python -m captioning demo`, and the experiment measured the old data."""
    defaults = yaml.safe_load((PROJECT / "params.yaml").read_text())
    listed = set(named_params()) | params_read_by("split")  # split lists the whole file
    assert params_read_by("split") == {"data.split_dir", "split"}  # the parsing above finds them
    unlisted = [f"{section}.{key}" for section, knobs in defaults.items() for key in knobs
                if section not in listed and f"{section}.{key}" not in listed]
    assert not unlisted, f"params no stage of dvc.yaml lists: {unlisted}"


@pytest.mark.parametrize("added, named", [
    ({"data": {"split_directory": "elsewhere"}}, "data.split_directory (did you mean data.split_dir?)"),
    ({"trian": {"epochs": 3}}, "trian (did you mean train?)"),  # a section no stage lists: it reran nothing
])
def test_a_misspelling_added_by_hand_reruns_a_stage_that_names_it(tmp_path, added, named):
    """In a tiny project: after parse_pickle and split ran, a misspelt key or section makes `dvc status` report
    a change, and `dvc repro` stops with it, its line and the likely intended name instead of skipping it."""
    from captioning.tiny_project import make_project, run, set_params

    project = make_project(tmp_path / "project")
    run(["dvc", "repro", "split"], project)  # parse_pickle and split only: no TensorFlow
    set_params(project, added)
    status = run(["dvc", "status", "split"], project).stdout
    assert "split:" in status and ("modified:" in status or "new:" in status), status
    result = run(["dvc", "repro", "split"], project, check=False)
    assert result.returncode != 0
    misspelt = named.split()[0].split(".")[-1]
    line = next(number for number, text in enumerate((project / "params.yaml").read_text().splitlines(), 1)
                if text.strip().startswith(f"{misspelt}:"))
    assert f"{named} on line {line}" in result.stderr
    assert "Traceback" not in result.stderr


def test_features_of_a_weights_file_replaced_at_the_same_path_are_neither_trained_on_nor_scored(tmp_path):
    """DVC cannot rerun extraction when `features.weights` names a file whose bytes changed (a keyword or a
    path: dvc.yaml cannot list it as a dependency only when it is a path), so `dvc exp run -S train.epochs=3`
    trained and scored features of the old weights under the new file's name. The readers of the features
    (train_lstm and evaluate open them through FeatureStore) compare the file with the sha256 recorded at
    extraction and say what to run; a file that is gone (features pulled without it) is no reason to stop."""
    import numpy as np
    import pandas as pd

    from captioning import files
    from captioning.errors import UserError
    from captioning.feature_files import BackboneSpec, FeatureStore

    weights = tmp_path / "mine.weights.h5"
    weights.write_bytes(b"the weights the features were extracted with")
    folder = tmp_path / "features"
    folder.mkdir()
    np.save(folder / "features.npy", np.zeros((2, 4), np.float32))
    pd.DataFrame({"image": ["a.jpg", "b.jpg"], "row": [0, 1]}).to_parquet(folder / "index.parquet")
    spec = BackboneSpec(str(weights), 0, 64, "float32", weights_sha256=files.sha256(weights))
    files.write_json(folder / "backbone.json", spec.to_json())
    assert FeatureStore(folder).spec == spec  # unchanged: fine

    weights.write_bytes(b"other weights, copied over the same path")
    with pytest.raises(UserError, match="changed since the features were extracted") as refused:
        FeatureStore(folder)
    assert "dvc repro -f -s extract_resnet_features" in str(refused.value) and str(weights) in str(refused.value)

    weights.unlink()
    assert FeatureStore(folder).spec == spec


def test_split_files_edited_in_place_stop_the_readers_of_the_split(tmp_path, monkeypatch):
    """dvc.yaml cannot list the files of data.split_dir (it may be null), so after one was edited in place
    `dvc repro` reran nothing and training and scoring used the old lists. The split report records each
    file's sha256, and reading a split compares them, naming the file and what to run."""
    from captioning import files
    from captioning.errors import UserError
    from captioning.split import OFFICIAL_FILES, official_split

    monkeypatch.chdir(tmp_path)
    (tmp_path / "official").mkdir()
    for number, filename in enumerate(OFFICIAL_FILES.values()):
        (tmp_path / "official" / filename).write_text(f"{number}.jpg\n")
    splits, report = official_split("official", ["0.jpg", "1.jpg", "2.jpg"])
    for name in layout.SPLITS:  # as the split stage writes them
        files.write_lines(layout.split_file(name), splits[name])
    files.write_json(layout.SPLIT_REPORT, report)
    assert layout.read_split("test") == ["2.jpg"]  # unchanged: read as written

    edited = tmp_path / "official" / OFFICIAL_FILES["test"]
    edited.write_text("2.jpg\n3.jpg\n")
    with pytest.raises(UserError, match=r"changed since the split stage read it") as refused:
        layout.read_split("train")
    assert str(Path("official") / OFFICIAL_FILES["test"]) in str(refused.value)
    assert "dvc repro -f -s split" in str(refused.value)

    edited.unlink()  # gone, as on a machine that pulled the split without the files: read as written
    assert layout.read_split("test") == ["2.jpg"]
