"""Self-critical sequence training (SCST): after cross-entropy, fine-tune the decoder on CIDEr-D itself.

Why: cross-entropy teaches the next word of one reference at a time, always from the reference's own
previous words (teacher forcing), while captions are then written from the model's own words and judged
whole by CIDEr-D. SCST (Rennie et al. 2017, the usual second training stage of captioners since) samples
captions from the model and makes those that score above a baseline more probable and those below less
(REINFORCE). The baseline is the mean reward of the image's other samples (Luo 2020, "A better variant
of self-critical sequence training"): no extra greedy decode, and it does not depend on the sample it
judges. The reward is CIDEr-D against the image's training references, n-grams weighted by the training
captions' document frequencies: `consensus.NgramStatistics`, the utility the consensus rerank uses.

Dropout is off while sampling and in the gradient (training=False), so the probabilities that move are
those of the distribution the captions were drawn from; L1 stays in the loss. Samples follow the
decoding rules (no <pad>/<start>/<unk>, no empty caption; decode.word_rules) and the gradient uses the
same masked distribution.

Kill-safe like cross-entropy training (checkpoints.py): after every epoch the weights, the optimizer's
state and the history are written to `scst/` in the run's checkpoint folder, the state file last. The
image order of epoch e comes from (seed, e) and the samples of its batch b from (seed, e, b), so a
resumed run ends with the numbers of an uninterrupted one. A checkpoint is resumed only when it grew
from the same weights (the cross-entropy run's fingerprint and kept epoch) with the same SCST params.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from captioning.checkpoints import (
    DAMAGED_FILE_ERRORS,
    SCST_KNOBS,
    clear_checkpoints,
    commit,
    non_finite,
    of_member,
    remove_partial_writes,
    resume_state,
    save_file,
    starting_over,
)
from captioning.consensus import NgramStatistics
from captioning.decode import Captioner, word_rules
from captioning.errors import UserError, one_line
from captioning.feature_files import FeatureStore, first_few, nonfinite_rows
from captioning.params import TrainConfig, check_values
from captioning.tf_setup import keras, tf
from captioning.timing import Stopwatch
from captioning.vocab import PAD_ID, START_ID, Vocabulary

SCST_DIR = "scst"  # inside a run's checkpoint folder


@dataclass
class RewardSet:
    """The training images SCST samples for: their feature rows and references as CIDEr-D vectors."""

    feature_rows: np.ndarray  # int64 (images,)
    references: list[list[tuple]]  # per image, NgramStatistics.vector of each reference
    statistics: NgramStatistics

    @classmethod
    def build(cls, seen_captions: pd.DataFrame, store: FeatureStore, statistics: NgramStatistics) -> RewardSet:
        """From the training captions of images that have features (the corpus of `statistics`)."""
        groups = list(seen_captions.groupby("image", sort=True)["caption"])
        return cls(store.rows([image for image, _ in groups]),
                   [[statistics.vector(caption) for caption in captions] for _, captions in groups], statistics)

    def __len__(self) -> int:
        return len(self.feature_rows)

    def rewards(self, captions: list[str], images: np.ndarray) -> np.ndarray:
        """CIDEr-D of each caption against the references of its image (an index into this set)."""
        return np.array([self.statistics.cider_of_vector(self.statistics.vector(caption), self.references[image])
                         for caption, image in zip(captions, images, strict=True)], np.float32)


def _resumed(model: keras.Model, optimizer, folder: Path, state: dict) -> bool:
    """Load a checkpoint's weights and optimizer state; False (and one line) when its files are damaged,
    with the model and optimizer as they were (a load may fail half-way)."""
    before = model.get_weights(), [variable.numpy() for variable in optimizer.variables]
    try:
        model.load_weights(folder / state["weights_file"])
        with np.load(folder / state["optimizer_file"], allow_pickle=False) as stored:
            for variable, value in zip(optimizer.variables, (stored[f"arr_{i}"] for i in range(len(stored))),
                                       strict=True):
                variable.assign(value)
    except DAMAGED_FILE_ERRORS as err:
        model.set_weights(before[0])
        for variable, value in zip(optimizer.variables, before[1], strict=True):
            variable.assign(value)
        starting_over(folder / state["weights_file"], one_line(err))
        return False
    return True


def fine_tune(model: keras.Model, vocab: Vocabulary, rewards: RewardSet, features: FeatureStore | np.ndarray,
              config: TrainConfig, checkpoint_dir: Path, origin: dict, member: tuple[int, int] = (1, 1)) -> dict:
    """Run `config.scst_epochs` epochs of SCST on `model` in place, resuming a checkpoint of this very run;
    return the history ({"epochs", "rewards": mean sample reward per epoch, "seconds"}).

    `features`: the FeatureStore the reward set was built from, or its feature matrix. `origin` identifies
    the weights the model starts from (the cross-entropy run's fingerprint, kept epoch); `member` (k, K): the
    model is ensemble member k of K (train.ensemble), for what a stop says to do.
    """
    check_inputs(model, vocab, rewards, features, config)
    matrix = _matrix_of(features)
    folder = checkpoint_dir / SCST_DIR
    folder.mkdir(parents=True, exist_ok=True)
    remove_partial_writes(folder)
    optimizer = keras.optimizers.Adam(learning_rate=config.scst_learning_rate, clipnorm=config.clipnorm)
    optimizer.build(model.trainable_variables)
    print_fingerprint = _fingerprint(config, origin)
    fresh = {"fingerprint": print_fingerprint, "epoch": 0, "rewards": [], "seconds": 0.0, "sha256": {}}
    state = resume_state(folder, print_fingerprint, config.scst_epochs,
                         required=("weights_file", "optimizer_file"), optional=(), fresh=fresh)
    if state and not _resumed(model, optimizer, folder, state):
        state = None
    if state:
        print(f"SCST: resuming from the checkpoint after epoch {state['epoch']}", flush=True)
    else:
        clear_checkpoints(folder)
        state = fresh
    captioner = Captioner(model, vocab)  # shares the model's layers: every update is sampled from at once
    step = _gradient_step(model, optimizer, len(vocab))
    samples = config.scst_samples
    for epoch in range(state["epoch"], config.scst_epochs):
        watch = Stopwatch()
        order = np.random.default_rng([config.seed, epoch]).permutation(len(rewards))
        epoch_rewards = []
        for batch, first in enumerate(range(0, len(order), config.scst_batch_images)):
            images = np.repeat(order[first:first + config.scst_batch_images], samples)
            features = np.asarray(matrix[rewards.feature_rows[images]], np.float32)
            seeds = np.random.default_rng([config.seed, epoch, batch]).integers(0, 2**31 - 1, (config.max_length, 2))
            ids = captioner.sample_ids(features, seeds)
            reward = rewards.rewards([vocab.decode(row) for row in ids], images).reshape(-1, samples)
            baseline = (reward.sum(axis=1, keepdims=True) - reward) / (samples - 1)
            loss, norm = step(tf.constant(features), tf.constant(ids), tf.constant((reward - baseline).reshape(-1)))
            stop_if_diverged(epoch + 1, batch + 1, {"loss": float(loss), "mean reward": float(reward.mean()),
                                                    "weight norm": float(norm)}, config.scst_epochs, member)
            epoch_rewards.append(reward.ravel())
        seconds = watch.elapsed
        state["epoch"] = epoch + 1
        state["rewards"].append(float(np.mean(np.concatenate(epoch_rewards))))
        state["seconds"] += seconds
        _checkpoint(folder, state, model, optimizer)
        print(f"SCST epoch {epoch + 1}: mean sampled caption CIDEr-D {state['rewards'][-1]:.4f} on the training "
              f"images, {seconds:.1f} s", flush=True)
    print(f"SCST: {state['epoch']} epochs, {state['seconds']:.1f} s", flush=True)
    return {"epochs": state["epoch"], "rewards": state["rewards"], "seconds": round(state["seconds"], 2)}


# The knobs fine_tune reads, checked by params.yaml's own rules: a config made in code skips read_section.
CHECKED_KNOBS = ("seed", "max_length", "clipnorm", *SCST_KNOBS)


def _matrix_of(features: FeatureStore | np.ndarray) -> np.ndarray:
    return features.matrix if isinstance(features, FeatureStore) else features


def check_inputs(model: keras.Model, vocab: Vocabulary, rewards: RewardSet, features: FeatureStore | np.ndarray,
                 config: TrainConfig) -> None:
    """One line for what a caller of fine_tune other than the pipeline (the notebook, a user's script) may get
    wrong, instead of a TensorFlow traceback deep in sampling: NaN/inf features make NaN word probabilities,
    and sampling from them draws word ids outside the vocabulary. A FeatureStore (the pipeline's) refused
    them when it opened, over its whole read-only matrix; a bare matrix has the rows SCST reads checked here."""
    check_values(asdict(config), "train", CHECKED_KNOBS, source="fine_tune's config")
    matrix = _matrix_of(features)
    if model.output.shape[-1] != len(vocab):
        raise UserError(f"fine_tune: the model predicts {model.output.shape[-1]} words but the vocabulary has "
                        f"{len(vocab)}: pass the vocabulary the model was trained with.")
    rows, width = np.asarray(rewards.feature_rows), model.inputs[0].shape[-1]
    if len(rows) == 0:
        raise UserError("fine_tune: the reward set has no training images: build it from training captions "
                        "whose images have features (RewardSet.build).")
    if np.ndim(matrix) != 2 or matrix.shape[1] != width or rows.min() < 0 or rows.max() >= len(matrix):
        raise UserError(f"fine_tune: the features (shape {np.shape(matrix)}) do not hold the rows the reward set "
                        f"names ({rows.min()}..{rows.max()}) with the model's {width} features each: pass the "
                        "feature matrix the reward set was built from.")
    bad = [] if isinstance(features, FeatureStore) else nonfinite_rows(matrix, rows)
    if bad:
        raise UserError(f"fine_tune: feature rows {first_few([str(row) for row in bad])} ({len(bad)} of the "
                        f"{len(rows)} the reward set names) hold NaN or inf, so the sampled words' probabilities "
                        "would be NaN. Pass finite features (extract them again: `dvc repro -f "
                        "extract_resnet_features`).")


def _gradient_step(model: keras.Model, optimizer: keras.optimizers.Optimizer, vocab_size: int):
    """One REINFORCE step: minimise -mean(advantage * log p(sampled caption)) + L1; return the loss and
    the updated weights' global norm (NaN or inf once any weight is: the next sampling would fail on them)."""
    banned, no_end = (tf.constant(mask) for mask in word_rules(vocab_size))

    @tf.function(autograph=False, reduce_retracing=True)
    def step(features, ids, advantages):
        tokens = tf.concat([tf.fill([tf.shape(ids)[0], 1], START_ID), ids[:, :-1]], axis=1)
        first_word = tf.one_hot(0, tf.shape(ids)[1])[:, None] * no_end[None, :]  # (time, vocab)
        with tf.GradientTape() as tape:
            logits = model({"features": features, "tokens": tokens}, training=False)
            log_probs = tf.nn.log_softmax(logits + banned + first_word)
            chosen = tf.gather(log_probs, ids[:, :, None], batch_dims=2)[:, :, 0]
            caption_log_prob = tf.reduce_sum(chosen * tf.cast(tf.not_equal(ids, PAD_ID), tf.float32), axis=1)
            loss = tf.add_n([-tf.reduce_mean(advantages * caption_log_prob), *model.losses])
        gradients = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(gradients, model.trainable_variables, strict=True))
        return loss, tf.linalg.global_norm(model.trainable_variables)

    return step


def stop_if_diverged(epoch: int, batch: int, values: dict[str, float], scst_epochs: int,
                     member: tuple[int, int] = (1, 1)) -> None:
    """Stop SCST at the first step whose loss or reward is NaN or inf, before its epoch is checkpointed.

    The step has already moved the weights, and every step after it would start from broken ones; the
    checkpoint keeps the SCST epochs before it (and the cross-entropy one the run started from), as
    checkpoints.stop_if_diverged does for cross-entropy training. In an ensemble (`member` k of K) the
    advice is for train.scst_epochs, one value for every member: the members before k finished all
    `scst_epochs`, more than the value that keeps this member's epochs, so with it they fine-tune again."""
    shown = non_finite(values)
    if shown is None:
        return
    done, (number, members) = epoch - 1, member
    keep = (f"train.scst_epochs: {done} finishes with the {done} SCST epoch(s) before it, which the checkpoint keeps"
            if done else f"train.scst_epochs: 0 keeps the cross-entropy model{'s' if members > 1 else ''}")
    if done and number > 1:
        keep += (f" (for every member: the {number - 1} before it, which ran all {scst_epochs}, then fine-tune "
                 f"again for {done} from their cross-entropy weights)")
    raise UserError(f"SCST fine-tuning{of_member(member)} diverged in epoch {epoch}, step {batch}: {shown}. Lower "
                    "train.scst_learning_rate or train.clipnorm and train again (non-finite features do this too), "
                    f"or {keep}.")


def _fingerprint(config: TrainConfig, origin: dict) -> str:
    knobs = {"learning_rate": config.scst_learning_rate, "samples": config.scst_samples,
             "batch_images": config.scst_batch_images}
    return hashlib.sha256(json.dumps({"origin": origin, "scst": knobs}, sort_keys=True).encode()).hexdigest()


def _checkpoint(folder: Path, state: dict, model: keras.Model, optimizer: keras.optimizers.Optimizer) -> None:
    """This epoch's weights and optimizer state under new names, then the state file that names them."""
    stale = [state.get("weights_file"), state.get("optimizer_file")]
    epoch = state["epoch"]
    state["weights_file"] = save_file(folder, f"epoch-{epoch:04d}.weights.h5", model.save_weights, state)
    state["optimizer_file"] = save_file(folder, f"epoch-{epoch:04d}.optimizer.npz",
                                        lambda path: np.savez(path, *[v.numpy() for v in optimizer.variables]), state)
    commit(folder, state, stale, ("weights_file", "optimizer_file"))
