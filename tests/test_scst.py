"""`train.scst_epochs`: self-critical fine-tuning on CIDEr-D after cross-entropy (tiny sizes).

Sampling is seeded and follows the decoding rules, fine-tuning raises the reward it optimises, a run
killed between epochs resumes to exactly the weights of an uninterrupted one, and the knobs neither
invalidate the cross-entropy checkpoint nor run under a distribution strategy."""
import copy
import itertools
import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
from helpers import (
    OVERFITTING,
    TOY_CAPTIONS,
    fit_toy_decoder,
    plain_decode,
    run_in_process,
    without_timing,
    write_feature_folder,
)

from captioning import scst
from captioning.checkpoints import fingerprint
from captioning.consensus import NgramStatistics
from captioning.decode import Captioner
from captioning.errors import UserError
from captioning.feature_files import FeatureStore
from captioning.params import read_section
from captioning.scst import RewardSet, check_inputs, fine_tune
from captioning.tiny_project import PROJECT
from captioning.train import TrainPaths, train
from captioning.vocab import END_ID, PAD_ID, START_ID, UNK_ID, Vocabulary

ORIGIN = {"fingerprint": "cross-entropy run", "kept_epoch": 2}


def config(**knobs):
    base = read_section("train", PROJECT / "params.yaml")
    toy = {"seed": 3, "max_length": 10, "clipnorm": 1.0, "scst_learning_rate": 1e-2, "scst_samples": 8,
           "scst_batch_images": 3}
    return replace(base, **{**toy, **knobs})


@pytest.fixture
def toy():
    """A decoder trained too briefly to caption the toy set well, and its rewards: each toy image's
    reference is its own caption."""
    decoder, vocab, features = fit_toy_decoder(seed=0, epochs=2)
    return decoder, vocab, features, toy_rewards()


def toy_rewards() -> RewardSet:
    statistics = NgramStatistics.from_captions([[c] for c in TOY_CAPTIONS])
    return RewardSet(np.arange(len(TOY_CAPTIONS)), [[statistics.vector(c)] for c in TOY_CAPTIONS], statistics)


@pytest.fixture(scope="module")
def untrained():
    """The toy set's decoder, never fitted and built once: fine_tune checks its inputs before any training."""
    from captioning.model import build_decoder

    vocab = Vocabulary.build(TOY_CAPTIONS, 1)
    features = np.random.default_rng(0).normal(size=(len(TOY_CAPTIONS), 32)).astype("float32")
    return build_decoder(len(vocab), 16, 1e-6, 0.2, features.mean(0), features.var(0)), vocab, features


def test_sampling_is_seeded_and_follows_the_decoding_rules(toy):
    decoder, vocab, features, _ = toy
    captioner = Captioner(decoder, vocab)
    rows = np.repeat(features, 8, axis=0)
    seeds = np.random.default_rng(0).integers(0, 2**31 - 1, (6, 2))
    ids = captioner.sample_ids(rows, seeds)
    np.testing.assert_array_equal(ids, captioner.sample_ids(rows, seeds))
    assert ids.shape == (len(rows), 6)
    assert len({tuple(row) for row in ids}) > len(features)  # draws, not one caption per image
    assert not np.array_equal(ids, captioner.sample_ids(rows, seeds + 1))
    assert (ids[:, 0] != END_ID).all()
    for row in ids:
        end = list(row).index(END_ID) if END_ID in row else len(row)
        assert not set(row[:end]) & {PAD_ID, START_ID, UNK_ID}
        assert (row[end + 1:] == PAD_ID).all()


def test_fine_tuning_raises_the_reward_it_optimises(toy, tmp_path):
    decoder, vocab, features, rewards = toy
    captioner = Captioner(decoder, vocab)

    def greedy_reward():
        captions = captioner.captions(features, **plain_decode(method="greedy", max_length=10))
        return rewards.rewards(captions, np.arange(len(captions))).mean()

    before = greedy_reward()
    history = fine_tune(decoder, vocab, rewards, features, config(scst_epochs=40), tmp_path, ORIGIN)
    assert history["epochs"] == 40 and len(history["rewards"]) == 40
    assert np.mean(history["rewards"][-5:]) > 2 * np.mean(history["rewards"][:5]), history["rewards"]
    assert greedy_reward() > before + 1.0  # the captions it writes, not only its samples, score higher


