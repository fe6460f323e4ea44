"""The decoder: image features -> initial states of 5 stacked LSTMs -> next-word logits.

Design choices (the README repeats them):
- The image sets the initial (h, c) state of every LSTM layer through one tanh projection
  (tanh because LSTM hidden states live in (-1, 1)). Conditioning every layer keeps the image
  signal from fading through 5 layers.
- Residual connections between LSTM layers 2-5 (x + LSTM(x)) give gradients a short path; a plain
  5-deep stack with L1 barely trains in a few epochs. LSTMs keep their standard tanh/sigmoid
  activations, which are also what the fast cuDNN kernel requires on a GPU.
- L1 on the input and recurrent kernels of every LSTM layer, with a small coefficient, so it prunes
  useless connections without drowning the caption loss.
- Exactly one Dropout, on the top LSTM's output just before the vocabulary projection: the
  projection is the largest weight matrix and the place where the net overfits the training
  captions; dropping there regularises every path into it (Zaremba et al. 2014: dropout on
  non-recurrent connections) without injecting noise into the recurrent state or the image
  conditioning, which would compound across the 5 layers and all time steps.
- Linear output (logits) with a masked sparse categorical cross-entropy computed from logits:
  numerically stabler than softmax followed by log, and padding positions do not count.
- `train.ensemble: K` > 1 trains K such decoders, one after another, member k exactly as a single run
  with seed `train.seed + k - 1` (train.py), and decodes with the mean of their next-word probabilities
  (the ensembling of Show and Tell, Vinyals et al. 2016). On a few hundred photos one decoder's
  captions depend on its seed; the mean of K is steadier and scores higher on real photos (README).
"""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np

from captioning.tf_setup import keras, tf
from captioning.vocab import PAD_ID

NUM_LSTM_LAYERS = 5
MEMBER_PREFIX = "member_"  # an ensemble's decoders are named member_1 .. member_K
ops = keras.ops


@keras.saving.register_keras_serializable(package="captioning")
def masked_loss(y_true, logits):
    """Mean cross-entropy over real tokens only (padding id 0 is ignored)."""
    mask = ops.cast(ops.not_equal(y_true, PAD_ID), "float32")
    loss = keras.losses.sparse_categorical_crossentropy(y_true, logits, from_logits=True)
    return _replica_share(ops.sum(loss * mask) / ops.maximum(ops.sum(mask), 1.0))


def _replica_share(loss):
    """Under a tf.distribute strategy with R replicas (train.strategy), divide by R: the replicas'
    gradients are summed, so each must contribute 1/R of its loss for their mean. Keras does this for the
    losses it reduces itself, but not for a loss that already returns a scalar, as this one does (it
    then multiplies the logged loss back by R). With one replica nothing is computed: same numbers."""
    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    return loss if replicas == 1 else loss / replicas


@keras.saving.register_keras_serializable(package="captioning")
class MaskedAccuracy(keras.metrics.Metric):
    """Next-token accuracy over real tokens, accumulated exactly (correct / total over the epoch)."""

    def __init__(self, name="accuracy", **kwargs):
        super().__init__(name=name, **kwargs)
        self.correct = self.add_variable(shape=(), initializer="zeros", name="correct")
        self.total = self.add_variable(shape=(), initializer="zeros", name="total")

    def update_state(self, y_true, logits, sample_weight=None):
        mask = ops.cast(ops.not_equal(y_true, PAD_ID), "float32")
        hits = ops.cast(ops.equal(ops.cast(ops.argmax(logits, axis=-1), y_true.dtype), y_true), "float32")
        self.correct.assign_add(ops.sum(hits * mask))
        self.total.assign_add(ops.sum(mask))

    def result(self):
        return self.correct / ops.maximum(self.total, 1.0)


def ensemble_of(decoders: list[keras.Model]) -> keras.Model:
    """One model holding trained decoders as members `member_1` .. `member_K` (one decoder: itself).

    Its output stacks the members' logits as (batch, K, time, vocab); decoding uses the members
    through `inference_models`, which averages their next-word probabilities.
    """
    if len(decoders) == 1:
        return decoders[0]
    features = keras.Input(decoders[0].get_layer("feature_norm").input.shape[1:], name="features")
    tokens = keras.Input((None,), dtype="int32", name="tokens")
    logits = []
    for k, decoder in enumerate(decoders):
        decoder.name = f"{MEMBER_PREFIX}{k + 1}"
        logits.append(decoder({"features": features, "tokens": tokens}))
    return keras.Model({"features": features, "tokens": tokens}, ops.stack(logits, axis=1),
                       name=f"caption_ensemble_of_{len(decoders)}")


