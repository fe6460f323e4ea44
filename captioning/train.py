"""Training the decoder on whole teacher-forced sequences, resumable after a kill.

Inputs are `<start> w1 .. wn` and targets `w1 .. wn <end>` for every caption at once, with padding
masked out of the loss: one pass per caption instead of one sample per prefix (~7.7x faster per
epoch on this decoder, see bench/). Features are read per batch from a memory map, so memory does
not grow with the dataset.

Reproducible and kill-safe: the shuffle order of epoch e depends only on (seed, e); after every epoch
the compiled model (weights + optimizer state) and the history are checkpointed atomically, and a
rerun with the same inputs and params continues from the last finished epoch.

Scaling out (train.strategy, see distribute.py): the model is built inside the strategy's scope and
only the chief writes outputs; `default` runs exactly as without a strategy.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from captioning import files
from captioning.consensus import FILE_NAME, NgramStatistics
from captioning.distribute import NullLive, check_agreement, make_placement, output_dir, shard_by_data
from captioning.errors import UserError
from captioning.features import FeatureStore
from captioning.model import build_decoder, compile_decoder, make_optimizer
from captioning.tf_setup import keras, seed_everything, tf
from captioning.vocab import Vocabulary

CHECKPOINT_STATE = "state.json"  # written last: names the model file of the last finished epoch


@dataclass(frozen=True)
class TrainConfig:
    seed: int
    epochs: int
    batch_size: int
    units: int
    l1: float
    dropout: float
    optimizer: str
    learning_rate: float
    clipnorm: float
    min_count: int
    max_length: int
    strategy: str = "default"  # default | mirrored | multi_worker


@dataclass
class CaptionSet:
    """Token sequences and, for each, the feature row of its image."""

    feature_rows: np.ndarray  # int64 (n,)
    sequences: np.ndarray  # int32 (n, max_length + 2)

    def __len__(self) -> int:
        return len(self.sequences)


def caption_set(captions: pd.DataFrame, images: list[str], store: FeatureStore, vocab: Vocabulary,
                max_length: int) -> tuple[CaptionSet, int]:
    """Captions of `images` that have features; returns the set and how many were truncated."""
    chosen = captions[captions["image"].isin(set(images)) & captions["image"].isin(store.row_of.keys())]
    sequences, truncated = vocab.encode_all(chosen["caption"], max_length)
    return CaptionSet(store.rows(chosen["image"]), sequences), truncated


def feature_moments(matrix: np.ndarray, rows: np.ndarray, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Mean and variance of the training images' features, in chunks (memory stays flat)."""
    rows = np.unique(rows)
    total = np.zeros(matrix.shape[1], np.float64)
    squares = np.zeros(matrix.shape[1], np.float64)
    for start in range(0, len(rows), chunk):
        block = np.asarray(matrix[rows[start:start + chunk]], dtype=np.float64)
        total += block.sum(0)
        squares += (block ** 2).sum(0)
    mean = total / len(rows)
    variance = np.maximum(squares / len(rows) - mean ** 2, 1e-6)
    return mean.astype(np.float32), variance.astype(np.float32)


def _batches(data: CaptionSet, matrix: np.ndarray, order: tf.data.Dataset, batch_size: int) -> tf.data.Dataset:
    """Turn a dataset of caption indices into ({features, tokens}, targets) batches.

    Each batch is cut to its longest caption, so short captions do not pay for max_length.
    """

    def gather(index: np.ndarray):
        sequences = data.sequences[index]
        length = int(np.max(np.count_nonzero(sequences, axis=1)))
        sequences = sequences[:, :length]
        features = np.asarray(matrix[data.feature_rows[index]], dtype=np.float32)
        return features, sequences[:, :-1], sequences[:, 1:]

    def to_inputs(index):
        features, tokens, targets = tf.numpy_function(gather, [index], (tf.float32, tf.int32, tf.int32))
        features.set_shape((None, matrix.shape[1]))
        tokens.set_shape((None, None))
        targets.set_shape((None, None))
        return {"features": features, "tokens": tokens}, targets

    return order.batch(batch_size).map(to_inputs).prefetch(tf.data.AUTOTUNE)


def training_batches(data: CaptionSet, matrix: np.ndarray, batch_size: int, seed: int,
                     first_epoch: int) -> tf.data.Dataset:
    """Epochs from first_epoch on, each shuffled by a permutation drawn from (seed, epoch).

    The stream is open-ended (fit's steps_per_epoch and epochs decide where it stops), which also
    keeps Keras from warning that the data ran out after the last epoch.
    """

    def permutation(epoch):
        return np.random.default_rng([seed, int(epoch)]).permutation(len(data)).astype(np.int64)

    order = tf.data.Dataset.range(first_epoch, np.iinfo(np.int64).max).flat_map(
        lambda epoch: tf.data.Dataset.from_tensor_slices(tf.numpy_function(permutation, [epoch], tf.int64))
    )
    return _batches(data, matrix, order, batch_size)


