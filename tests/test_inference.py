"""The loaded captioner in-process: every pass runs at an allowed batch size, and padding changes no caption."""
from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
from helpers import saved_weight_paths

from captioning import layout
from captioning.bundle import decode_settings
from captioning.images import load_image
from captioning.inference import LoadedCaptioner

pytestmark = pytest.mark.slow


def test_every_pass_is_padded_to_an_allowed_size_and_keeps_evaluates_captions(demo_run):
    model_dir = demo_run / "data/model"
    loaded = LoadedCaptioner(model_dir, decode_settings(model_dir, demo_run / "data/decode.json"), max_batch=8)
    seen = []
    forward, final_beams = loaded._forward, loaded.captioner.final_beams
    loaded._forward = lambda pixels: seen.append(("backbone", len(pixels))) or forward(pixels)
    loaded.captioner.final_beams = lambda features, *args: seen.append(("decode", len(features))) or \
        final_beams(features, *args)
    predictions = pd.read_parquet(demo_run / "data/predictions.parquet")
    assert len(predictions) >= 5, "the tiny demo's test split is too small for this test"
    pixels = [load_image(demo_run / "data/demo/images" / name, loaded.image_size) for name in predictions["image"]]
    expected = list(predictions["generated"])
    for count in (1, 3, 5):  # none of them an allowed size
        decoded = loaded.caption_many(pixels[:count], [loaded.settings] * count)
        assert [d.caption for d in decoded] == expected[:count]
    assert {size for _, size in seen} == {2, 4, 8}
    assert [kind for kind, _ in seen] == ["backbone", "decode"] * 3
    assert np.array_equal(loaded.features(np.stack(pixels[:3])), loaded.features(np.stack(pixels[:4]))[:3])


def test_a_setting_that_fails_to_decode_fails_only_its_own_images(demo_run):
    """The server batches requests with different settings together: one that cannot be decoded with
    must not fail the requests it happened to share a pass with."""
    from captioning.errors import UserError

    model_dir = demo_run / "data/model"
    loaded = LoadedCaptioner(model_dir, decode_settings(model_dir, demo_run / "data/decode.json"), max_batch=8)
    predictions = pd.read_parquet(demo_run / "data/predictions.parquet")
    pixels = [load_image(demo_run / "data/demo/images" / name, loaded.image_size) for name in predictions["image"][:3]]
    broken = {**loaded.settings, "beam_size": 5}
    real_decode = loaded.decode

    def decode(features, settings):
        if settings == broken:
            raise UserError("these settings cannot decode")
        return real_decode(features, settings)

    loaded.decode = decode
    results = loaded.caption_many(pixels, [loaded.settings, broken, loaded.settings])
    assert isinstance(results[1], UserError)
    assert [results[0].caption, results[2].caption] == list(predictions["generated"].iloc[[0, 2]])


@pytest.mark.parametrize(("rerank", "missing"), [("consensus", layout.NGRAM_STATISTICS),
                                                ("neighbours", layout.NGRAM_STATISTICS),
                                                ("neighbours", layout.NEIGHBOUR_INDEX)])
def test_a_rerank_without_its_files_stops_at_warm_up_with_one_line(demo_run, tmp_path, rerank, missing):
    from captioning.errors import UserError

    source = demo_run / "data/model"
    settings = {**decode_settings(source, demo_run / "data/decode.json"), "rerank": rerank}
    model_dir = shutil.copytree(source, tmp_path / "model")
    (model_dir / missing).unlink()  # a model trained before the file was saved
    loaded = LoadedCaptioner(model_dir, settings, max_batch=4)
    with pytest.raises(UserError, match=f"rerank: {rerank} needs {missing}.*rerank: none"):
        loaded.warm_up()
    pixels = np.zeros((1, loaded.image_size, loaded.image_size, 3), np.uint8)
    assert loaded.caption(pixels, {**settings, "rerank": "none"})[0].caption  # the way out it names works


def test_the_bundle_holds_the_decoders_weights_and_no_optimizer_state(demo_run):
    """train_lstm compiles and trains with Adam, whose two moments per weight are resume state: they stay
    in the checkpoints and would triple model.keras (see model.save_for_decoding)."""
    from captioning.tf_setup import keras

    stored = saved_weight_paths(demo_run / "data/model/model.keras")
    checkpointed = saved_weight_paths(next((demo_run / "checkpoints").glob("*.keras")))
    assert not [name for name in stored if "optimizer" in name]
    assert [name for name in checkpointed if "optimizer" in name]
    assert sorted(stored) == sorted(name for name in checkpointed if "optimizer" not in name)
    model = keras.models.load_model(demo_run / "data/model/model.keras", compile=False)
    assert len(stored) == len(model.weights)
