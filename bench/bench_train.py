"""Training: our whole teacher-forced sequences against prefix expansion, seconds per epoch.

Ours is the pipeline's path: caption_set -> training_batches -> build_decoder + compile_decoder
(masked loss over every position of `<start> w1..wn` -> `w1..wn <end>`, batches cut to their
longest caption).

Prefix expansion is the blog/tutorial merge-model recipe: a caption of n words gives n + 1
samples "image + <start> w1..wk -> w(k+1)", every sample padded to the longest prefix in the data,
one word predicted per sample. It runs the SAME decoder: build_decoder's layers, read at the last
real position of each prefix (post-padding, so the LSTMs see exactly what teacher forcing shows
them at that position), then the same Dense(vocab). Same captions, features, batch size,
optimizer (make_optimizer from params.yaml), seed, and the same kind of tf.data feeding (a seeded
permutation per epoch, rows gathered per batch). After one warm-up epoch each (tracing), the two
models train in turns, adjacent in time (the machine's load drifts): one expansion epoch, then as
many of our epochs as take about as long, averaged. The speedup is the median over these pairs;
the same ratio in CPU seconds of the process, which other jobs hardly disturb, is reported beside
it as `cpu_time_value`.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from common import FEATURE_DIM, PARAMS, demo_data, median, random_feature_dir

from captioning.feature_files import FeatureStore
from captioning.model import build_decoder, compile_decoder, make_optimizer
from captioning.tf_setup import keras, seed_everything, tf
from captioning.timing import Stopwatch
from captioning.train import caption_set, feature_moments, training_batches
from captioning.vocab import Vocabulary

OPTIONS = PARAMS["train"]


def decoder_data(workdir: Path, n_images: int):
    """Demo captions (the table), seeded random features, the vocabulary and the encoded caption set."""
    table, _ = demo_data(workdir / "captions", n_images, image_size=32)  # the pixels are not used here
    images = sorted(table["image"].unique())
    store = FeatureStore(random_feature_dir(workdir / "features", images))
    vocab = Vocabulary.build(table["caption"], OPTIONS["min_count"])
    data, _ = caption_set(table, images, store, vocab, OPTIONS["max_length"])
    return table, store, vocab, data


def new_decoder(vocab: Vocabulary, store: FeatureStore, data) -> keras.Model:
    seed_everything(OPTIONS["seed"])
    mean, variance = feature_moments(store.matrix, data.feature_rows)
    return build_decoder(len(vocab), OPTIONS["units"], OPTIONS["l1"], OPTIONS["dropout"], mean, variance)


def new_optimizer():
    return make_optimizer(OPTIONS["optimizer"], OPTIONS["learning_rate"], OPTIONS["clipnorm"])


class EpochTimes(keras.callbacks.Callback):
    """Wall and CPU seconds from the first batch of a fit to its last epoch's end (opening the data
    stream is left out)."""

    def on_train_batch_begin(self, batch, logs=None):
        if not hasattr(self, "watch"):
            self.watch = Stopwatch()

    def on_train_end(self, logs=None):
        self.seconds = (self.watch.elapsed, self.watch.cpu_elapsed)


def epoch_seconds(model, batches, steps: int, epochs: int) -> tuple[float, float]:
    """Mean (wall, CPU) seconds per epoch over `epochs` consecutive epochs of one fit call; Keras
    keeps the traced train step from one fit call to the next."""
    timer = EpochTimes()
    model.fit(batches, epochs=epochs, steps_per_epoch=steps, callbacks=[timer], verbose=0, shuffle=False)
    return timer.seconds[0] / epochs, timer.seconds[1] / epochs


def expand(sequences: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(caption index, padded prefix tokens, last real position, next word) for every prefix."""
    lengths = np.count_nonzero(sequences, axis=1)  # <start> w1..wn <end>
    caption = np.repeat(np.arange(len(sequences)), lengths - 1)
    prefix = np.concatenate([np.arange(1, n) for n in lengths])  # tokens shown: 1 .. n + 1
    width = int(lengths.max()) - 1
    tokens = np.where(np.arange(width)[None, :] < prefix[:, None], sequences[caption, :width], 0).astype(np.int32)
    return caption, tokens, (prefix - 1).astype(np.int32), sequences[caption, prefix].astype(np.int32)


