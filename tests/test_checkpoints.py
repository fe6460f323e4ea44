"""A checkpoint state that cannot be resumed (damaged, or edited by hand) means starting over with one
line, never a traceback; a good one is resumed."""
from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest

from captioning.checkpoints import STATE_FILE, EpochEnd, is_new_best, new_state, replay, resume_state
from captioning.distribute import NullLive
from captioning.errors import UserError

FINGERPRINT = "abc"


def good_state() -> dict:
    return {**new_state(FINGERPRINT), "epoch": 2, "epoch_seconds": [1.5, 2.0], "history": [{}, {}],
            "model_file": "epoch-0002.keras", "rng_state": [],
            "sha256": {"epoch-0002.keras": hashlib.sha256(b"model").hexdigest()}}


@pytest.fixture
def checkpoints(tmp_path):
    (tmp_path / "epoch-0002.keras").write_bytes(b"model")
    return tmp_path


def test_a_good_state_is_resumed(checkpoints):
    (checkpoints / STATE_FILE).write_text(json.dumps(good_state()))
    assert resume_state(checkpoints, FINGERPRINT, epochs=5) == good_state()
    assert resume_state(checkpoints, "another run", epochs=5) is None  # another run's: not resumed, no fuss


def test_another_runs_state_of_an_older_format_is_not_resumed_without_a_word(checkpoints, capsys):
    """A state file of another fingerprint (other params, inputs or training code) is not resumed, silently, even
    when an older version of the code wrote it without a key this one writes (here: epoch_seconds): it said "not
    the state this project writes", as if it were damaged, after every update of the training code."""
    older = {key: value for key, value in good_state().items() if key != "epoch_seconds"}
    (checkpoints / STATE_FILE).write_text(json.dumps({**older, "train_seconds": 3.5, "fingerprint": "older code"}))
    assert resume_state(checkpoints, FINGERPRINT, epochs=5) is None
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("damage", [
    lambda text: text[:40],                                              # cut short
    lambda text: "null",
    lambda text: json.dumps({**json.loads(text), "epoch": "2"}),         # a number as text
    lambda text: json.dumps({k: v for k, v in json.loads(text).items() if k != "history"}),
    lambda text: "\x00\xff",
])
def test_a_damaged_state_means_starting_over_with_one_line(checkpoints, damage, capsys):
    (checkpoints / STATE_FILE).write_text(damage(json.dumps(good_state())), encoding="latin-1")
    assert resume_state(checkpoints, FINGERPRINT, epochs=5) is None
    said = capsys.readouterr().out.strip().splitlines()
    assert len(said) == 1 and said[0].startswith("cannot resume from") and said[0].endswith("training starts over")


@pytest.mark.parametrize("edit", [
    {"model_file": "../outside.keras"},
    {"best_file": "../outside.keras", "best_epoch": 1, "best_val_loss": 9.0},
    {"best_file": "ABSOLUTE"},  # replaced by the absolute path of the file outside
    {"model_file": 2},
])
def test_a_state_naming_files_outside_its_folder_is_not_resumed(tmp_path, edit, capsys):
    """The files a state names are loaded, and deleted once stale: a name reaching out of the folder
    would let a hand-edited or planted state make training delete any file it can reach."""
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    (checkpoints / "epoch-0002.keras").write_bytes(b"model")
    outside = tmp_path / "outside.keras"
    outside.write_bytes(b"someone else's file")
    edit = {key: str(outside) if value == "ABSOLUTE" else value for key, value in edit.items()}
    (checkpoints / STATE_FILE).write_text(json.dumps({**good_state(), **edit}))
    assert resume_state(checkpoints, FINGERPRINT, epochs=5) is None
    said = capsys.readouterr().out.strip().splitlines()
    assert len(said) == 1 and said[0].startswith("cannot resume from") and said[0].endswith("training starts over")


def test_asking_for_fewer_epochs_than_the_checkpoint_has_says_it_starts_over(checkpoints, capsys):
    """Such a checkpoint cannot be resumed and is replaced: the user is told, not left to find the longer
    run's checkpoint gone."""
    (checkpoints / STATE_FILE).write_text(json.dumps(good_state()))
    assert resume_state(checkpoints, FINGERPRINT, epochs=2) == good_state()
    assert resume_state(checkpoints, FINGERPRINT, epochs=1) is None
    said = capsys.readouterr().out.strip().splitlines()
    assert len(said) == 1 and "2 epochs done, more than the 1 asked for" in said[0]
    assert said[0].endswith("training starts over")