@pytest.mark.slow  # about 20 s on 2 cores
def test_a_killed_run_resumes_to_the_same_weights(toy, tmp_path, capsys):
    decoder, vocab, features, rewards = toy
    start = decoder.get_weights()
    whole = fine_tune(decoder, vocab, rewards, features, config(scst_epochs=3), tmp_path / "whole", ORIGIN)
    expected = decoder.get_weights()

    decoder.set_weights(start)  # the rerun after a kill starts again from the cross-entropy model
    fine_tune(decoder, vocab, rewards, features, config(scst_epochs=1), tmp_path / "killed", ORIGIN)
    decoder.set_weights(start)
    capsys.readouterr()
    resumed = fine_tune(decoder, vocab, rewards, features, config(scst_epochs=3), tmp_path / "killed", ORIGIN)
    assert "SCST: resuming from the checkpoint after epoch 1" in capsys.readouterr().out
    assert resumed == {**whole, "seconds": resumed["seconds"]}
    for got, want in zip(decoder.get_weights(), expected, strict=True):
        np.testing.assert_array_equal(got, want)

    decoder.set_weights(start)  # another cross-entropy run: its checkpoint is not resumed
    other = fine_tune(decoder, vocab, rewards, features, config(scst_epochs=3), tmp_path / "killed",
                      {**ORIGIN, "kept_epoch": 1})
    assert "resuming" not in capsys.readouterr().out and other["rewards"] == whole["rewards"]



