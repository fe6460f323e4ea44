"""The real pipeline (`dvc repro`) on real Flickr8k files from $FLICKR8K_DIR: pickles of the real token
file, the official split files, the 809 real photos, EfficientNet-Lite0 with its ImageNet weights and
the README's "Real photos" settings: the product as a user with real photos runs it offline.

Facts checked (shared/flickr8k/SOURCES.md): 40460 lines, 8092 image names including the bogus
`2258277193_586949ec62.jpg.1` (lines 6731-6735, no photo), 809 photos found, and every caption of a
missing photo excluded and counted. Of the 809 photos, 763 are in the official train list, 37 in dev,
none in test and 9 in no list, so `evaluate` must stop with an explanation; with a seeded split instead
the whole pipeline runs on the real photos, and the model must caption them better than both baselines.
"""
from __future__ import annotations

import json
import pickle
import sys

import pandas as pd
import pytest
import yaml
from helpers import stages_run

from captioning.tiny_project import PROJECT, make_project, readme_real_photos, run, set_params

LINES, NAMES, PHOTOS = 40460, 8092, 809
BOGUS = "2258277193_586949ec62.jpg.1"


def by_image(lines):
    grouped = {}
    for line in lines:
        key, caption = line.split("\t", 1)
        grouped.setdefault(key.split("#")[0], []).append(caption)
    return grouped


SHAPES = {  # file name -> object pickled from the token file's lines
    "text.pkl": lambda lines: "\n".join(lines) + "\n",
    "bytes.pkl": lambda lines: ("\n".join(lines) + "\n").encode(),
    "lines.pkl": lambda lines: lines,
    "dict.pkl": by_image,
}
FORMATS = {"text.pkl": "pickle:str", "bytes.pkl": "pickle:bytes", "lines.pkl": "pickle:list", "dict.pkl": "pickle:dict"}


DEFAULTS = yaml.safe_load((PROJECT / "params.yaml").read_text())
# The README's "Real photos" settings, read from the README (288-pixel photos, a wider decoder with more
# dropout, the best epoch kept, early stop, self-critical fine-tuning, no word pair twice in a caption, the
# beam the nearest training photos' captions agree with), shortened for CI: one decoder instead of three,
# at most 8 epochs instead of 15 (the dev loss levels off around epochs 5-7 on these photos, and the best
# epoch is kept) and 2 instead of 6 self-critical epochs.
README_BLOCK, README_OVERRIDES = readme_real_photos()
CI_SHORTER = {"ensemble": 1, "epochs": 8, "scst_epochs": 2}
REAL_TRAIN = {**DEFAULTS["train"], **README_BLOCK["train"], **CI_SHORTER}
REAL_PHOTOS = {
    "features": {**DEFAULTS["features"], **README_BLOCK["features"]},
    # the official split cannot be evaluated: one epoch will do
    "train": {**REAL_TRAIN, "epochs": 1, "scst_epochs": 0},
    "decode": {**DEFAULTS["decode"], **README_BLOCK["decode"]},
}


def test_readme_real_photos_settings_are_one_set_of_real_knobs():
    """The block and the `-S` line say the same, and every key they name is a knob of params.yaml."""
    flat = {f"{section}.{key}": value for section, knobs in README_BLOCK.items() for key, value in knobs.items()}
    assert flat == README_OVERRIDES
    assert all(key in DEFAULTS[section] for section, knobs in README_BLOCK.items() for key in knobs)
    assert (README_BLOCK["features"]["backbone"], README_BLOCK["features"]["weights"]) == ("efficientnet_lite0",
                                                                                        "imagenet")  # offline
    assert set(CI_SHORTER) <= set(README_BLOCK["train"])


@pytest.fixture(scope="module")
def real_project(flickr8k, tmp_path_factory):
    project = make_project(tmp_path_factory.mktemp("real") / "project", demo=False, params={
        "data": {"captions": "data/real/lines.pkl", "images": str(flickr8k / "Images"),
                 "split_dir": str(flickr8k)}, **REAL_PHOTOS,
    })
    lines = (flickr8k / "Flickr8k.token.txt").read_text(encoding="utf-8").splitlines()
    (project / "data/real").mkdir(parents=True)
    for name, shape in SHAPES.items():
        (project / "data/real" / name).write_bytes(pickle.dumps(shape(lines), protocol=4))
    return project