def test_a_checkpoint_file_gone_means_starting_over_with_one_line(checkpoints, capsys):
    """Training started over from epoch 1 without a word when a file its state names was deleted."""
    (checkpoints / STATE_FILE).write_text(json.dumps(good_state()))
    (checkpoints / "epoch-0002.keras").unlink()
    assert resume_state(checkpoints, FINGERPRINT, epochs=5) is None
    said = capsys.readouterr().out.strip().splitlines()
    assert said == [f"cannot resume from {checkpoints / 'epoch-0002.keras'} (it is missing): training starts over"]


@pytest.mark.parametrize("damage", [
    lambda data: data[:-1],                                    # cut short
    lambda data: data[:2] + bytes([data[2] ^ 1]) + data[3:],   # one bit changed, same size
])
def test_a_checkpoint_file_cut_short_or_changed_is_not_resumed(checkpoints, damage, capsys):
    """HDF5 weights files carry no checksum: a changed byte in the weights loads without a word. The state
    records each file's sha256 when it is written, and a file that no longer matches is not resumed."""
    (checkpoints / STATE_FILE).write_text(json.dumps(good_state()))
    model_file = checkpoints / "epoch-0002.keras"
    model_file.write_bytes(damage(model_file.read_bytes()))
    assert resume_state(checkpoints, FINGERPRINT, epochs=5) is None
    said = capsys.readouterr().out.strip().splitlines()
    assert len(said) == 1 and said[0].startswith(f"cannot resume from {model_file} (its sha256")
    assert said[0].endswith("training starts over")


@pytest.fixture(scope="module")
def tiny_model():
    from captioning.model import build_decoder, compile_decoder, make_optimizer

    features = np.zeros((2, 8), np.float32)
    model = build_decoder(10, 4, 1e-6, 0.0, features.mean(0), features.var(0) + 1)
    compile_decoder(model, make_optimizer("adam", 0.001, 1.0))
    return model


@pytest.mark.parametrize("finite_epochs, bad", [
    (0, {"loss": math.nan, "val_loss": math.nan}),  # the first epoch: "best" for good, as nothing compares lower
    (0, {"loss": 2.0, "val_loss": math.inf}),
    (2, {"loss": math.nan, "val_loss": 1.0}),       # the training loss alone: the weights are broken
])
def test_a_diverged_epoch_is_never_kept_and_stops_training_with_one_clear_line(tiny_model, tmp_path, finite_epochs,
                                                                                  bad):
    state = new_state(FINGERPRINT)
    callback = EpochEnd(NullLive(), tmp_path, state)
    callback.set_model(tiny_model)
    for epoch in range(finite_epochs):
        callback.on_epoch_end(epoch, {"loss": 3.0 - epoch, "val_loss": 3.0 - epoch})
    written = sorted((path.name, path.read_bytes()) for path in tmp_path.iterdir())
    with pytest.raises(UserError, match=rf"^training diverged in epoch {finite_epochs + 1}: train loss "
                                        rf"{bad['loss']}, val loss {bad['val_loss']}\. ") as raised:
        callback.on_epoch_end(finite_epochs, bad)
    assert "train.learning_rate" in str(raised.value) and "\n" not in str(raised.value)
    if finite_epochs:  # what the user can do with the epochs done
        assert f"finish with the {finite_epochs} epoch(s) before it, which the checkpoint keeps: train.epochs: " \
               f"{finite_epochs}" in str(raised.value)
    assert sorted((path.name, path.read_bytes()) for path in tmp_path.iterdir()) == written  # nothing of it kept
    assert state["epoch"] == finite_epochs and len(state["history"]) == finite_epochs
    assert state["best_epoch"] == (finite_epochs or None)


