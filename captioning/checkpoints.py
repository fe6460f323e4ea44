"""Kill-safe training checkpoints: resume exactly where a killed run stopped, and keep the best epoch.

After every epoch the compiled model (weights + optimizer state), the history, the dropout RNG state
and, when it improved, the best epoch's weights are written, each to a file of its own, and only
then the state file that names them (`state.json`, written atomically) with each file's sha256. A kill
at any moment leaves a state that matches its files, so a rerun with the same inputs and params
continues from the last finished epoch and ends with exactly the numbers of an uninterrupted run; a
file cut short or changed since (HDF5 weights have no checksum of their own) is not resumed.
An epoch whose loss is not finite (NaN or inf: training diverged) is neither checkpointed nor kept as
the best one: training stops there and says so.

A checkpoint is resumed only when its fingerprint matches: every param but `epochs`, the `scst_*` ones,
`restore_best_weights` and `patience`, every input file, the training code (train_lstm's code deps in
dvc.yaml), and the number of replicas. A changed epochs or patience replays the checkpoint's history to find
where a run with them from the start ends (replay).
"""
from __future__ import annotations

import hashlib
import json
import math
import zipfile
from dataclasses import asdict
from pathlib import Path

import numpy as np

from captioning import files
from captioning.errors import UserError
from captioning.tf_setup import keras
from captioning.timing import Stopwatch

STATE_FILE = "state.json"  # written last: names the files of the last finished epoch
# The code that decides what a checkpoint means: a change here must not resume an old checkpoint.
# tests/test_layout.py checks that this is exactly the code train_lstm lists among its deps in dvc.yaml.
TRAINING_CODE = [Path(__file__).with_name(name) for name in (
    "checkpoints.py", "consensus.py", "decode.py", "distribute.py", "errors.py", "feature_files.py", "files.py",
    "layout.py", "model.py", "neighbours.py", "params.py", "scst.py", "text.py", "tf_setup.py", "timing.py", "train.py",
    "vocab.py")]
# The self-critical stage's knobs do not change the cross-entropy run it starts from (scst.py has its own
# checkpoint), so turning it on or retuning it resumes a finished run instead of training it again.
SCST_KNOBS = ("scst_epochs", "scst_learning_rate", "scst_samples", "scst_batch_images")
# Nor do restore_best_weights and patience: every epoch is trained and checkpointed alike, and the best epoch's
# weights are saved either way; they only decide which weights the run ends with (train.fit) and when it stops
# (replay finds that epoch in a checkpoint of another patience or epochs), as in Keras' EarlyStopping.
END_KNOBS = ("restore_best_weights", "patience")
# What reading a damaged checkpoint file raises. .keras and .npz files are zip archives, and a damaged
# one raises zipfile.BadZipFile ("Bad CRC-32", "File is not a zip file"), which is no OSError.
DAMAGED_FILE_ERRORS = (OSError, ValueError, KeyError, TypeError, RuntimeError, zipfile.BadZipFile)


def fingerprint(config, inputs: list[Path], replicas: int = 1) -> str:
    """What a checkpoint must match to be resumed (see the module docstring)."""
    knobs = {**asdict(config), "epochs": None, "replicas": replicas, **dict.fromkeys(SCST_KNOBS + END_KNOBS)}
    digest = hashlib.sha256(json.dumps(knobs, sort_keys=True).encode())
    for path in [*inputs, *TRAINING_CODE]:
        digest.update(files.sha256(path).encode())
    return digest.hexdigest()


def new_state(print_fingerprint: str) -> dict:
    """The state of a run that has trained no epoch yet. `epoch_seconds`: each epoch's training time, so that a
    replayed run (replay) counts the seconds of its own epochs only."""
    return {"fingerprint": print_fingerprint, "epoch": 0, "epoch_seconds": [], "history": [],
            "best_epoch": None, "best_val_loss": None, "best_file": None, "stopped_early": False, "sha256": {}}