def parse_report(project) -> dict:
    return json.loads((project / "data/reports/parse_report.json").read_text())


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_parse_stage_on_every_pickle_shape(real_project, name):
    set_params(real_project, {"data": {"captions": f"data/real/{name}"}})
    run(["dvc", "repro", "parse_pickle"], real_project)
    report = parse_report(real_project)
    # The cases share one project and every shape gives the same counts: without this, a case could pass on
    # the report the previous case left (a parse_pickle that did not rerun for the new data.captions).
    assert (report["source"], report["format"]) == (f"data/real/{name}", FORMATS[name])
    assert report["lines_read"] == LINES and report["image_names"] == NAMES
    assert report["images_found"] == PHOTOS and report["rows_kept"] == PHOTOS * 5
    assert report["skipped_count"] == 0
    missing = report["missing_images"]
    assert missing["captions_excluded"] == LINES - PHOTOS * 5 and missing["count"] == NAMES - PHOTOS
    assert len(missing["images"][BOGUS]) == 5
    if name in ("text.pkl", "bytes.pkl"):  # 1-based lines of the text
        assert missing["images"][BOGUS] == [f"line {n}" for n in range(6731, 6736)]
    elif name == "lines.pkl":  # 0-based positions in the list, as Python indexes it
        assert missing["images"][BOGUS] == [f"item {n}" for n in range(6730, 6735)]
    table = pd.read_parquet(real_project / "data/captions.parquet")
    assert len(table) == PHOTOS * 5 and table["image"].nunique() == PHOTOS


@pytest.mark.slow
def test_full_pipeline_on_real_photos(real_project):
    set_params(real_project, {"data": {"captions": "data/real/lines.pkl"}})
    result = run(["dvc", "repro"], real_project, check=False)
    # Official split: no test photo among the 809, so evaluate stops with a clear message.
    assert result.returncode != 0
    assert "the official test list names none of your photos" in result.stderr and "Traceback" not in result.stderr
    split = json.loads((real_project / "data/reports/split_report.json").read_text())
    assert (split["train"]["available"], split["dev"]["available"], split["test"]["available"]) == (763, 37, 0)
    assert split["images_in_no_split"]["count"] == 9
    features = json.loads((real_project / "data/reports/extract_report.json").read_text())
    assert features["images_extracted"] == PHOTOS and features["failed_count"] == 0
    assert features["backbone"]["image_size"] == REAL_PHOTOS["features"]["image_size"]  # the README's 288
    train = json.loads((real_project / "metrics/train.json").read_text())
    assert train["train_captions"] == 763 * 5 and train["dev_captions"] == 37 * 5

    # A seeded split reuses the features and runs to the end on the real photos, with the README's settings.
    set_params(real_project, {"data": {"split_dir": None},
                              "train": {key: REAL_TRAIN[key] for key in ("epochs", "scst_epochs")}})
    result = run(["dvc", "repro"], real_project)
    assert stages_run(result.stdout) == ["split", "train_lstm", "evaluate", "plot"]
    evaluation = json.loads((real_project / "metrics/eval.json").read_text())
    assert evaluation["test_images"] == 809 - round(809 * 0.8) - round(809 * 0.1)
    for metric in ("cider", "bleu4"):  # a captioner that looks at the photo, not one sentence for all
        assert evaluation[metric] > evaluation["baseline_nearest"][metric], metric
        assert evaluation[metric] > evaluation["baseline_frequent"][metric], metric
    train = json.loads((real_project / "metrics/train.json").read_text())
    assert (train["features_backbone"], train["features_weights"]) == ("efficientnet_lite0", "imagenet")
    assert train["scst_epochs"] == 2 and len(train["scst_rewards"]) == 2

    # No train/serve skew with this backbone: the caption command prints evaluate's caption.
    predictions = pd.read_parquet(real_project / "data/predictions.parquet").head(3)
    photos = yaml.safe_load((real_project / "params.yaml").read_text())["data"]["images"]
    images = [f"{photos}/{name}" for name in predictions["image"]]
    shown = run([sys.executable, "-m", "captioning", "caption", *images], real_project).stdout.splitlines()
    assert [line.split("\t")[1] for line in shown] == list(predictions["generated"])
