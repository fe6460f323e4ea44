"""The decode settings evaluate saves with its model are the ones the caption command and server use."""
from __future__ import annotations

import pytest
import yaml

from captioning.bundle import check_bundle, decode_settings, save_decode_settings, with_overrides
from captioning.errors import UserError
from captioning.tiny_project import PROJECT


@pytest.fixture
def model_dir(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.keras").write_bytes(b"a trained model")
    return folder


def test_settings_come_back_for_their_model(model_dir, tmp_path):
    settings = yaml.safe_load((PROJECT / "params.yaml").read_text())["decode"]
    save_decode_settings(tmp_path / "decode.json", model_dir, settings)
    assert decode_settings(model_dir, tmp_path / "decode.json") == settings


def test_settings_of_another_model_are_refused(model_dir, tmp_path):
    save_decode_settings(tmp_path / "decode.json", model_dir, {"method": "greedy"})
    (model_dir / "model.keras").write_bytes(b"retrained since")
    with pytest.raises(UserError, match="belongs to another model"):
        decode_settings(model_dir, tmp_path / "decode.json")


def test_missing_settings_say_how_to_get_them(model_dir, tmp_path):
    with pytest.raises(UserError, match="evaluate` writes the decode settings"):
        decode_settings(model_dir, tmp_path / "nothing.json")


@pytest.mark.parametrize(("change", "words"), [
    ({"beam_size": "5"}, "settings.beam_size is '5'"),
    ({"method": "beams"}, "settings.method is 'beams'; use one of: greedy, beam"),
    ({"max_length": 0}, "settings.max_length is 0"),
    ({"rerank": None}, "has no settings.rerank"),
])
def test_hand_edited_settings_are_checked_like_params(model_dir, tmp_path, change, words):
    """A settings file edited by hand failed deep in TensorFlow (beam_size "5", no rerank) or decoded otherwise
    without a word (method: beams ran beam search, max_length 0 printed empty captions)."""
    settings = yaml.safe_load((PROJECT / "params.yaml").read_text())["decode"]
    settings = {key: value for key, value in {**settings, **change}.items() if value is not None}
    save_decode_settings(tmp_path / "decode.json", model_dir, settings)
    with pytest.raises(UserError, match=f"decode.json.*{words}.*--decode-settings"):
        decode_settings(model_dir, tmp_path / "decode.json")


def test_settings_saved_before_the_neighbours_rerank_are_still_accepted(model_dir, tmp_path):
    settings = yaml.safe_load((PROJECT / "params.yaml").read_text())["decode"]
    del settings["neighbours"]
    save_decode_settings(tmp_path / "decode.json", model_dir, {**settings, "rerank": "consensus", "beam_size": 3.0})
    assert decode_settings(model_dir, tmp_path / "decode.json") == {**settings, "rerank": "consensus", "beam_size": 3}


def test_overrides_are_checked():
    assert with_overrides({"method": "beam", "beam_size": 3}, beam_size=1) == {"method": "greedy", "beam_size": 1}
    with pytest.raises(UserError, match="beam size"):
        with_overrides({"method": "beam", "beam_size": 3}, beam_size=0)


def _whole_bundle(folder):
    """The files train_lstm writes, small but well formed, beside the fixture's model.keras."""
    import json

    import numpy as np

    (folder / "vocab.json").write_text(json.dumps({"words": ["a", "dog"]}))
    (folder / "backbone.json").write_text(json.dumps({"weights": "random", "seed": 0, "image_size": 64,
                                                      "precision": "float32", "weights_sha256": None,
                                                      "backbone": "resnet50"}))
    (folder / "ngram_df.json").write_text(json.dumps({"n_documents": 2, "document_frequency": {"a dog": 2.0}}))
    np.savez(folder / "neighbours.npz", features=np.zeros((2, 4), np.float32), caption_counts=np.array([1, 1]),
             captions=np.array(["a dog", "a dog"]))


@pytest.mark.parametrize("name", ["backbone.json", "vocab.json", "ngram_df.json", "neighbours.npz"])
def test_a_file_cut_short_is_named_in_one_line(model_dir, name):
    """A model folder copied in part: every file there, one of them cut off. Loading it raised a JSON or zip
    traceback from deep inside TensorFlow's start-up; the check names the file before any of that."""
    _whole_bundle(model_dir)
    check_bundle(model_dir)  # whole: fine
    path = model_dir / name
    path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])
    with pytest.raises(UserError, match=f"model in {model_dir} is damaged: {name} cannot be read"):
        check_bundle(model_dir)


@pytest.mark.parametrize(("name", "text"), [("backbone.json", "[1, 2]"), ("backbone.json", '{"words": []}'),
                                            ("vocab.json", '{"words": 3}'), ("ngram_df.json", "{}")])
def test_a_file_of_the_wrong_shape_is_named_in_one_line(model_dir, name, text):
    _whole_bundle(model_dir)
    (model_dir / name).write_text(text)
    with pytest.raises(UserError, match=f"damaged: {name} cannot be read"):
        check_bundle(model_dir)


def test_the_optional_rerank_files_may_be_absent(model_dir):
    """Models trained before the reranks existed have neither file; decoding says when one is needed."""
    _whole_bundle(model_dir)
    (model_dir / "ngram_df.json").unlink()
    (model_dir / "neighbours.npz").unlink()
    check_bundle(model_dir)


def test_the_same_model_saved_twice_gives_the_same_file(tmp_path):
    """Keras writes into model.keras the time of saving (metadata.json's date_saved, the weights entry's zip
    date) and each shared object's id(), a memory address: an identical retrain changed data/model's hash and
    decode.json's model_sha256. A decoder, and the same decoder saved and loaded back as a checkpoint is on a
    resume (other objects, other addresses, dtype policies no longer shared), saved seconds apart (zip dates
    count in 2 s steps), now give the same file, which loads to the same predictions."""
    import time

    import numpy as np

    from captioning import files
    from captioning.model import build_decoder, save_for_decoding
    from captioning.tf_setup import keras

    features = np.random.default_rng(0).normal(size=(4, 8)).astype(np.float32)
    decoder = build_decoder(12, 4, 1e-6, 0.2, features.mean(0), features.var(0) + 1)
    decoder.save(tmp_path / "checkpoint.keras")  # as checkpoints.py saves it after each epoch
    resumed = keras.models.load_model(tmp_path / "checkpoint.keras")
    save_for_decoding(decoder, tmp_path / "first.keras")
    time.sleep(2.1)
    save_for_decoding(resumed, tmp_path / "second.keras")
    assert files.sha256(tmp_path / "first.keras") == files.sha256(tmp_path / "second.keras")
    loaded = keras.models.load_model(tmp_path / "second.keras", compile=False)
    inputs = {"features": features, "tokens": np.ones((4, 5), np.int32)}
    np.testing.assert_array_equal(loaded.predict(inputs, verbose=0), decoder.predict(inputs, verbose=0))
