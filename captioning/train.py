"""Training the decoder on whole teacher-forced sequences, resumable after a kill.

Inputs are `<start> w1 .. wn` and targets `w1 .. wn <end>` for every caption at once, with padding
masked out of the loss: one pass per caption instead of one sample per prefix (~7.7x faster per
epoch on this decoder, see bench/). Features are read per batch from a memory map, so memory does
not grow with the dataset.

Reproducible and kill-safe: the shuffle order of epoch e depends only on (seed, e), and every epoch is
checkpointed (checkpoints.py), so a rerun continues from the last finished epoch with the same numbers.
Like Keras' EarlyStopping(restore_best_weights=True), the saved model is the epoch with the lowest dev
loss (`train.restore_best_weights`), and `train.patience` stops a run that no longer improves.
With `train.scst_epochs` > 0 that model is then fine-tuned on CIDEr-D itself (self-critical training,
scst.py), checkpointed and resumable the same way.

Scaling out (train.strategy, see distribute.py): the model is built inside the strategy's scope and
only the chief writes outputs; `default` runs exactly as without a strategy.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from captioning import files, layout
from captioning.checkpoints import (
    DAMAGED_FILE_ERRORS,
    STATE_FILE,
    EpochEnd,
    clear_checkpoints,
    fingerprint,
    log_epoch,
    new_state,
    remove_partial_writes,
    replay,
    restore_rng_state,
    resume_state,
    starting_over,
    train_seconds,
)
from captioning.consensus import NgramStatistics
from captioning.distribute import (
    NullLive,
    Progress,
    check_agreement,
    make_placement,
    output_dir,
    shard_by_data,
    stop_cleanly_when_a_worker_is_lost,
    stuck_worker_deadline,
)
from captioning.errors import UserError, one_line
from captioning.feature_files import FeatureStore
from captioning.model import (
    MEMBER_PREFIX,
    build_decoder,
    compile_decoder,
    ensemble_of,
    make_optimizer,
    save_for_decoding,
)
from captioning.neighbours import NeighbourIndex
from captioning.params import TrainConfig
from captioning.scst import RewardSet, fine_tune
from captioning.tf_setup import keras, seed_everything, tf
from captioning.vocab import Vocabulary


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


def steps_per_epoch(data: CaptionSet, batch_size: int) -> int:
    return math.ceil(len(data) / batch_size)


def training_batches(data: CaptionSet, matrix: np.ndarray, batch_size: int, seed: int,
                     first_epoch: int) -> tf.data.Dataset:
    """The training batches from epoch `first_epoch` (0-based) on, exactly as an uninterrupted run has them.

    One open-ended stream of caption permutations, each drawn from (seed, epoch index), cut into batches
    without regard to where a permutation ends, as Keras' `repeat()` with `steps_per_epoch` does (fit's
    steps_per_epoch and epochs decide where it stops, and Keras never warns that the data ran out). An
    epoch is `steps_per_epoch` batches, so when the caption count is no multiple of the batch size an
    epoch starts part-way into a permutation: a resumed run skips what the epochs before it took.
    """

    def permutation(epoch):
        return np.random.default_rng([seed, int(epoch)]).permutation(len(data)).astype(np.int64)

    permutations_done, offset = divmod(first_epoch * steps_per_epoch(data, batch_size) * batch_size, len(data))
    order = tf.data.Dataset.range(permutations_done, np.iinfo(np.int64).max).flat_map(
        lambda epoch: tf.data.Dataset.from_tensor_slices(tf.numpy_function(permutation, [epoch], tf.int64))
    ).skip(offset)
    return _batches(data, matrix, order, batch_size)


def validation_batches(data: CaptionSet, matrix: np.ndarray, batch_size: int) -> tf.data.Dataset:
    return _batches(data, matrix, tf.data.Dataset.range(len(data)), batch_size)


@dataclass(frozen=True)
class TrainPaths:
    features: Path  # the extraction's folder (features.npy, index.parquet, backbone.json)
    model: Path  # the model bundle written at the end
    checkpoints: Path  # per-epoch checkpoints, for resuming after a kill
    live: Path  # DVCLive's folder
    inputs: tuple[Path, ...]  # the input files a checkpoint must match to be resumed


@dataclass
class TrainingData:
    vocab: Vocabulary
    train_set: CaptionSet
    dev_set: CaptionSet
    train_captions: pd.DataFrame
    truncated: int
    without_features: dict[str, int]  # per split ("train", "dev"): its photos that have no features


def train(config: TrainConfig, captions: pd.DataFrame, train_images: list[str], dev_images: list[str],
          paths: TrainPaths) -> dict | None:
    """Train (or resume) and save the model bundle; return the metrics for metrics/train.json.

    With train.ensemble K > 1 the members are trained one after another, member k exactly as a single
    run with seed train.seed + k - 1 (member_run), then saved as one model that decodes with their mean.
    Under train.strategy multi_worker, a worker that is not the chief writes nothing and returns None.
    """
    if config.scst_epochs and config.strategy != "default":
        raise UserError(f"train.scst_epochs runs on one machine only, and train.strategy is {config.strategy}. "
                        "Set train.strategy: default, or train.scst_epochs: 0.")
    placement = make_placement(config.strategy)  # first: a multi-worker strategy must precede other TF work
    store = FeatureStore(paths.features)
    data = prepare_data(config, captions, train_images, dev_images, store)
    seen_captions = data.train_captions[data.train_captions["image"].isin(store.row_of)]
    statistics = NgramStatistics.from_table(seen_captions)  # CIDEr-D's n-gram weights: rerank and SCST reward
    rewards = RewardSet.build(seen_captions, store, statistics) if config.scst_epochs else None
    if placement.distributed:
        print(f"strategy {placement.name}: {placement.worker}; global batch {config.batch_size}", flush=True)
    with stop_cleanly_when_a_worker_is_lost(placement), stuck_worker_deadline(placement) as placement:
        runs = []
        for member in range(config.ensemble):
            member_config, member_paths = member_run(config, paths, member)
            if config.ensemble > 1:
                print(f"ensemble member {member + 1} of {config.ensemble} (seed {member_config.seed})", flush=True)
            seed_everything(member_config.seed)
            model, state = resume_or_build(member_config, data, store, placement, member_paths)
            if member == 0:
                model.summary()
            kept = fit(model, state, member_config, data, store, placement, member_paths, (member + 1, config.ensemble))
            scst = None
            if rewards is not None:
                # The kept epoch alone names the weights SCST starts from (the last epoch's, or the best one's),
                # so more cross-entropy epochs that keep the same one (a larger train.epochs or train.patience)
                # resume SCST too.
                origin = {"fingerprint": state["fingerprint"], "kept_epoch": kept}
                scst = fine_tune(model, data.vocab, rewards, store, member_config, member_paths.checkpoints, origin,
                                 member=(member + 1, config.ensemble))
            runs.append(MemberRun(model, state, kept, scst))
        model = ensemble_of([run.model for run in runs])
        with output_dir(placement, paths.model) as model_out:
            save_bundle(model, data.vocab, store, config, model_out, statistics,
                        NeighbourIndex.from_table(seen_captions, store))
    return training_metrics(model, runs, data, store) if placement.is_chief else None


@dataclass
class MemberRun:
    """One trained decoder: its cross-entropy checkpoint state, the epoch it kept and its SCST history."""

    model: keras.Model
    state: dict
    kept: int
    scst: dict | None


def member_run(config: TrainConfig, paths: TrainPaths, member: int) -> tuple[TrainConfig, TrainPaths]:
    """The config and checkpoint folder of ensemble member `member` (from 0): a single decoder's run with
    seed train.seed + member. Member 0 is the single decoder of these params and shares its checkpoints,
    so turning an ensemble on reuses a finished single run; the others checkpoint in member_<k>/."""
    member_config = replace(config, seed=config.seed + member, ensemble=1)
    if member == 0:
        return member_config, paths
    return member_config, replace(paths, checkpoints=paths.checkpoints / f"{MEMBER_PREFIX}{member + 1}")


def prepare_data(config: TrainConfig, captions: pd.DataFrame, train_images: list[str], dev_images: list[str],
                 store: FeatureStore) -> TrainingData:
    """The vocabulary of the training captions and both splits as token sequences."""
    train_captions = captions[captions["image"].isin(set(train_images))]
    # A photo whose extraction failed has no features, so its captions are left out: counted in
    # metrics/train.json, as evaluate counts test photos.
    without_features = {split: len(store.without_features(images, split, "are left out of training", "train_lstm"))
                        for split, images in (("train", train_images), ("dev", dev_images))}
    vocab = Vocabulary.build(train_captions["caption"], config.min_count)
    train_set, truncated = caption_set(captions, train_images, store, vocab, config.max_length)
    dev_set, dev_truncated = caption_set(captions, dev_images, store, vocab, config.max_length)
    if len(train_set) == 0 or len(dev_set) == 0:
        raise UserError(f"training needs captions for both splits with features: train has {len(train_set)}, "
                        f"dev has {len(dev_set)}. Check the split files / fractions and {layout.EXTRACT_REPORT}.")
    print(f"vocabulary {len(vocab)} words (min count {config.min_count}); {len(train_set)} train and "
          f"{len(dev_set)} dev captions; {truncated + dev_truncated} longer than {config.max_length} words "
          "were truncated", flush=True)
    return TrainingData(vocab, train_set, dev_set, train_captions, truncated + dev_truncated, without_features)


def resume_or_build(config: TrainConfig, data: TrainingData, store: FeatureStore, placement,
                    paths: TrainPaths) -> tuple[keras.Model, dict]:
    """The checkpointed model and state when one fits this run, else a new compiled model."""
    if placement.is_chief:
        paths.checkpoints.mkdir(parents=True, exist_ok=True)
        remove_partial_writes(paths.checkpoints)
    print_fingerprint = fingerprint(config, list(paths.inputs), placement.strategy.num_replicas_in_sync)
    # Any epoch count: a checkpoint of more epochs than train.epochs holds the epochs of a run with it (replay)
    state = resume_state(paths.checkpoints, print_fingerprint, None, **best_weights_use(config))
    if state and config.restore_best_weights and state["best_epoch"] and not state["best_file"]:
        # A run with train.restore_best_weights: false let its damaged best-weights file go (best_weights_use);
        # this run ends with the best epoch's weights, which are no longer to be had.
        state = starting_over(paths.checkpoints / STATE_FILE, f"the weights of its best epoch ({state['best_epoch']}) "
                              "were dropped by a run with train.restore_best_weights: false")
    if state:  # it may come from a run of another train.epochs or train.patience
        state = replay(paths.checkpoints, state, config.epochs, config.patience, config.restore_best_weights)
    # Read the model file BEFORE the workers compare their starting epochs: a damaged file means
    # starting over, and a worker deciding that after the agreement would train from epoch 0 while the
    # others resume. Outside the strategy's scope, so this load runs no collective op. The best epoch's
    # weights, loaded once training ends, resume_state has already checked against their sha256.
    model = load_checkpoint(paths.checkpoints, state) if state else None
    if model is None:
        state = None
    check_agreement(placement, print_fingerprint, state["epoch"] if state else 0)
    with placement.scope():
        if state:
            if placement.distributed:  # the strategy's variables must be created inside its scope
                model = load_checkpoint(paths.checkpoints, state)
                if model is None:  # the file changed since it was read: the workers' agreement no longer holds
                    raise UserError(f"{paths.checkpoints / state['model_file']} changed while training started; "
                                    "run again.")
            print(f"resuming from the checkpoint after epoch {state['epoch']}", flush=True)
            return model, state
        if placement.is_chief:
            clear_checkpoints(paths.checkpoints)
        # Reading a checkpoint that proved damaged built layers, which drew from the global RNG: seed again
        # so that starting over builds the very model of a run that had no checkpoint.
        seed_everything(config.seed)
        mean, variance = feature_moments(store.matrix, data.train_set.feature_rows)
        model = build_decoder(len(data.vocab), config.units, config.l1, config.dropout, mean, variance)
        compile_decoder(model, make_optimizer(config.optimizer, config.learning_rate, config.clipnorm))
        return model, new_state(print_fingerprint)


def best_weights_use(config: TrainConfig) -> dict:
    """How resume_state treats the best epoch's weights file: needed to resume when training ends by
    loading it (train.restore_best_weights), else spare, so a damaged one does not mean starting over."""
    if config.restore_best_weights:
        return {"optional": ("best_file",)}
    return {"optional": (), "spare": {"best_file": "train.restore_best_weights is false, so the best epoch's "
                                                   "weights are not needed; training resumes without them"}}


def load_checkpoint(folder: Path, state: dict) -> keras.Model | None:
    """The checkpoint's compiled model with its dropout RNG state, or None (and one line) when its file
    is damaged."""
    try:
        model = keras.models.load_model(folder / state["model_file"])
        restore_rng_state(model, state["rng_state"])
    except DAMAGED_FILE_ERRORS as err:
        starting_over(folder / state["model_file"], one_line(err))
        return None
    return model


def fit(model: keras.Model, state: dict, config: TrainConfig, data: TrainingData, store: FeatureStore,
        placement, paths: TrainPaths, member: tuple[int, int] = (1, 1)) -> int:
    """Run the remaining epochs (checkpointing each), then keep the best epoch's weights if asked;
    return the epoch whose weights the model now holds. `member` (k, K): ensemble member k of K; DVCLive's
    curves are member 1's, the single decoder of its params (the others print theirs)."""
    live = open_live(paths.live) if placement.is_chief and member[0] == 1 else NullLive()
    for record in state["history"]:  # rebuild the curves of epochs done before a resume
        log_epoch(live, record)
    steps = steps_per_epoch(data.train_set, config.batch_size)
    with output_dir(placement, paths.checkpoints) as checkpoint_out:  # batches are global: a strategy splits them
        if not state["stopped_early"]:
            model.fit(
                shard_by_data(training_batches(data.train_set, store.matrix, config.batch_size, config.seed,
                                               state["epoch"]), placement),
                validation_data=shard_by_data(validation_batches(data.dev_set, store.matrix, config.batch_size),
                                              placement),
                epochs=config.epochs, initial_epoch=state["epoch"], steps_per_epoch=steps,
                callbacks=[EpochEnd(live, checkpoint_out, state, config.patience, member),
                           *([Progress(placement)] if placement.name == "multi_worker" else [])],
                verbose=2, shuffle=False,
            )
        kept = state["epoch"]
        if config.restore_best_weights and state["best_file"]:
            kept = state["best_epoch"]
            best = checkpoint_out / state["best_file"]
            if not best.is_file():  # another worker's folder holds the epochs it ran; a resumed run's
                best = paths.checkpoints / state["best_file"]  # earlier best is in the shared checkpoints
            model.load_weights(best)
            print(f"kept the weights of epoch {state['best_epoch']} (lowest val loss "
                  f"{state['best_val_loss']:.4f}) of {state['epoch']}", flush=True)
    live.end()
    print(f"total training time: {train_seconds(state):.1f} s over {state['epoch']} epochs", flush=True)
    return kept