def validation_batches(data: CaptionSet, matrix: np.ndarray, batch_size: int) -> tf.data.Dataset:
    return _batches(data, matrix, tf.data.Dataset.range(len(data)), batch_size)


# The code that decides what a checkpoint means: a change here must not resume an old checkpoint.
TRAINING_CODE = [Path(__file__).with_name(name)
                 for name in ("train.py", "model.py", "vocab.py", "text.py", "distribute.py")]


def fingerprint(config: TrainConfig, inputs: list[Path], replicas: int = 1) -> str:
    """What a checkpoint must match to be resumed: every param but `epochs`, every input file, the
    training code, and the number of replicas (it changes how a batch is split, hence the numbers)."""
    digest = hashlib.sha256(json.dumps({**asdict(config), "epochs": None, "replicas": replicas},
                                       sort_keys=True).encode())
    for path in [*inputs, *TRAINING_CODE]:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


class EpochEnd(keras.callbacks.Callback):
    """After each epoch: add to the history, log to DVCLive, checkpoint atomically."""

    def __init__(self, live, checkpoint_dir: Path, state: dict):
        super().__init__()
        self.live, self.checkpoint_dir, self.state = live, checkpoint_dir, state
        self.started = time.perf_counter()

    def on_epoch_begin(self, epoch, logs=None):
        self.started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        seconds = time.perf_counter() - self.started
        record = {key: float(value) for key, value in (logs or {}).items()}
        self.state["history"].append(record)
        self.state["train_seconds"] += seconds
        self.state["epoch"] = epoch + 1
        log_epoch(self.live, record)
        # The model of this epoch gets its own file and the state is switched to it only afterwards,
        # so a kill at any point leaves a state that matches its model.
        model_file = f"epoch-{epoch + 1:04d}.keras"
        with files.atomic_path(self.checkpoint_dir / model_file, suffix=".keras") as tmp:
            self.model.save(tmp)
        previous = self.state.get("model_file")
        self.state["model_file"] = model_file
        self.state["rng_state"] = rng_state(self.model)
        files.write_json(self.checkpoint_dir / CHECKPOINT_STATE, self.state)
        if previous and previous != model_file:
            (self.checkpoint_dir / previous).unlink(missing_ok=True)
        print(f"epoch {epoch + 1}: train loss {record['loss']:.4f}, "
              f"val loss {record.get('val_loss', float('nan')):.4f}, {seconds:.1f} s", flush=True)


def log_epoch(live, record: dict) -> None:
    """One DVCLive step: `loss` -> train/loss, `val_loss` -> val/loss (same for accuracy)."""
    for key, value in record.items():
        split, name = ("val", key[4:]) if key.startswith("val_") else ("train", key)
        live.log_metric(f"{split}/{name}", value)
    live.next_step()


def _seed_variables(model: keras.Model) -> list:
    return [v for v in model.non_trainable_variables if "seed_generator" in v.path]


def rng_state(model: keras.Model) -> list:
    """The dropout RNG states. Keras does not save them in .keras files, so a resumed run would
    draw different dropout masks than an uninterrupted one; the checkpoint state keeps them."""
    return [v.numpy().tolist() for v in _seed_variables(model)]


def restore_rng_state(model: keras.Model, values: list) -> None:
    variables = _seed_variables(model)
    if len(variables) != len(values):
        raise RuntimeError("checkpoint RNG state does not match the model's layers")
    for variable, value in zip(variables, values, strict=True):
        variable.assign(np.asarray(value, dtype=variable.dtype))


def resume_state(checkpoint_dir: Path, print_fingerprint: str, epochs: int) -> dict | None:
    """The checkpoint state to resume from, or None when there is none that fits this run."""
    state_path = checkpoint_dir / CHECKPOINT_STATE
    if not state_path.exists():
        return None
    state = files.read_json(state_path)
    if state.get("fingerprint") != print_fingerprint or state.get("epoch", 0) > epochs:
        return None
    if not (checkpoint_dir / state.get("model_file", "")).is_file():
        return None
    return state


def clear_checkpoints(checkpoint_dir: Path) -> None:
    """Forget checkpoints that do not fit this run, so they cannot be resumed by mistake later."""
    for path in checkpoint_dir.glob("*"):
        if path.is_file():
            path.unlink()


