"""`train.ensemble`: K decoders trained side by side, each the assignment's decoder with its own loss,
decoded with the mean of their next-word probabilities (tiny sizes)."""
import numpy as np
import pytest

from captioning.decode import Captioner
from captioning.model import (
    NUM_LSTM_LAYERS,
    MaskedAccuracy,
    build_model,
    compile_decoder,
    inference_models,
    make_optimizer,
    masked_loss,
    members_of,
)
from captioning.tf_setup import keras, seed_everything
from captioning.vocab import PAD_ID, START_ID, Vocabulary

CAPTIONS = ["a red circle", "two blue squares", "three green triangles", "a red square"]
MEMBERS = 3


def tiny_model(members: int, features: np.ndarray, vocab: Vocabulary) -> keras.Model:
    return build_model(members, len(vocab), 16, 1e-6, 0.2, features.mean(0), features.var(0))


def for_members(array: np.ndarray, members: int) -> np.ndarray:
    """The same rows for every member (training gives each member its own rows; see test_member_orders)."""
    return np.repeat(array[:, None], members, axis=1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A trained ensemble, saved and loaded back as the caption command loads it."""
    seed_everything(0)
    vocab = Vocabulary.build(CAPTIONS, 1)
    sequences, _ = vocab.encode_all(CAPTIONS * 8, 10)
    features = np.random.default_rng(0).normal(size=(len(sequences), 32)).astype("float32")
    features[:, 0] = np.tile(np.arange(4), 8)  # the caption is readable from the features
    model = tiny_model(MEMBERS, features, vocab)
    compile_decoder(model, make_optimizer("adam", 1e-2, 1.0))
    history = model.fit({"features": for_members(features, MEMBERS), "tokens": for_members(sequences[:, :-1], MEMBERS)},
                        for_members(sequences[:, 1:], MEMBERS), epochs=30, batch_size=8, verbose=0).history
    path = tmp_path_factory.mktemp("ensemble") / "model.keras"
    model.save(path)
    return keras.models.load_model(path, compile=False), vocab, features[:4], history


def test_one_member_is_the_plain_decoder():
    features = np.zeros((2, 8), np.float32)
    model = tiny_model(1, features, Vocabulary.build(CAPTIONS, 1))
    assert model.name == "caption_decoder" and members_of(model) == [model]
    assert len(model.output.shape) == 3  # (batch, time, vocab), as before ensembles existed


def test_every_member_is_the_decoder_with_its_own_weights(trained):
    model = trained[0]
    members = members_of(model)
    assert [m.name for m in members] == [f"member_{k}" for k in range(1, MEMBERS + 1)]
    assert tuple(model.output.shape[1:2]) == (MEMBERS,)  # (batch, member, time, vocab)
    assert tuple(model.input["features"].shape[1:2]) == (MEMBERS,)  # each member reads its own rows
    for member in members:
        lstms = [layer for layer in member.layers if isinstance(layer, keras.layers.LSTM)]
        assert len(lstms) == NUM_LSTM_LAYERS
        assert all(isinstance(lstm.kernel_regularizer, keras.regularizers.L1) for lstm in lstms)
        assert sum(isinstance(layer, keras.layers.Dropout) for layer in member.layers) == 1
    embeddings = [m.get_layer("embed").get_weights()[0] for m in members]
    assert not np.allclose(embeddings[0], embeddings[1])  # initialised apart, so they can disagree
    assert len(model.losses) >= MEMBERS * 2 * NUM_LSTM_LAYERS  # every member's L1 reaches the loss


def test_loss_is_the_sum_of_each_members_own_loss():
    rng = np.random.default_rng(1)
    targets = np.array([[[5, 6, 2, PAD_ID], [3, PAD_ID, PAD_ID, PAD_ID], [5, 6, 2, 7]],
                        [[3, PAD_ID, PAD_ID, PAD_ID], [4, PAD_ID, PAD_ID, PAD_ID], [6, PAD_ID, PAD_ID, PAD_ID]]])
    logits = rng.normal(size=(2, MEMBERS, 4, 8)).astype(np.float32)  # members read 4, 2 and 5 real tokens
    logits[:, 0, :, 5] += 4.0  # member 1 is right more often than the others
    each = [float(masked_loss(targets[:, k], logits[:, k])) for k in range(MEMBERS)]
    assert float(masked_loss(targets, logits)) == pytest.approx(np.sum(each), rel=1e-5)
    assert len(set(each)) == MEMBERS  # the members really differ, so the sum is not a multiple of one
    pooled = MaskedAccuracy()  # accuracy: over every member's tokens
    for k in range(MEMBERS):
        pooled.update_state(targets[:, k], logits[:, k])
    metric = MaskedAccuracy()
    metric.update_state(targets, logits)
    assert float(metric.result()) == pytest.approx(float(pooled.result()))


def test_decoding_step_scores_the_members_mean_probability(trained):
    model, vocab, features, _ = trained
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


def test_ensemble_learns_and_captions(trained):
    model, vocab, features, history = trained
    assert history["loss"][-1] < history["loss"][0] / 3
    captioner = Captioner(model, vocab)
    assert captioner.captions(features, method="greedy", max_length=10) == CAPTIONS
    assert captioner.captions(features, method="beam", beam_size=3, max_length=10) == CAPTIONS


def test_each_member_gets_the_gradient_it_would_get_alone():
    """Training the ensemble is training every member on its own loss (its L1 included)."""
    from captioning.tf_setup import tf

    seed_everything(3)
    captions = [*CAPTIONS, "two blue squares on the green grass"]
    vocab = Vocabulary.build(captions, 1)
    sequences, _ = vocab.encode_all(captions, 10)
    features = np.random.default_rng(3).normal(size=(len(sequences), 32)).astype("float32")
    model = tiny_model(2, features, vocab)
    alone_inputs = {"features": features, "tokens": sequences[:, :-1]}
    other = np.array([4, 4, 0, 4, 1])  # member 2 reads other captions, with more words, than member 1
    inputs = {"features": np.stack([features, features[other]], axis=1),
              "tokens": np.stack([sequences[:, :-1], sequences[other, :-1]], axis=1)}
    targets = np.stack([sequences[:, 1:], sequences[other, 1:]], axis=1)

    def gradients(network, training_model):
        together = network is model
        with tf.GradientTape() as tape:
            logits = network(inputs if together else alone_inputs, training=False)
            loss = masked_loss(targets if together else sequences[:, 1:], logits) + sum(network.losses)
        # The embedding's gradient comes as IndexedSlices: made dense to compare.
        return [tf.convert_to_tensor(g) for g in tape.gradient(loss, training_model.trainable_variables)]

    member = members_of(model)[0]
    together = dict(zip(map(id, model.trainable_variables), gradients(model, model), strict=True))
    alone = gradients(member, member)
    assert len(alone) == len(member.trainable_variables) > 0
    for variable, gradient in zip(member.trainable_variables, alone, strict=True):
        np.testing.assert_allclose(together[id(variable)], gradient, rtol=1e-4, atol=1e-7)


def test_member_orders_are_the_single_decoders_of_the_next_seeds():
    """Member k is fed exactly the batches a single decoder with train.seed + k would get, so the
    members do not learn in lockstep, and member 1 sees what the single decoder sees."""
    from captioning.train import CaptionSet, training_batches, validation_batches

    rng = np.random.default_rng(5)
    lengths = rng.integers(2, 9, size=40)
    sequences = np.zeros((40, 10), np.int32)
    for row, length in enumerate(lengths):
        sequences[row, :length] = rng.integers(4, 30, size=length)
    data = CaptionSet(np.arange(40) % 7, sequences)
    matrix = rng.normal(size=(7, 5)).astype(np.float32)

    def first_batches(members, seed, count=6):
        batches = training_batches(data, matrix, 8, seed, first_epoch=2, members=members).take(count)
        return [(x["features"].numpy(), x["tokens"].numpy(), y.numpy()) for x, y in batches]

    together = first_batches(MEMBERS, seed=11)
    for k in range(MEMBERS):
        alone = first_batches(1, seed=11 + k)
        for (features, tokens, targets), (own_features, own_tokens, own_targets) in zip(together, alone, strict=True):
            np.testing.assert_array_equal(features[:, k], own_features)
            width = own_tokens.shape[1]  # the ensemble's batch is cut to the longest caption of all members
            np.testing.assert_array_equal(tokens[:, k, :width], own_tokens)
            np.testing.assert_array_equal(targets[:, k, :width], own_targets)
            assert not targets[:, k, width:].any()  # only padding beyond: masked out of the loss
    assert not np.array_equal(together[0][1][:, 0], together[0][1][:, 1])

    (inputs, targets), = list(validation_batches(data, matrix, 64, members=MEMBERS))
    targets = targets.numpy()
    for k in range(MEMBERS):  # every member is scored on every dev caption, in the same order
        np.testing.assert_array_equal(targets[:, k], targets[:, 0])
    assert len(targets) == len(data)
