"""evaluate's own bookkeeping, with the decoder replaced (no TensorFlow): which test photos are scored."""
from __future__ import annotations

import functools
import re

import numpy as np
import pandas as pd
import pytest
from helpers import write_feature_folder

from captioning import evaluation
from captioning.errors import UserError
from captioning.params import DecodeSettings
from captioning.scoring import CaptionScorer

SETTINGS = DecodeSettings(method="beam", beam_size=3, length_penalty=0.0, rerank="none", neighbours=10,
                          no_repeat_ngram=0, max_length=20, batch_size=8)
CAPTIONS = {"train1.jpg": ["a red circle", "one red circle"], "train2.jpg": ["two blue squares", "blue squares"],
            "test1.jpg": ["a red circle", "a red ring"], "test2.jpg": ["two blue squares", "two squares"],
            "test3.jpg": ["three green triangles", "green triangles"]}


def write_features(folder, images: list[str]) -> None:
    """A feature folder as extraction leaves it when the photos not in `images` failed to decode."""
    write_feature_folder(folder, images, np.random.default_rng(0).normal(size=(len(images), 4)).astype(np.float32))


@pytest.fixture
def no_decoder(monkeypatch):
    """Every test photo gets the caption "a red circle", without loading a model; no METEOR."""
    monkeypatch.setattr(evaluation, "_caption", lambda model_dir, features, settings, scorer:
                        (["a red circle"] * len(features), 1.0))
    monkeypatch.setattr(evaluation, "CaptionScorer", functools.partial(CaptionScorer, meteor=False))  # no Java


def test_test_photos_without_features_are_counted_and_named(tmp_path, no_decoder, capsys):
    write_features(tmp_path / "features", ["train1.jpg", "train2.jpg", "test1.jpg", "test3.jpg"])
    metrics, predictions = evaluation.evaluate(tmp_path / "model", tmp_path / "features", table_of(CAPTIONS),
                                               ["train1.jpg", "train2.jpg"], ["test1.jpg", "test2.jpg", "test3.jpg"],
                                               SETTINGS)
    assert list(predictions["image"]) == ["test1.jpg", "test3.jpg"] and metrics["test_images"] == 2
    # The photo that could not be scored is not lost without a word: counted in eval.json, named on stderr.
    assert metrics["test_images_without_features"] == 1
    assert "test2.jpg" in capsys.readouterr().err


def table_of(images) -> pd.DataFrame:
    return pd.DataFrame([(image, text) for image in images for text in CAPTIONS[image]], columns=["image", "caption"])


@pytest.mark.parametrize(("test_images", "remedy"), [
    ([], "split.train_fraction and split.dev_fraction leave"),  # a seeded split that rounded test to nothing
    (["test2.jpg"], "data/reports/extract_report.json"),  # photos there, but every extraction failed
])
def test_nothing_to_evaluate_says_why_and_what_to_do(tmp_path, no_decoder, test_images, remedy):
    write_features(tmp_path / "features", ["train1.jpg", "train2.jpg"])
    with pytest.raises(UserError, match=re.escape(remedy)):
        evaluation.evaluate(tmp_path / "model", tmp_path / "features", table_of(CAPTIONS), ["train1.jpg", "train2.jpg"],
                            test_images, SETTINGS)