def test_a_damaged_optimizer_file_means_starting_over(toy, tmp_path, capsys):
    """One damaged byte in the optimizer's checkpoint (an .npz is a zip: its CRC fails) is one line and a
    fresh start with the numbers of a run that never had a checkpoint, not a traceback."""
    decoder, vocab, features, rewards = toy
    start = decoder.get_weights()
    whole = fine_tune(decoder, vocab, rewards, features, config(scst_epochs=2), tmp_path / "whole", ORIGIN)
    decoder.set_weights(start)
    fine_tune(decoder, vocab, rewards, features, config(scst_epochs=1), tmp_path / "killed", ORIGIN)
    state = json.loads((tmp_path / "killed/scst/state.json").read_text())
    path = tmp_path / "killed/scst" / state["optimizer_file"]
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2] + bytes([data[len(data) // 2] ^ 0xFF]) + data[len(data) // 2 + 1:])
    decoder.set_weights(start)
    capsys.readouterr()
    again = fine_tune(decoder, vocab, rewards, features, config(scst_epochs=2), tmp_path / "killed", ORIGIN)
    said = capsys.readouterr().out
    assert "cannot resume from" in said and "training starts over" in said and "resuming" not in said
    assert again["rewards"] == whole["rewards"]

def test_a_diverged_scst_step_stops_with_one_line_and_keeps_nothing_of_its_epoch(toy, tmp_path):
    """A NaN reward (and so a NaN loss and NaN weights) stops SCST at that step with one line naming it;
    the checkpoint keeps the epoch before it, untouched."""
    decoder, vocab, features, rewards = toy
    fine_tune(decoder, vocab, rewards, features, config(scst_epochs=1), tmp_path, ORIGIN)
    written = sorted((path.name, path.read_bytes()) for path in (tmp_path / "scst").iterdir())
    rewards.rewards = lambda captions, images: np.full(len(captions), np.nan, np.float32)
    with pytest.raises(UserError, match=r"^SCST fine-tuning diverged in epoch 2, step 1: loss nan, mean reward nan, "
                                        r"weight norm nan\. ") as raised:
        fine_tune(decoder, vocab, rewards, features, config(scst_epochs=2), tmp_path, ORIGIN)
    message = str(raised.value)
    assert "train.scst_learning_rate" in message and "train.scst_epochs: 1 finishes" in message
    assert "\n" not in message
    assert sorted((path.name, path.read_bytes()) for path in (tmp_path / "scst").iterdir()) == written


def test_a_diverged_ensemble_member_says_what_train_scst_epochs_does_to_every_member(tmp_path, monkeypatch, capsys):
    """train.scst_epochs is one value for every member, and each member counts its own SCST epochs: the advice
    after member 2 diverged named member 2's count as if it were for it alone, and following it fine-tuned
    member 1 again without a word of warning. It names the member and what the value does to the others, and
    following it does just that."""
    import captioning.train as train_module

    calls = []

    def nan_from_the_second_epoch_of_member_2(model, vocab, rewards, *args, **kwargs):
        calls.append(rewards)
        if len(calls) == 2:
            rewards, real, drawn = copy.copy(rewards), rewards.rewards, itertools.count()
            steps = -(-len(rewards) // args[1].scst_batch_images)  # one epoch's steps, then NaN
            rewards.rewards = lambda captions, images: (real(captions, images) if next(drawn) < steps
                                                        else np.full(len(captions), np.nan, np.float32))
        return fine_tune(model, vocab, rewards, *args, **kwargs)

    monkeypatch.setattr(train_module, "fine_tune", nan_from_the_second_epoch_of_member_2)
    knobs = {"ensemble": 2, "scst_epochs": 2, "scst_learning_rate": 1e-3}
    with pytest.raises(UserError, match=r"^SCST fine-tuning of ensemble member 2 of 2 diverged in epoch 2, step 1: "
                       ) as raised:
        run_in_process(tmp_path, "default", **knobs)
    message = str(raised.value)
    assert "\n" not in message and "train.scst_epochs: 1 finishes with the 1 SCST epoch(s) before it" in message
    assert "for every member: the 1 before it, which ran all 2, then fine-tune again for 1" in message

    monkeypatch.undo()
    shutil.rmtree(tmp_path / "data")  # run_in_process writes the inputs again
    capsys.readouterr()
    metrics, _ = run_in_process(tmp_path, "default", **{**knobs, "scst_epochs": 1})  # the advice
    said = capsys.readouterr().out
    assert "SCST: resuming from the checkpoint after epoch 1" in said  # member 2's, kept
    assert f"cannot resume from {tmp_path / 'checkpoints/scst/state.json'} (it has 2 epochs done" in said  # member 1
    assert [member["scst_epochs"] for member in metrics["members"]] == [1, 1]


def test_a_changed_train_epochs_that_keeps_the_same_epoch_resumes_scst(tmp_path, capsys):
    """SCST starts from the kept epoch's weights: changing train.epochs (or train.patience) when the kept epoch
    stays the same must not fine-tune again from scratch (on real photos, hours): it resumes, to the numbers of
    a run that had the new value from the start. Lowered, the cross-entropy run ends at the earlier epoch of its
    checkpoint (checkpoints.replay) and keeps the same best one."""
    knobs = {**OVERFITTING, "scst_epochs": 1, "scst_learning_rate": 1e-3}  # dev loss lowest in epoch 2 of 3
    whole = {epochs: run_in_process(tmp_path / f"whole{epochs}", "default", **{**knobs, "epochs": epochs})
             for epochs in (2, 3)}
    assert [whole[epochs][0]["kept_epoch"] for epochs in (2, 3)] == [2, 2]
    for before, after in ((2, 3), (3, 2)):  # raised, lowered
        changed = tmp_path / f"from{before}to{after}"
        shutil.copytree(tmp_path / f"whole{before}/checkpoints", changed / "checkpoints")
        capsys.readouterr()
        resumed, weights = run_in_process(changed, "default", **{**knobs, "epochs": after})
        said = capsys.readouterr().out
        assert "SCST: resuming from the checkpoint after epoch 1" in said and "starts over" not in said, said
        assert without_timing(resumed) == without_timing(whole[after][0]) and resumed["epochs"] == after
        for mine, theirs in zip(weights, whole[after][1], strict=True):
            np.testing.assert_array_equal(mine, theirs)


def nan_in(features):
    features[1, 3] = np.nan


def inf_in(features):
    features[2, 0] = -np.inf


@pytest.mark.parametrize("spoil, knobs, words", [
    (nan_in, {}, r"^fine_tune: feature rows 1 \(1 of the 4 the reward set names\) hold NaN or inf"),
    (inf_in, {}, r"^fine_tune: feature rows 2 \(1 of the 4 .* hold NaN or inf"),
    (None, {"scst_samples": 1}, r"^fine_tune's config: train.scst_samples is 1; use a whole number >= 2"),
    (None, {"scst_batch_images": 0}, r"^fine_tune's config: train.scst_batch_images is 0; "),
], ids=["nan", "inf", "one-sample", "no-images-per-batch"])
def test_fine_tune_called_directly_checks_its_own_inputs(untrained, tmp_path, spoil, knobs, words):
    """A notebook or a user's script calls fine_tune without the pipeline's checks: NaN/inf features made a
    TensorFlow traceback deep in sampling (word ids outside the vocabulary), one sample per image a NaN
    baseline blamed on the learning rate. One line instead, before anything is written."""
    decoder, vocab, features = untrained
    features = features.copy()
    if spoil:
        spoil(features)
    with pytest.raises(UserError, match=words) as raised:
        fine_tune(decoder, vocab, toy_rewards(), features, config(scst_epochs=1, **knobs), tmp_path, ORIGIN)
    assert "\n" not in str(raised.value)
    assert not (tmp_path / "scst").exists()


def test_fine_tune_refuses_a_vocabulary_or_features_of_another_model(untrained, tmp_path):
    decoder, vocab, features = untrained
    rewards = toy_rewards()
    other = Vocabulary.build(TOY_CAPTIONS + ["a yellow star"], 1)
    with pytest.raises(UserError, match=rf"^fine_tune: the model predicts {len(vocab)} words but the vocabulary "
                                        rf"has {len(other)}: pass the vocabulary the model was trained with"):
        fine_tune(decoder, other, rewards, features, config(), tmp_path, ORIGIN)
    with pytest.raises(UserError, match=r"^fine_tune: the features \(shape \(4, 31\)\) do not hold the rows"):
        fine_tune(decoder, vocab, rewards, features[:, 1:], config(), tmp_path, ORIGIN)
    with pytest.raises(UserError, match=r"^fine_tune: the features \(shape \(3, 32\)\) do not hold the rows"):
        fine_tune(decoder, vocab, rewards, features[:3], config(), tmp_path, ORIGIN)


def test_the_pipelines_feature_store_is_not_scanned_again(untrained, tmp_path, monkeypatch):
    """The pipeline's FeatureStore refuses NaN/inf rows when it opens, over its whole (read-only) matrix, and
    fine_tune scanned the rows SCST reads a second time. Given the store it relies on that scan; given a bare
    matrix it still makes its own."""
    decoder, vocab, features = untrained
    write_feature_folder(tmp_path / "features", [f"{i}.jpg" for i in range(len(features))], features)
    store = FeatureStore(tmp_path / "features")
    scanned = []
    monkeypatch.setattr(scst, "nonfinite_rows", lambda matrix, rows: scanned.append(len(rows)) or [])
    check_inputs(decoder, vocab, toy_rewards(), store, config())
    assert scanned == []
    check_inputs(decoder, vocab, toy_rewards(), features, config())
    assert scanned == [len(features)]


def test_scst_knobs_keep_the_cross_entropy_checkpoint(tmp_path):
    inputs = [PROJECT / "params.yaml"]
    assert fingerprint(config(scst_epochs=5, scst_samples=7), inputs) == fingerprint(config(), inputs)
    assert fingerprint(config(units=7), inputs) != fingerprint(config(), inputs)


def test_scst_under_a_distribution_strategy_stops_with_a_clear_message(tmp_path):
    paths = TrainPaths(tmp_path, tmp_path / "model", tmp_path / "checkpoints", tmp_path / "live", ())
    with pytest.raises(UserError, match="train.scst_epochs runs on one machine only.*train.strategy: default"):
        train(config(scst_epochs=1, strategy="mirrored"), None, [], [], paths)