class EpochEnd(keras.callbacks.Callback):
    """After each epoch: add to the history, log to DVCLive, keep the best weights, stop early when
    val_loss has not improved for `patience` epochs (0: never), checkpoint atomically. `member` (k, K): the
    run is ensemble member k of K (train.ensemble), for what a stop says to do."""

    def __init__(self, live, checkpoint_dir: Path, state: dict, patience: int = 0, member: tuple[int, int] = (1, 1)):
        super().__init__()
        self.live, self.checkpoint_dir, self.state, self.patience = live, checkpoint_dir, state, patience
        self.member = member
        self.epoch_watch = Stopwatch()

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch_watch.restart()

    def on_epoch_end(self, epoch, logs=None):
        seconds = self.epoch_watch.elapsed
        record = {key: float(value) for key, value in (logs or {}).items()}
        stop_if_diverged(epoch + 1, record, self.state, self.member)
        state = self.state
        state["history"].append(record)
        state["epoch_seconds"].append(seconds)
        state["epoch"] = epoch + 1
        log_epoch(self.live, record)
        stale = [state.get("model_file")]
        state["model_file"] = save_file(self.checkpoint_dir, f"epoch-{epoch + 1:04d}.keras", self.model.save, state)
        val_loss = record["val_loss"]
        if is_new_best(val_loss, state["best_val_loss"]):
            stale.append(state["best_file"])
            state.update(best_epoch=epoch + 1, best_val_loss=val_loss,
                         best_file=save_file(self.checkpoint_dir, f"best-{epoch + 1:04d}.weights.h5",
                                             self.model.save_weights, state))
        if patience_ran_out(state["epoch"], state["best_epoch"], self.patience):
            state["stopped_early"] = True
            self.model.stop_training = True
        state["rng_state"] = rng_state(self.model)
        commit(self.checkpoint_dir, state, stale, ("model_file", "best_file"))
        print(f"epoch {epoch + 1}: train loss {record['loss']:.4f}, val loss {val_loss:.4f}, {seconds:.1f} s"
              f"{' (best so far)' if state['best_epoch'] == epoch + 1 else ''}", flush=True)
        if state["stopped_early"]:
            print(f"stopping early: val loss has not improved for {self.patience} epochs "
                  f"(best: epoch {state['best_epoch']})", flush=True)


def is_new_best(val_loss: float, best_val_loss: float | None) -> bool:
    """Whether an epoch with dev loss `val_loss` is the best so far, the best before it `best_val_loss` (None:
    it is the first): strictly lower, as in Keras' EarlyStopping (min_delta 0), so a tie keeps the earlier epoch.
    The one rule of EpochEnd and replay."""
    return best_val_loss is None or val_loss < best_val_loss


def patience_ran_out(epoch: int, best_epoch: int, patience: int) -> bool:
    """Whether a run with train.patience `patience` (0: never) stops after `epoch`, its best epoch so far
    `best_epoch`: the one rule of EpochEnd and replay."""
    return bool(patience) and epoch - best_epoch >= patience


def replay(checkpoint_dir: Path, state: dict, epochs: int, patience: int, restore_best_weights: bool) -> dict | None:
    """The resumed checkpoint `state` as a run with train.epochs `epochs` and train.patience `patience` from the
    start has it, or None (and one line) when its files cannot give that run's end.

    Neither knob changes an epoch's numbers (END_KNOBS; the fingerprint leaves epochs out), so the checkpoint's
    epochs are that run's up to where it ends: replay the history's dev losses with EpochEnd's rules, up to
    `epochs`. An end at the checkpoint's last epoch, or none among its epochs (a larger epochs or patience): train
    on from the last one. An end before it: that run ends there with the weights it keeps, which the checkpoint
    still holds only when they are its best epoch's (no later epoch beat it) and the run keeps the best epoch
    (train.restore_best_weights); the model file holds the last epoch's. The state file keeps every epoch, so a
    later run with a larger epochs or patience still resumes from the last one."""
    problem = _not_one_per_epoch(state)
    if problem:
        return starting_over(checkpoint_dir / STATE_FILE, problem)
    end, best_epoch, stopped = replay_end(state["history"][:epochs], patience)
    if end == state["epoch"]:
        return {**state, "stopped_early": stopped}
    why = f"train.patience {patience} stops at epoch {end}" if stopped else f"train.epochs {epochs} ends at epoch {end}"
    if not restore_best_weights or best_epoch != state["best_epoch"]:
        kept = f"epoch {end}'s" if not restore_best_weights else f"its best epoch's (epoch {best_epoch})"
        return starting_over(checkpoint_dir / STATE_FILE, f"{why} of its {state['epoch']}, and {kept} weights are no "
                             "longer kept")
    best = f"val loss has not improved since epoch {best_epoch}" if stopped else f"its best epoch: {best_epoch}"
    print(f"{'stopping early: ' if stopped else ''}{why} of the checkpoint's {state['epoch']} ({best})", flush=True)
    return {**state, "epoch": end, "history": state["history"][:end], "epoch_seconds": state["epoch_seconds"][:end],
            "stopped_early": stopped}