@pytest.mark.parametrize("member, words", [
    ((1, 3), r"^training of ensemble member 1 of 3 diverged in epoch 3: .* which the checkpoint keeps: train\.epochs: "
             r"2\.$"),  # the members after it have not trained yet
    ((2, 3), r"^training of ensemble member 2 of 3 diverged in epoch 3: .* train\.epochs: 2 \(for every member: "
             r"those before it that ran more epochs end there too, or train again from epoch 1 when the checkpoint no "
             r"longer keeps the weights they would end with\)\.$"),
])
def test_a_diverged_ensemble_member_says_which_and_what_train_epochs_does_to_the_others(tiny_model, tmp_path, member,
                                                                                        words):
    """train.epochs is one value for every member: the advice named no member, and added "(for a single decoder)",
    which in an ensemble left the user with no advice they could follow. The members before it that ran more epochs
    replay their checkpoints to that count (replay)."""
    callback = EpochEnd(NullLive(), tmp_path, new_state(FINGERPRINT), member=member)
    callback.set_model(tiny_model)
    for epoch in range(2):
        callback.on_epoch_end(epoch, {"loss": 3.0 - epoch, "val_loss": 3.0 - epoch})
    with pytest.raises(UserError, match=words):
        callback.on_epoch_end(2, {"loss": math.nan, "val_loss": 1.0})


def patience_state(val_losses: list[float], stopped_early: bool = False) -> dict:
    best = int(np.argmin(val_losses)) + 1
    return {**good_state(), "epoch": len(val_losses), "history": [{"val_loss": loss} for loss in val_losses],
            "epoch_seconds": [10.0 + epoch for epoch in range(len(val_losses))],
            "best_epoch": best, "best_val_loss": min(val_losses), "best_file": f"best-{best:04d}.weights.h5",
            "stopped_early": stopped_early}


@pytest.mark.parametrize("val_losses, patience, epochs, stopped_early", [
    ([3.0, 2.0, 2.5, 2.6], 0, 4, False),
    ([3.0, 2.0, 2.5, 2.6], 3, 4, False),  # trains on: a larger patience than the one that stopped it
    ([3.0, 2.0, 2.5, 2.6], 2, 4, True),   # stops where the checkpoint ends
    ([3.0, 2.0, 2.5, 2.6], 1, 3, True),   # stopped before: the best epoch (2) is the checkpoint's
])
def test_a_checkpoint_of_another_patience_is_the_run_with_this_one(tmp_path, val_losses, patience, epochs,
                                                                    stopped_early, capsys):
    state = patience_state(val_losses, stopped_early=True)
    resumed = replay(tmp_path, state, 4, patience, restore_best_weights=True)
    assert resumed == {**state, "epoch": epochs, "history": state["history"][:epochs],
                       "epoch_seconds": state["epoch_seconds"][:epochs], "stopped_early": stopped_early}
    assert state == patience_state(val_losses, stopped_early=True)  # the checkpoint's own state keeps every epoch


@pytest.mark.parametrize("val_losses, restore_best_weights, why", [
    ([3.0, 2.0, 2.5, 1.0], True, "its best epoch's (epoch 2) weights are no longer kept"),  # epoch 4 beat it
    ([3.0, 2.0, 2.5, 2.6], False, "epoch 3's weights are no longer kept"),  # ends with the last epoch's weights
])
def test_a_patience_stop_whose_weights_are_gone_means_starting_over_with_one_line(tmp_path, val_losses,
                                                                                    restore_best_weights, why, capsys):
    """A patience that stops before the checkpoint's last epoch ends with weights the checkpoint no longer has:
    starting over, said in one line, not an end with other weights passed off as that run's."""
    assert replay(tmp_path, patience_state(val_losses), 4, 1, restore_best_weights) is None
    said = capsys.readouterr().out.strip().splitlines()
    assert said == [f"cannot resume from {tmp_path / STATE_FILE} (train.patience 1 stops at epoch 3 of its 4, and "
                    f"{why}): training starts over"]


@pytest.mark.parametrize("history", [[{"val_loss": 2.0}], [{"val_loss": 2.0}, {}], [{"val_loss": 2.0}, 3],
                                     [{"val_loss": 2.0}, {"val_loss": "1.0"}], [{"val_loss": 2.0}, {"val_loss": None}]])