def members_of(model: keras.Model) -> list[keras.Model]:
    """The decoders in a training model: an ensemble's members, or the model itself."""
    members = [layer for layer in model.layers if layer.name.startswith(MEMBER_PREFIX)]
    return members or [model]


def save_for_decoding(model: keras.Model, path: Path) -> None:
    """Save the layers and weights that decoding needs, without the optimizer. Keras' .keras format keeps a
    compiled model's optimizer state (Adam: two moments per weight, every ensemble member's), which would
    triple the file the caption command and the server load. Checkpoints keep it: resuming needs it."""

    def uncompiled(decoder: keras.Model) -> keras.Model:  # the same layers and weights, never compiled
        return keras.Model(decoder.input, decoder.output, name=decoder.name)

    ensemble_of([uncompiled(member) for member in members_of(model)]).save(path)
    canonical_keras_file(path)


ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)  # the earliest date a zip entry holds; Keras gives it to two of its three


def canonical_keras_file(path: Path) -> None:
    """Rewrite a .keras file so that the same model always gives the same bytes. Keras 3 writes into it the
    time of saving (`date_saved` in metadata.json, which loading never reads, and the weights entry's zip
    date) and, in config.json, Python's id() of each shared object (`shared_object_id`), a memory address
    that differs from process to process. So an identical retrain changed model.keras, data/model's hash in
    dvc.lock and the model_sha256 of data/decode.json. The date goes; the ids are renumbered 1, 2, ... in
    order of appearance, which links the same objects on loading. The rest stays as Keras wrote it."""
    with zipfile.ZipFile(path) as archive:
        entries = [(info, archive.read(info)) for info in archive.infolist()]
    with zipfile.ZipFile(path, "w") as archive:
        for info, data in entries:
            if info.filename == "metadata.json":
                metadata = json.loads(data)
                metadata.pop("date_saved", None)
                data = json.dumps(metadata).encode()
            elif info.filename == "config.json":
                data = json.dumps(_renumbered_shared_objects(json.loads(data), {})).encode()
            fixed = zipfile.ZipInfo(info.filename, date_time=ZIP_EPOCH)
            fixed.compress_type, fixed.external_attr = info.compress_type, info.external_attr
            archive.writestr(fixed, data)


def _renumbered_shared_objects(config, numbers: dict):
    """`config` with each shared_object_id replaced by its rank of first appearance (`numbers` holds them).
    A dtype policy's is dropped: a freshly built decoder's layers share one policy object, those of a decoder
    resumed from a checkpoint each have their own, and a policy is a mere name ("float32"), so the weights of
    a resumed run, the same as an uninterrupted run's, are saved the same way too."""
    if isinstance(config, list):
        return [_renumbered_shared_objects(item, numbers) for item in config]
    if not isinstance(config, dict):
        return config
    policy = str(config.get("class_name", "")).endswith("DTypePolicy")
    return {key: numbers.setdefault(value, len(numbers) + 1) if key == "shared_object_id"
            else _renumbered_shared_objects(value, numbers) for key, value in config.items()
            if not (policy and key == "shared_object_id")}


def build_decoder(vocab_size: int, units: int, l1: float, dropout: float,
                  feature_mean: np.ndarray, feature_variance: np.ndarray,
                  name: str = "caption_decoder") -> keras.Model:
    """One decoder: (image features, input tokens) -> logits for every next token."""
    features = keras.Input((feature_mean.shape[-1],), name="features")
    tokens = keras.Input((None,), dtype="int32", name="tokens")
    # Standardise with training-set statistics: random-weight ResNet features have wild scales.
    normalised = keras.layers.Normalization(mean=feature_mean, variance=feature_variance, name="feature_norm")(features)
    states = _initial_states(normalised, units)
    x = keras.layers.Embedding(vocab_size, units, name="embed")(tokens)
    for layer in range(NUM_LSTM_LAYERS):
        lstm = keras.layers.LSTM(
            units, return_sequences=True, return_state=True, name=f"lstm_{layer + 1}",
            kernel_regularizer=keras.regularizers.L1(l1), recurrent_regularizer=keras.regularizers.L1(l1),
        )
        y, _, _ = lstm(x, initial_state=states[2 * layer:2 * layer + 2])
        x = y if layer == 0 else keras.layers.Add(name=f"residual_{layer + 1}")([x, y])
    x = keras.layers.Dropout(dropout, name="dropout")(x)
    logits = keras.layers.Dense(vocab_size, name="logits")(x)
    return keras.Model({"features": features, "tokens": tokens}, logits, name=name)