def expansion_batches(data, matrix: np.ndarray, batch_size: int, seed: int) -> tf.data.Dataset:
    caption, tokens, last, target = expand(data.sequences)

    def permutation(epoch):
        return np.random.default_rng([seed, int(epoch)]).permutation(len(caption)).astype(np.int64)

    def gather(index):
        features = np.asarray(matrix[data.feature_rows[caption[index]]], dtype=np.float32)
        return features, tokens[index], last[index], target[index]

    def to_inputs(index):
        features, toks, pos, y = tf.numpy_function(gather, [index], (tf.float32, tf.int32, tf.int32, tf.int32))
        features.set_shape((None, FEATURE_DIM))
        toks.set_shape((None, tokens.shape[1]))
        pos.set_shape((None,))
        y.set_shape((None,))
        return {"features": features, "tokens": toks, "last": pos}, y

    order = tf.data.Dataset.range(np.iinfo(np.int64).max).flat_map(
        lambda epoch: tf.data.Dataset.from_tensor_slices(tf.numpy_function(permutation, [epoch], tf.int64)))
    return order.batch(batch_size).map(to_inputs).prefetch(tf.data.AUTOTUNE), len(caption), tokens.shape[1]


def expansion_model(decoder: keras.Model, width: int) -> keras.Model:
    """build_decoder's layers, predicting only the word after the last real token of each prefix."""
    features = keras.Input((FEATURE_DIM,), name="features")
    tokens = keras.Input((width,), dtype="int32", name="tokens")
    last = keras.Input((), dtype="int32", name="last")
    body = keras.Model(decoder.input, decoder.get_layer("dropout").output)
    hidden = body({"features": features, "tokens": tokens})
    at_last = keras.ops.einsum("bt,btu->bu", keras.ops.one_hot(last, width), hidden)
    logits = decoder.get_layer("logits")(at_last)
    model = keras.Model({"features": features, "tokens": tokens, "last": last}, logits)
    model.compile(optimizer=new_optimizer(), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")])
    return model


def run(workdir: Path, n_images: int, pairs: int) -> dict:
    _, store, vocab, data = decoder_data(workdir, n_images)
    batch_size, seed = OPTIONS["batch_size"], OPTIONS["seed"]
    ours = new_decoder(vocab, store, data)
    compile_decoder(ours, new_optimizer())
    ours_batches = training_batches(data, store.matrix, batch_size, seed, first_epoch=0)
    ours_steps = math.ceil(len(data) / batch_size)
    expansion_data, samples, width = expansion_batches(data, store.matrix, batch_size, seed)
    expansion = expansion_model(new_decoder(vocab, store, data), width)
    expansion_steps = math.ceil(samples / batch_size)

    # Our epochs are ~k times shorter: time k of them per turn, so both turns last about as long
    # and a burst of load from other jobs weighs on both alike.
    k = max(1, round(expansion_steps / ours_steps))
    sides = {"ours": lambda epochs=k: epoch_seconds(ours, ours_batches, ours_steps, epochs),
             "expansion": lambda epochs=1: epoch_seconds(expansion, expansion_data, expansion_steps, epochs)}
    first_epoch = {name: side(1) for name, side in sides.items()}  # traces the train steps: left out
    wall, cpu = {name: [] for name in sides}, {name: [] for name in sides}
    for pair in range(pairs):  # one turn of each, adjacent in time; alternate which goes first
        for name in (("ours", "expansion") if pair % 2 == 0 else ("expansion", "ours")):
            seconds, cpu_seconds = sides[name]()
            wall[name].append(seconds)
            cpu[name].append(cpu_seconds)
    per_pair = [e / o for o, e in zip(wall["ours"], wall["expansion"], strict=True)]
    return {"train_speedup": {
        "value": median(per_pair),
        "cpu_time_value": median([e / o for o, e in zip(cpu["ours"], cpu["expansion"], strict=True)]),
        "seconds_per_epoch": {"ours": median(wall["ours"]), "expansion": median(wall["expansion"])},
        "raw": {"epoch_seconds": wall, "speedup_per_pair": per_pair, "first_epoch_seconds": first_epoch,
                "ratio_of_median_epochs": median(wall["expansion"]) / median(wall["ours"]),
                "epoch_cpu_seconds": cpu,
                "captions": len(data), "expansion_samples": samples, "expansion_padded_length": width,
                "ours_epochs_per_turn": k, "ours_steps_per_epoch": ours_steps,
                "expansion_steps_per_epoch": expansion_steps,
                "batch_size": batch_size, "units": OPTIONS["units"], "vocab": len(vocab)},
    }}
