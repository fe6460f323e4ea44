"""`train.ensemble`: K decoders, member k trained exactly as a single run with seed train.seed + k - 1,
saved as one model and decoded with the mean of their next-word probabilities (tiny sizes)."""
from dataclasses import replace

import numpy as np
import pytest
from helpers import TOY_CAPTIONS, fit_toy_decoder, plain_decode, saved_weight_paths

from captioning.decode import Captioner
from captioning.model import (
    NUM_LSTM_LAYERS,
    build_decoder,
    ensemble_of,
    inference_models,
    members_of,
    save_for_decoding,
)
from captioning.params import read_section
from captioning.tf_setup import keras
from captioning.tiny_project import PROJECT
from captioning.train import TrainPaths, member_run
from captioning.vocab import START_ID

CAPTIONS = TOY_CAPTIONS
MEMBERS = 3


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """An ensemble of decoders trained with seeds 0, 1, 2, saved as the model bundle saves it and loaded
    back as the caption command loads it; the decoders themselves; and the saved file."""
    decoders = []
    for seed in range(MEMBERS):
        decoder, vocab, features = fit_toy_decoder(seed, epochs=30)
        decoders.append(decoder)
    path = tmp_path_factory.mktemp("ensemble") / "model.keras"
    save_for_decoding(ensemble_of(decoders), path)
    return keras.models.load_model(path, compile=False), vocab, features, decoders, path


def test_one_decoder_is_its_own_ensemble():
    features = np.zeros((2, 8), np.float32)
    decoder = build_decoder(10, 4, 1e-6, 0.2, features.mean(0), features.var(0) + 1)
    assert ensemble_of([decoder]) is decoder and members_of(decoder) == [decoder]


def test_members_are_the_trained_decoders(trained):
    model, _, features, decoders, _ = trained
    members = members_of(model)
    assert [m.name for m in members] == [f"member_{k}" for k in range(1, MEMBERS + 1)]
    for member, decoder in zip(members, decoders, strict=True):
        assert sum(isinstance(layer, keras.layers.Dropout) for layer in member.layers) == 1
        assert sum(isinstance(layer, keras.layers.LSTM) for layer in member.layers) == NUM_LSTM_LAYERS
        for saved, original in zip(member.get_weights(), decoder.get_weights(), strict=True):
            np.testing.assert_array_equal(saved, original)
    embeddings = [m.get_layer("embed").get_weights()[0] for m in members]
    assert not np.allclose(embeddings[0], embeddings[1])  # other seeds, other decoders


def test_the_saved_ensemble_holds_no_optimizer_state(trained, tmp_path):
    """Every member was compiled and trained with Adam; the bundle keeps only their layers' weights."""
    *_, decoders, path = trained
    stored = saved_weight_paths(path)
    assert len(stored) == MEMBERS * len(decoders[0].weights)
    assert not [name for name in stored if "optimizer" in name]
    ensemble_of(decoders).save(tmp_path / "with_training_state.keras")  # what plain Keras saving keeps
    assert any("optimizer" in name for name in saved_weight_paths(tmp_path / "with_training_state.keras"))


def test_decoding_step_scores_the_members_mean_probability(trained):
    model, _, features, _, _ = trained
    encoder, step = inference_models(model)
    states = encoder(features)
    assert len(states) == MEMBERS * 2 * NUM_LSTM_LAYERS
    tokens = keras.ops.full((len(features), 1), START_ID, "int32")
    scores = step([tokens, *states])[0].numpy()
    per_member = 2 * NUM_LSTM_LAYERS
    probabilities = []
    for k, member in enumerate(members_of(model)):
        member_encoder, member_step = inference_models(member)
        np.testing.assert_allclose(member_encoder(features)[0], states[k * per_member], rtol=1e-5, atol=1e-6)
        logits = member_step([tokens, *states[k * per_member:(k + 1) * per_member]])[0].numpy()
        probabilities.append(keras.ops.softmax(logits).numpy())
    np.testing.assert_allclose(np.exp(scores), np.mean(probabilities, axis=0), rtol=1e-4, atol=1e-6)
    assert not np.allclose(probabilities[0], probabilities[1], atol=1e-3)  # a mean of different opinions


def test_ensemble_captions(trained):
    model, vocab, features, _, _ = trained
    captioner = Captioner(model, vocab)
    assert captioner.captions(features, **plain_decode(method="greedy", max_length=10)) == CAPTIONS
    assert captioner.captions(features, **plain_decode(method="beam", beam_size=3, max_length=10)) == CAPTIONS


def test_member_k_is_the_single_run_of_seed_plus_k(tmp_path):
    config = read_section("train", PROJECT / "params.yaml")
    paths = TrainPaths(tmp_path / "f", tmp_path / "m", tmp_path / "checkpoints", tmp_path / "live", ())
    first, first_paths = member_run(config, paths, 0)
    assert first == config and first_paths == paths  # the single decoder of these params, its checkpoints
    third, third_paths = member_run(replace(config, ensemble=3), paths, 2)
    assert third == replace(config, seed=config.seed + 2)
    assert third_paths.checkpoints == tmp_path / "checkpoints/member_3" and third_paths.model == paths.model