def _not_one_per_epoch(state: dict) -> str | None:
    """Why the state's history and epoch times are not one finite dev loss and one time per epoch done, as EpochEnd
    writes them (edited by hand: no run's), or None when they are."""
    losses = [record.get("val_loss") if isinstance(record, dict) else None for record in state["history"]]
    if len(losses) != state["epoch"] or not all(isinstance(loss, float) and math.isfinite(loss) for loss in losses):
        return "its history is not one dev loss per epoch done"
    seconds = state["epoch_seconds"]
    if len(seconds) != state["epoch"] or not all(isinstance(second, int | float) for second in seconds):
        return "its epoch_seconds are not one time per epoch done"
    return None


def replay_end(history: list[dict], patience: int) -> tuple[int, int | None, bool]:
    """Where a run whose epochs are `history` ends with train.patience `patience`: (its last epoch, its best epoch,
    whether patience stopped it), by EpochEnd's rules."""
    best_epoch = best_loss = None
    for epoch, record in enumerate(history, 1):
        if is_new_best(record["val_loss"], best_loss):
            best_epoch, best_loss = epoch, record["val_loss"]
        if patience_ran_out(epoch, best_epoch, patience):
            return epoch, best_epoch, True
    return len(history), best_epoch, False


def train_seconds(state: dict) -> float:
    """The time the state's epochs took to train, whichever runs (a kill, a resume) trained them."""
    return sum(state["epoch_seconds"])


def stop_if_diverged(epoch: int, record: dict, state: dict, member: tuple[int, int] = (1, 1)) -> None:
    """Stop training when epoch `epoch`'s loss or dev loss is NaN or inf, before anything of it is kept.

    Such an epoch can never be the best one (every comparison with NaN is false, so a NaN first epoch
    would stay "best" for good, as it does in Keras 3's EarlyStopping, whose best starts as None), and
    the epochs after it start from broken weights. So, like Keras' TerminateOnNaN(raise_error=True),
    stop at once; the checkpoint keeps the epochs before it. In an ensemble (`member` k of K) train.epochs is
    one value for every member: the members before k that ran more epochs then end there too (replay), and train
    again where the weights they would end with are no longer kept."""
    losses = non_finite({"train loss": record.get("loss", math.nan), "val loss": record.get("val_loss", math.nan)})
    if losses is None:
        return
    done = state["epoch"]
    keep = (f", or finish with the {done} epoch(s) before it, which the checkpoint keeps: train.epochs: {done}"
            if done else "")
    if done and member[0] > 1:
        keep += (" (for every member: those before it that ran more epochs end there too, or train again from epoch 1 "
                 "when the checkpoint no longer keeps the weights they would end with)")
    raise UserError(f"training{of_member(member)} diverged in epoch {epoch}: {losses}. "
                    "Lower train.learning_rate or train.clipnorm and train again (non-finite features do this "
                    f"too){keep}.")


def of_member(member: tuple[int, int]) -> str:
    """" of ensemble member k of K" for ensemble member `member` (k, K), for a message; "" for a single decoder."""
    number, members = member
    return f" of ensemble member {number} of {members}" if members > 1 else ""


def non_finite(values: dict[str, float]) -> str | None:
    """"name value, name value" when any of `values` is NaN or inf (a diverged run), else None."""
    if all(math.isfinite(value) for value in values.values()):
        return None
    return ", ".join(f"{name} {value}" for name, value in values.items())


def save_file(folder: Path, name: str, save, state: dict) -> str:
    """Write one checkpoint file with `save(path)` under its own name (never over the file the state
    names), atomically, and record its sha256 in `state` for resume_state to check; return the name."""
    with files.atomic_path(folder / name, suffix="." + name.split(".", 1)[1]) as tmp:
        save(tmp)
        state["sha256"][name] = files.sha256(tmp)
    return name


def commit(folder: Path, state: dict, stale, keys) -> None:
    """Write the state file (the commit point), naming the files of its `keys` with their sha256; then
    delete the files it named before (`stale`) that it names no more."""
    named = [state[key] for key in keys if state.get(key)]
    state["sha256"] = {name: state["sha256"][name] for name in named}
    files.write_json(folder / STATE_FILE, state)
    for name in stale:
        if name and name not in named:
            (folder / name).unlink(missing_ok=True)


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


