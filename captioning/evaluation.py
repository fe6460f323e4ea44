"""Caption the test images, score them and the baselines the same way, and build the predictions table."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from captioning.baselines import consensus_captions, most_frequent_caption
from captioning.errors import UserError
from captioning.feature_files import FeatureStore
from captioning.layout import EXTRACT_REPORT
from captioning.neighbours import nearest_neighbours
from captioning.params import DecodeSettings
from captioning.scoring import CaptionScorer
from captioning.timing import Stopwatch


def references_of(captions: pd.DataFrame, images: list[str]) -> dict[str, list[str]]:
    chosen = captions[captions["image"].isin(set(images))]
    return {image: list(group["caption"]) for image, group in chosen.groupby("image", sort=True)}


def evaluate(model_dir: Path, features_dir: Path, captions: pd.DataFrame, train_images: list[str],
             test_images: list[str], settings: DecodeSettings) -> tuple[dict, pd.DataFrame]:
    store = FeatureStore(features_dir)
    test_images, without_features = _test_images_with_features(store, test_images)
    references = references_of(captions, test_images)
    test_features = store.get(test_images)
    # One METEOR process for the model and both baselines; its Java loads while the baselines are chosen
    # and TensorFlow and the model load.
    with CaptionScorer() as scorer:
        frequent, nearest = _baselines(store, captions, train_images, test_images, test_features)
        generated, decode_seconds = _caption(model_dir, test_features, settings, scorer)
        candidates = dict(zip(test_images, generated, strict=True))
        metrics, per_image = scorer.score(candidates, references, progress="scoring the model")
        frequent_scores, _ = scorer.score({k: frequent for k in test_images}, references,
                                          progress="scoring the frequent baseline")
        nearest_scores, _ = scorer.score(nearest, references, progress="scoring the nearest baseline")

    metrics.update(
        test_images=len(test_images),
        test_images_without_features=len(without_features),
        distinct_captions=len(set(generated)),
        decode_method=settings.method,
        decode_images_per_second=round(len(test_images) / decode_seconds, 1),
        baseline_frequent=frequent_scores,
        baseline_nearest=nearest_scores,
    )
    predictions = per_image.assign(
        generated=[candidates[k] for k in per_image["image"]],
        references=[references[k] for k in per_image["image"]],
        baseline_nearest=[nearest[k] for k in per_image["image"]],
    )[["image", "generated", "references", "bleu4", "cider", "meteor", "rouge_l", "baseline_nearest"]]
    return metrics, predictions


def _test_images_with_features(store: FeatureStore, test_images: list[str]) -> tuple[list[str], list[str]]:
    """The test photos that can be captioned (sorted), and those whose extraction failed. A photo without
    features is left out of every score, and counted in eval.json."""
    without_features = store.without_features(test_images, "test", "are not scored", "evaluate")
    test_images = sorted(name for name in test_images if name in store.row_of)
    # Two different causes, two different remedies: a seeded split's user was told to set the seeded split.
    if not test_images and without_features:
        raise UserError(f"none of the {len(without_features)} test images has features: their extraction failed "
                        f"(see {EXTRACT_REPORT} for why), so there is nothing to evaluate. Replace or repair those "
                        "photos and run `dvc repro`.")
    if not test_images:
        raise UserError("the test split is empty, so there is nothing to evaluate. With data.split_dir set, the "
                        "official test list names none of your photos (or set data.split_dir: null for a seeded "
                        "split); with a seeded split, test gets the photos that split.train_fraction and "
                        "split.dev_fraction leave: lower them, or add photos.")
    return test_images, without_features


def _baselines(store: FeatureStore, captions: pd.DataFrame, train_images: list[str], test_images: list[str],
               test_features) -> tuple[str, dict[str, str]]:
    """The two captions a model must beat: the most frequent training caption (for every test photo), and
    per test photo the consensus caption of its nearest training photo."""
    train_images = sorted(name for name in train_images if name in store.row_of)
    train_captions = captions[captions["image"].isin(set(train_images))]
    frequent = most_frequent_caption(train_captions["caption"])
    consensus = consensus_captions(train_captions)
    neighbour = nearest_neighbours(test_features, store.get(train_images))[:, 0]
    return frequent, {k: consensus[train_images[i]] for k, i in zip(test_images, neighbour, strict=True)}


def _caption(model_dir: Path, features, settings: DecodeSettings, scorer: CaptionScorer) -> tuple[list[str], float]:
    """The test images' captions and the seconds decoding them took (with METEOR's Java loaded first, so
    that it does not share the CPU with the timed decoding)."""
    from captioning.decode import Captioner  # TensorFlow: only once there is something to caption

    captioner = Captioner.load(model_dir)
    scorer.wait_until_ready()
    with Stopwatch() as watch:
        generated = captioner.captions(features, progress=True, **settings.as_kwargs())
    return generated, watch.seconds
