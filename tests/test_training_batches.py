"""The batches a resumed run trains on are the ones an uninterrupted run has at that epoch, also when the
caption count is no multiple of the batch size (an epoch then starts part-way into a permutation)."""
from __future__ import annotations

import numpy as np
import pytest

from captioning.train import CaptionSet, steps_per_epoch, training_batches

EPOCHS = 4


def caption_ids(data: CaptionSet, batch_size: int, first_epoch: int, count: int) -> list[list[int]]:
    """The captions of each of the first `count` batches from `first_epoch` on (a caption's id is its word)."""
    matrix = np.zeros((len(data), 4), dtype=np.float32)
    stream = training_batches(data, matrix, batch_size, seed=3, first_epoch=first_epoch).take(count)
    return [inputs["tokens"].numpy()[:, 1].tolist() for inputs, _ in stream]


@pytest.mark.parametrize("captions,batch_size", [(30, 8), (30, 10), (7, 16)])
def test_a_resumed_run_gets_the_batches_of_an_uninterrupted_one(captions, batch_size):
    ids = np.arange(captions, dtype=np.int32)
    sequences = np.stack([np.ones_like(ids), ids + 4, np.full_like(ids, 2)], axis=1)  # <start> id <end>
    data = CaptionSet(np.arange(captions, dtype=np.int64), sequences)
    steps = steps_per_epoch(data, batch_size)
    straight = caption_ids(data, batch_size, 0, EPOCHS * steps)
    for done in range(1, EPOCHS):
        assert caption_ids(data, batch_size, done, (EPOCHS - done) * steps) == straight[done * steps:], done
    # the stream is whole permutations one after another: every caption once per `captions` draws
    drawn = [caption for batch in straight for caption in batch]
    for start in range(0, len(drawn) - captions + 1, captions):
        assert sorted(drawn[start:start + captions]) == (ids + 4).tolist()


def test_split_photos_without_features_are_counted_and_named(tmp_path, capsys):
    """A train or dev photo whose extraction failed (listed in the extract report) has no features and is
    left out of training. Like evaluate's test photos, it must not be lost without a word: counted in
    metrics/train.json and named on stderr, so a model trained on fewer photos than the split holds says so."""
    from dataclasses import replace

    import pandas as pd

    from captioning import files
    from captioning.feature_files import FeatureStore
    from captioning.params import read_section
    from captioning.tf_setup import keras
    from captioning.tiny_project import PROJECT
    from captioning.train import MemberRun, new_state, prepare_data, training_metrics

    extracted = ["t1.jpg", "t2.jpg", "d1.jpg"]
    folder = tmp_path / "features"
    folder.mkdir()
    np.save(folder / "features.npy", np.random.default_rng(0).normal(size=(len(extracted), 4)).astype(np.float32))
    pd.DataFrame({"image": extracted, "row": range(len(extracted))}).to_parquet(folder / "index.parquet")
    files.write_json(folder / "backbone.json", {"weights": "random", "seed": 0, "image_size": 32,
                                                "precision": "float32"})
    train_images, dev_images = ["t1.jpg", "t2.jpg", "t3.jpg", "t4.jpg"], ["d1.jpg", "d2.jpg"]
    captions = pd.DataFrame([(image, f"a dog number {k}") for image in train_images + dev_images for k in range(2)],
                            columns=["image", "caption"])
    config = replace(read_section("train", PROJECT / "params.yaml"), min_count=1)
    store = FeatureStore(folder)
    data = prepare_data(config, captions, train_images, dev_images, store)
    assert (len(data.train_set), len(data.dev_set)) == (4, 2)  # the captions of the photos with features
    err = capsys.readouterr().err
    assert "2 train images" in err and "t3.jpg" in err and "t4.jpg" in err
    assert "1 dev images" in err and "d2.jpg" in err

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    state = {**new_state("x"), "epoch": 1, "history": [{"loss": 1.0, "val_loss": 1.0}]}
    metrics = training_metrics(model, [MemberRun(model, state, 1, None)], data, store)
    assert metrics["train_images_without_features"] == 2 and metrics["dev_images_without_features"] == 1