def resume_state(checkpoint_dir: Path, print_fingerprint: str, epochs: int | None, required=("model_file",),
                 optional=("best_file",), fresh: dict | None = None,
                 spare: dict[str, str] | None = None) -> dict | None:
    """The checkpoint state to resume from, or None when there is none that fits this run: same
    fingerprint, no more epochs than `epochs` (None: any number, for a caller that replays the history of a
    longer run: replay), and the files its `required` keys name (and its
    `optional` ones, when set) all there and whole. The keys are the cross-entropy run's unless given (scst.py):
    `fresh` is the state a new run starts with, whose every key (and type, where not None) a state
    file must have; one that is unreadable or lacks them (damaged, or edited by hand) does not fit
    either, and training says so and starts over. `spare` {key: why this run does not need its file}: a
    file this run can resume without; when it is missing or damaged, one line says it is ignored (and why),
    the file goes and the state resumes without it (the key set to None)."""
    state_path = checkpoint_dir / STATE_FILE
    if not state_path.exists():
        return None
    state = _read_state(state_path, new_state(print_fingerprint) if fresh is None else fresh)
    if state is None:
        return None
    if epochs is not None and state["epoch"] > epochs:  # it holds its last epoch's state only, not an earlier one
        return starting_over(state_path, f"it has {state['epoch']} epochs done, more than the {epochs} asked for")
    spare = spare or {}
    needed = [state.get(key) or "" for key in required] + [state[key] for key in optional if state.get(key)]
    if not _inside_folder(needed + [state[key] for key in spare if state.get(key)]):
        return starting_over(state_path, "it names files outside its folder")
    for name in needed:
        problem = _not_as_written(checkpoint_dir, name, state)
        if problem:
            return starting_over(checkpoint_dir / name, problem)
    _drop_damaged_spares(checkpoint_dir, state, spare)
    return state


def _read_state(state_path: Path, fresh: dict) -> dict | None:
    """The state file's contents when they are of this run (`fresh`'s fingerprint); else None: silently when
    another run wrote it (other params, inputs or training code), with one line when it is unreadable or lacks
    one of `fresh`'s keys (or its type, where not None): damaged, or edited by hand."""
    try:
        state = files.read_json(state_path)
    except (OSError, ValueError) as err:
        return starting_over(state_path, f"unreadable: {err}")
    if isinstance(state, dict) and state.get("fingerprint") != fresh["fingerprint"]:
        # First: an older version of the training code (another fingerprint) may have written other keys
        return None
    if not isinstance(state, dict) or any(key not in state or (value is not None
                                                               and not isinstance(state[key], type(value)))
                                          for key, value in fresh.items()):
        return starting_over(state_path, "not the state this project writes")
    return state


def _inside_folder(names: list) -> bool:
    """Whether every file name a state names is a plain name inside its folder. They are read, and later deleted
    as stale: a hand-edited (or planted, on a shared folder) "../x" or "/x" must not make training delete
    other files."""
    return all(isinstance(name, str) and Path(name).name == name for name in names)


def _drop_damaged_spares(checkpoint_dir: Path, state: dict, spare: dict[str, str]) -> None:
    """For each `spare` key {key: why this run does not need its file} whose file is missing or damaged: one line
    says it is ignored (and why), the file goes (no state names it any more) and the key is set to None."""
    for key, why in spare.items():
        problem = state.get(key) and _not_as_written(checkpoint_dir, state[key], state)
        if problem:
            print(f"ignoring {checkpoint_dir / state[key]} ({problem}): {why}", flush=True)
            (checkpoint_dir / state[key]).unlink(missing_ok=True)
            state[key] = None


def _not_as_written(checkpoint_dir: Path, name: str, state: dict) -> str | None:
    """Why checkpoint file `name` is not the one the state recorded (a cut-off or changed file: HDF5
    weights would load without a word), or None when it is."""
    path = checkpoint_dir / name
    if not path.is_file():
        return "it is missing"
    if files.sha256(path) != state["sha256"].get(name):
        return "its sha256 is not the one recorded when it was written: the file was cut short or changed since"
    return None


def starting_over(path: Path, why: str) -> None:
    """A checkpoint that cannot be resumed: one line, then training starts from scratch (None)."""
    print(f"cannot resume from {path} ({why}): training starts over", flush=True)
    return None


def remove_partial_writes(checkpoint_dir: Path) -> None:
    """Delete what writes cut short by a kill left behind (files.atomic_path's temporary files,
    .<name>.<random>.tmp<suffix>): no state names them, and each can be a whole model, so without this
    every kill during a save would leave one in the folder for good."""
    for path in checkpoint_dir.glob(".*.tmp*"):
        if path.is_file():
            path.unlink(missing_ok=True)


def clear_checkpoints(checkpoint_dir: Path) -> None:
    """Forget checkpoints that do not fit this run, so they cannot be resumed by mistake later."""
    for path in checkpoint_dir.glob("*"):
        if path.is_file():
            path.unlink()