def _initial_states(normalised, units: int, layers=None) -> list:
    """(h, c) for every LSTM layer from the image, each through its own tanh projection.

    With `layers` (a trained model) the existing projections are reused instead of new ones.
    """
    states = []
    for layer in range(1, NUM_LSTM_LAYERS + 1):
        for kind in ("h", "c"):
            name = f"init_{kind}{layer}"
            dense = layers.get_layer(name) if layers else keras.layers.Dense(units, activation="tanh", name=name)
            states.append(dense(normalised))
    return states


def make_optimizer(name: str, learning_rate: float, clipnorm: float) -> keras.optimizers.Optimizer:
    optimizers = {"adam": keras.optimizers.Adam, "rmsprop": keras.optimizers.RMSprop, "sgd": keras.optimizers.SGD}
    return optimizers[name](learning_rate=learning_rate, clipnorm=clipnorm)


def compile_decoder(model: keras.Model, optimizer: keras.optimizers.Optimizer) -> None:
    model.compile(optimizer=optimizer, loss=masked_loss, metrics=[MaskedAccuracy()])


def inference_models(model: keras.Model) -> tuple[keras.Model, keras.Model]:
    """Split the trained model into (features -> initial states) and one decoding step.

    The step model reuses the trained layers, so there is one set of weights and no copy to drift.
    An ensemble's models run every member's own pair and carry all their states; its step returns
    the log of the members' mean next-word probability (normalised scores, decoded like logits).
    """
    members = members_of(model)
    if len(members) == 1:
        return _member_inference(members[0])
    pairs = [_member_inference(member, f"_{k + 1}") for k, member in enumerate(members)]
    per_member = len(pairs[0][0].outputs)
    features = keras.Input(pairs[0][0].input_shape[1:], name="features")
    encoder = keras.Model(features, [s for member_encoder, _ in pairs for s in member_encoder(features)],
                          name="state_encoder")
    token = keras.Input((1,), dtype="int32", name="token")
    state_inputs = [keras.Input((s.shape[-1],), name=f"state_{i}") for i, s in enumerate(encoder.outputs)]
    log_probs, new_states = [], []
    for k, (_, member_step) in enumerate(pairs):
        logits, *states = member_step([token, *state_inputs[k * per_member:(k + 1) * per_member]])
        log_probs.append(ops.log_softmax(logits, axis=-1))
        new_states += states
    mean_probability = ops.logsumexp(ops.stack(log_probs, axis=0), axis=0) - float(np.log(len(pairs)))
    return encoder, keras.Model([token, *state_inputs], [mean_probability, *new_states], name="decode_step")


def _member_inference(member: keras.Model, suffix: str = "") -> tuple[keras.Model, keras.Model]:
    """One decoder's (features -> initial states) and decoding step models."""
    units = member.get_layer("lstm_1").units
    features = keras.Input(member.get_layer("feature_norm").input.shape[1:], name="features")
    initial = _initial_states(member.get_layer("feature_norm")(features), units, layers=member)
    encoder = keras.Model(features, initial, name=f"state_encoder{suffix}")

    token = keras.Input((1,), dtype="int32", name="token")
    state_inputs = [keras.Input((units,), name=f"state_{i}") for i in range(2 * NUM_LSTM_LAYERS)]
    x = member.get_layer("embed")(token)
    new_states = []
    for layer in range(NUM_LSTM_LAYERS):
        y, h, c = member.get_layer(f"lstm_{layer + 1}")(x, initial_state=state_inputs[2 * layer:2 * layer + 2])
        x = y if layer == 0 else member.get_layer(f"residual_{layer + 1}")([x, y])
        new_states += [h, c]
    logits = keras.layers.Reshape((-1,))(member.get_layer("logits")(x))
    step = keras.Model([token, *state_inputs], [logits, *new_states], name=f"decode_step{suffix}")
    return encoder, step