def test_a_hand_edited_history_means_starting_over_with_one_line(tmp_path, history, capsys):
    """Where train.patience would stop is read from the history's dev losses: one that is not one finite dev loss
    per epoch done (edited by hand) means starting over, not a KeyError traceback."""
    state = {**patience_state([3.0, 2.0]), "history": history}
    assert replay(tmp_path, state, 2, 1, restore_best_weights=True) is None
    said = capsys.readouterr().out.strip().splitlines()
    assert said == [f"cannot resume from {tmp_path / STATE_FILE} (its history is not one dev loss per epoch done): "
                    "training starts over"]


def test_a_new_best_epoch_is_one_rule_for_training_and_replay(tiny_model, tmp_path):
    """"Lower than the best so far" was written twice, in EpochEnd and in the replay of a history: one
    named rule now (strictly lower, as Keras' EarlyStopping: a tie keeps the earlier epoch), and both agree."""
    assert is_new_best(2.0, None) and is_new_best(1.9, 2.0)
    assert not is_new_best(2.0, 2.0) and not is_new_best(2.1, 2.0)
    val_losses = [3.0, 2.0, 2.0, 2.5]  # epoch 3 ties epoch 2: no new best, so patience 2 stops after epoch 4
    state = new_state(FINGERPRINT)
    callback = EpochEnd(NullLive(), tmp_path, state, patience=2)
    callback.set_model(tiny_model)
    for epoch, loss in enumerate(val_losses):
        callback.on_epoch_end(epoch, {"loss": loss, "val_loss": loss})
    assert state["best_epoch"] == 2 and state["stopped_early"]
    replayed = replay(tmp_path, {**state, "stopped_early": False}, 4, 2, restore_best_weights=True)
    assert replayed["best_epoch"] == 2 and replayed["stopped_early"] and replayed["epoch"] == 4


@pytest.mark.parametrize("epochs, patience, end", [
    (2, 0, 2), (3, 0, 3),  # the best epoch (2) among them: the run that had train.epochs from the start ends there
    (3, 1, 3),             # patience 1 stops after epoch 3 too: one end, said once
    (9, 0, 4),             # more epochs than the checkpoint has: trains on from its last one
])
def test_a_checkpoint_of_more_epochs_is_the_run_with_fewer(tmp_path, epochs, patience, end, capsys):
    """train.epochs below the checkpoint's epoch count trained again from epoch 1, although the checkpoint holds
    that run's epochs (epochs only decides when training stops, as in Keras): replayed to its end, with that run's
    history and epoch times (train_seconds counts its own epochs), and the best epoch the checkpoint keeps."""
    state = patience_state([3.0, 2.0, 2.5, 2.6])
    resumed = replay(tmp_path, state, epochs, patience, restore_best_weights=True)
    assert resumed == {**state, "epoch": end, "history": state["history"][:end],
                       "epoch_seconds": state["epoch_seconds"][:end], "stopped_early": bool(patience)}
    said = capsys.readouterr().out.strip().splitlines()
    assert len(said) == (end < 4) and "starts over" not in "".join(said)


@pytest.mark.parametrize("epochs, restore_best_weights, why", [
    (1, True, "its best epoch's (epoch 1) weights are no longer kept"),  # epoch 2 beat it
    (2, False, "epoch 2's weights are no longer kept"),  # ends with its last epoch's weights: the model file has 4's
])
def test_fewer_epochs_whose_weights_are_gone_mean_starting_over_with_one_line(tmp_path, epochs, restore_best_weights,
                                                                            why, capsys):
    assert replay(tmp_path, patience_state([3.0, 2.0, 2.5, 2.6]), epochs, 0, restore_best_weights) is None
    said = capsys.readouterr().out.strip().splitlines()
    assert said == [f"cannot resume from {tmp_path / STATE_FILE} (train.epochs {epochs} ends at epoch {epochs} of "
                    f"its 4, and {why}): training starts over"]


@pytest.mark.parametrize("seconds", [[1.0], [1.0, "2"], [1.0, None]])
def test_epoch_times_that_are_not_one_per_epoch_mean_starting_over_with_one_line(tmp_path, seconds, capsys):
    state = {**patience_state([3.0, 2.0]), "epoch_seconds": seconds}
    assert replay(tmp_path, state, 2, 0, restore_best_weights=True) is None
    said = capsys.readouterr().out.strip().splitlines()
    assert said == [f"cannot resume from {tmp_path / STATE_FILE} (its epoch_seconds are not one time per epoch "
                    "done): training starts over"]