def train(config: TrainConfig, captions: pd.DataFrame, train_images: list[str], dev_images: list[str],
          features_dir: Path, model_dir: Path, checkpoint_dir: Path, live_dir: Path,
          input_files: list[Path]) -> dict | None:
    """Train (or resume) and save the model bundle; return the metrics for metrics/train.json.

    Under train.strategy multi_worker, a worker that is not the chief writes nothing and returns None.
    """
    placement = make_placement(config.strategy)  # first: a multi-worker strategy must precede other TF work
    seed_everything(config.seed)
    store = FeatureStore(features_dir)
    train_captions = captions[captions["image"].isin(set(train_images))]
    vocab = Vocabulary.build(train_captions["caption"], config.min_count)
    train_set, truncated = caption_set(captions, train_images, store, vocab, config.max_length)
    dev_set, dev_truncated = caption_set(captions, dev_images, store, vocab, config.max_length)
    if len(train_set) == 0 or len(dev_set) == 0:
        raise UserError(f"training needs captions for both splits with features: train has {len(train_set)}, "
                        f"dev has {len(dev_set)}. Check the split files / fractions and the features report.")
    print(f"vocabulary {len(vocab)} words (min count {config.min_count}); {len(train_set)} train and "
          f"{len(dev_set)} dev captions; {truncated + dev_truncated} longer than {config.max_length} words "
          "were truncated", flush=True)

    if placement.distributed:
        print(f"strategy {placement.name}: {placement.worker}; global batch {config.batch_size}", flush=True)
    if placement.is_chief:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
    print_fingerprint = fingerprint(config, input_files, placement.strategy.num_replicas_in_sync)
    state = resume_state(checkpoint_dir, print_fingerprint, config.epochs)
    check_agreement(placement, print_fingerprint, state["epoch"] if state else 0)
    with placement.scope():
        if state:
            model = keras.models.load_model(checkpoint_dir / state["model_file"])
            restore_rng_state(model, state["rng_state"])
            print(f"resuming from the checkpoint after epoch {state['epoch']}", flush=True)
        else:
            if placement.is_chief:
                clear_checkpoints(checkpoint_dir)
            state = {"fingerprint": print_fingerprint, "epoch": 0, "train_seconds": 0.0, "history": []}
            mean, variance = feature_moments(store.matrix, train_set.feature_rows)
            model = build_decoder(len(vocab), config.units, config.l1, config.dropout, mean, variance)
            compile_decoder(model, make_optimizer(config.optimizer, config.learning_rate, config.clipnorm))
    model.summary()

    live = open_live(live_dir) if placement.is_chief else NullLive()
    for record in state["history"]:  # rebuild the curves of epochs done before a resume
        log_epoch(live, record)
    steps = math.ceil(len(train_set) / config.batch_size)
    with output_dir(placement, checkpoint_dir) as checkpoint_out:  # batches are global: a strategy splits them
        model.fit(
            shard_by_data(training_batches(train_set, store.matrix, config.batch_size, config.seed, state["epoch"]),
                          placement),
            validation_data=shard_by_data(validation_batches(dev_set, store.matrix, config.batch_size), placement),
            epochs=config.epochs, initial_epoch=state["epoch"], steps_per_epoch=steps,
            callbacks=[EpochEnd(live, checkpoint_out, state)], verbose=2, shuffle=False,
        )
    live.end()
    print(f"total training time: {state['train_seconds']:.1f} s over {state['epoch']} epochs", flush=True)

    with output_dir(placement, model_dir) as model_out:
        save_bundle(model, vocab, store, config, model_out, train_captions)
    if not placement.is_chief:
        return None
    final = state["history"][-1] if state["history"] else {}
    return {
        "loss": final.get("loss"), "val_loss": final.get("val_loss"),
        "accuracy": final.get("accuracy"), "val_accuracy": final.get("val_accuracy"),
        "train_seconds": round(state["train_seconds"], 2), "epochs": state["epoch"],
        "vocab_size": len(vocab), "train_captions": len(train_set), "dev_captions": len(dev_set),
        "truncated_captions": truncated + dev_truncated,
        "parameters": int(model.count_params()),
        "features_weights": store.spec.weights,
    }


def open_live(live_dir: Path):
    """DVCLive logger that leaves dvc.yaml alone (our dvc.yaml declares its files itself)."""
    from dvclive import Live
    from scmrepo.exceptions import SCMError

    try:
        return Live(str(live_dir), dvcyaml=False, save_dvc_exp=False, report=None, monitor_system=False)
    except SCMError as err:  # DVCLive asks git for HEAD before checking that a commit exists
        raise UserError(f"DVCLive cannot read the git repository ({err}). Make a first commit "
                        "(git add -A && git commit -m start) and run again.") from None


def save_bundle(model: keras.Model, vocab: Vocabulary, store: FeatureStore, config: TrainConfig, model_dir: Path,
                train_captions: pd.DataFrame) -> None:
    """Everything the caption command needs: model, vocabulary, how features were made, and the
    training captions' n-gram statistics that the consensus rerank weighs n-grams by."""
    model_dir.mkdir(parents=True, exist_ok=True)
    seen = train_captions[train_captions["image"].isin(store.row_of)]
    NgramStatistics.from_table(seen).save(model_dir / FILE_NAME)
    with files.atomic_path(model_dir / "model.keras", suffix=".keras") as tmp:
        model.save(tmp)
    vocab.save(model_dir / "vocab.json")
    files.write_json(model_dir / "backbone.json", store.spec.to_json())
    files.write_json(model_dir / "train_config.json", asdict(config))