def training_metrics(model: keras.Model, runs: list[MemberRun], data: TrainingData, store: FeatureStore) -> dict:
    """metrics/train.json: the numbers of the epoch whose weights were saved, and how training went. For
    an ensemble the losses and accuracies are its members' means, and `members` has each member's."""
    members = [member_metrics(run) for run in runs]
    metrics = members[0] if len(members) == 1 else {
        **{key: float(np.mean([m[key] for m in members])) if all(m[key] is not None for m in members) else None
           for key in ("loss", "val_loss", "accuracy", "val_accuracy", "final_val_loss")},
        "train_seconds": round(sum(m["train_seconds"] for m in members), 2), "members": members,
    }
    return {
        **metrics,
        "vocab_size": len(data.vocab), "train_captions": len(data.train_set), "dev_captions": len(data.dev_set),
        "truncated_captions": data.truncated,
        "train_images_without_features": data.without_features["train"],
        "dev_images_without_features": data.without_features["dev"],
        "parameters": int(model.count_params()),
        "ensemble": len(runs),
        "features_backbone": store.spec.backbone,
        "features_weights": store.spec.weights,
    }


def member_metrics(run: MemberRun) -> dict:
    """One decoder's training: its kept epoch's numbers, how many epochs ran, whether it stopped early,
    and after SCST its epochs and mean sampled-caption reward per epoch (`train_seconds` counts both, and only the
    epochs of this run: a run replayed from a longer checkpoint counts the seconds of the epochs it kept)."""
    history = run.state["history"]
    record = history[run.kept - 1] if history else {}
    scst_seconds = run.scst["seconds"] if run.scst else 0.0
    return {
        "loss": record.get("loss"), "val_loss": record.get("val_loss"),
        "accuracy": record.get("accuracy"), "val_accuracy": record.get("val_accuracy"),
        "kept_epoch": run.kept, "epochs": run.state["epoch"], "stopped_early": run.state["stopped_early"],
        "final_val_loss": history[-1].get("val_loss") if history else None,
        "train_seconds": round(train_seconds(run.state) + scst_seconds, 2),
        **({"scst_epochs": run.scst["epochs"], "scst_rewards": run.scst["rewards"]} if run.scst else {}),
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
                statistics: NgramStatistics, neighbour_index: NeighbourIndex) -> None:
    """Everything the caption command needs: model, vocabulary, how features were made, the training
    captions' n-gram statistics that both reranks weigh n-grams by, and the training photos' features and
    captions that the neighbours rerank compares with."""
    model_dir.mkdir(parents=True, exist_ok=True)
    statistics.save(model_dir / layout.NGRAM_STATISTICS)
    neighbour_index.save(model_dir / layout.NEIGHBOUR_INDEX)
    with files.atomic_path(model_dir / layout.MODEL_FILE, suffix=".keras") as tmp:
        save_for_decoding(model, tmp)
    vocab.save(model_dir / layout.VOCAB_FILE)
    files.write_json(model_dir / layout.BACKBONE_SPEC, store.spec.to_json())
    files.write_json(model_dir / "train_config.json", asdict(config))
