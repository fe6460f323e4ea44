"""train.strategy: two multi-worker processes on 127.0.0.1 end with the same weights and only the chief
writes outputs; `mirrored` on a CPU (one replica) trains exactly like `default`.

Synthetic features and captions keep it to a few seconds of training; most of the time is the two
processes importing TensorFlow.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from helpers import OVERFITTING, TINY_TRAIN, run_in_process, stages_env, without_timing, write_inputs

# Runs the real train_lstm stage, and also saves the final weights of every worker (the non-chief one
# writes nothing of its own) by wrapping save_bundle, which every worker calls.
WORKER = """
import sys
import numpy as np
import captioning.train as train
save_bundle = train.save_bundle
def save_and_record(model, *args, **kwargs):
    np.savez(sys.argv[1], *model.get_weights())
    save_bundle(model, *args, **kwargs)
train.save_bundle = save_and_record
from captioning.errors import run_cli
from stages.train_lstm import main
run_cli(main)
"""


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def start_workers(projects: list[Path], script: str = WORKER, **env: str) -> list[subprocess.Popen]:
    """`script` (train_lstm) on one worker per project folder (index = position), all on 127.0.0.1,
    each writing its output to log.txt in its folder; `env`: more environment variables."""
    workers = [f"127.0.0.1:{port}" for port in free_ports(len(projects))]
    processes = []
    for index, project in enumerate(projects):
        worker_env = stages_env(CUDA_VISIBLE_DEVICES="", TF_CONFIG=json.dumps(
            {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}), **env)
        with open(project / "log.txt", "w") as log:
            processes.append(subprocess.Popen([sys.executable, "-c", script, str(project / "weights.npz")],
                                              cwd=project, env=worker_env, stdout=log, stderr=subprocess.STDOUT))
    return processes


def chief_ended(processes: list[subprocess.Popen], seconds: float = 240) -> bool:
    """Whether the chief (the first process) ended within `seconds`, a bound for a hang (the old code's wait
    never ended); every worker still running after it is killed."""
    try:
        return processes[0].wait(timeout=seconds) is not None
    except subprocess.TimeoutExpired:
        return False
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()


def run_workers(projects: list[Path]) -> list[str]:
    """train_lstm on one worker per project folder; their logs, after checking that every worker succeeded."""
    processes = start_workers(projects)
    # A bound for a hang, not a timing: ~20 s alone, but 86 s (killed at the old 85) on 2 cores shared by
    # the suite's other worker and four more jobs.
    deadline = time.monotonic() + 300
    try:
        for process in processes:
            process.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    logs = [(project / "log.txt").read_text() for project in projects]
    for process, log in zip(processes, logs, strict=True):
        assert process.returncode == 0, log[-4000:]
    return logs


@pytest.mark.slow  # about 20 s on 2 cores
def test_two_workers_on_localhost_agree_and_only_the_chief_writes(tmp_path):
    projects = [tmp_path / f"machine{index}" for index in range(2)]  # one folder per "machine"
    for project in projects:
        write_inputs(project, "multi_worker")
    logs = run_workers(projects)
    assert "worker 0 of 2 workers (chief), 2 replicas in all" in logs[0]
    assert "worker 1 of 2 workers, 2 replicas in all" in logs[1]

    chief, other = ([np.load(project / "weights.npz")[f"arr_{i}"] for i in range(len(np.load(project / "weights.npz")))]
                    for project in projects)
    assert len(chief) == len(other) > 10
    for mine, theirs in zip(chief, other, strict=True):
        np.testing.assert_array_equal(mine, theirs)

    chief_dir, other_dir = projects
    metrics = json.loads((chief_dir / "metrics/train.json").read_text())
    assert metrics["epochs"] == 2 and np.isfinite(metrics["loss"])
    for output in ("data/model/model.keras", "data/model/vocab.json", "checkpoints/state.json",
                   "dvclive/plots/metrics/train/loss.tsv"):
        assert (chief_dir / output).is_file(), output
        assert not (other_dir / output).exists(), output
    assert not (other_dir / "metrics").exists() and not (other_dir / "checkpoints").exists()

    from captioning.model import keras  # registers the custom loss and metric the model file names
    saved = keras.models.load_model(chief_dir / "data/model/model.keras").get_weights()
    for mine, theirs in zip(chief, saved, strict=True):
        np.testing.assert_array_equal(mine, theirs)


@pytest.mark.slow  # about 20 s on 2 cores
def test_two_workers_resume_a_shared_checkpoint_and_still_only_the_chief_writes(tmp_path):
    """The rerun after a kill that came once every epoch was checkpointed (while saving the model): both
    workers read the shared checkpoint before agreeing, and the other worker keeps the best epoch from the
    shared folder (its own temporary one is empty) instead of failing."""
    projects = [tmp_path / f"machine{index}" for index in range(2)]
    for project in projects:
        write_inputs(project, "multi_worker")
    (projects[0] / "checkpoints").mkdir()
    (projects[1] / "checkpoints").symlink_to(projects[0] / "checkpoints")  # a shared file system
    run_workers(projects)
    shutil.rmtree(projects[0] / "data/model")  # "killed" before the model was saved
    (projects[0] / "metrics/train.json").unlink()
    shared = {path: path.stat().st_mtime_ns for path in (projects[0] / "checkpoints").rglob("*")}
    first = [np.load(project / "weights.npz") for project in projects]

    logs = run_workers(projects)
    for log in logs:
        assert "resuming from the checkpoint after epoch 2" in log and "cannot resume" not in log, log[-4000:]
    assert (projects[0] / "data/model/model.keras").is_file()
    assert not (projects[1] / "data").joinpath("model").exists() and not (projects[1] / "metrics").exists()
    assert {path: path.stat().st_mtime_ns for path in (projects[0] / "checkpoints").rglob("*")} == shared
    for project, before in zip(projects, first, strict=True):  # both hold the kept epoch of the first run
        after = np.load(project / "weights.npz")
        assert len(after) == len(before) > 10
        for index in range(len(before)):
            np.testing.assert_array_equal(after[f"arr_{index}"], before[f"arr_{index}"])

# train_lstm, but the worker whose index is argv[2] dies (as in a crash or a kill) once the workers agreed;
# or, with HOW=freeze, is frozen there (SIGSTOP: alive, but its heartbeats stop too); or, with HOW=hang, hangs
# there, alive, its heartbeats going on (as on a hung network file system).
FAILING_AFTER_AGREEMENT = """
import os, signal, sys, time
import captioning.train as train
agree = train.check_agreement
def agree_then_die(placement, *args):
    agree(placement, *args)
    if placement.worker.startswith(f"worker {sys.argv[2]} "):
        print(f"dying at {time.time()}", flush=True)
        {"freeze": lambda: os.kill(os.getpid(), signal.SIGSTOP),
         "hang": lambda: time.sleep(3600)}.get(os.environ.get("HOW"), lambda: os._exit(3))()
train.check_agreement = agree_then_die
from captioning.errors import run_cli
from stages.train_lstm import main
run_cli(main)
"""


@pytest.mark.slow  # about 40 s on 2 cores
@pytest.mark.parametrize("lost, how", [
    (0, "dies"),  # the chief, which leads TensorFlow's coordination service
    (1, "dies"),
    (0, "freezes"),  # its heartbeats time out: DeadlineExceededError, which was a traceback
])
def test_a_worker_lost_after_the_agreement_stops_the_other_with_one_clear_line(tmp_path, lost, how):
    """The other worker waits in a collective op that can never complete; TensorFlow aborts it once the lost
    worker stops sending heartbeats (or refuses connections). It must stop soon after, with one line naming
    the lost worker, not a traceback of gRPC details (nor wait forever)."""
    projects = [tmp_path / f"machine{index}" for index in range(2)]
    for project in projects:
        write_inputs(project, "multi_worker")
    processes = start_workers(projects, FAILING_AFTER_AGREEMENT.replace("sys.argv[2]", str(lost)),
                              **({"HOW": "freeze"} if how == "freezes" else {}))
    survivor = processes[1 - lost]
    try:
        survivor.wait(timeout=150)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    ended = time.time()
    log = (projects[1 - lost] / "log.txt").read_text()
    died = float(re.search(r"dying at ([\d.]+)", (projects[lost] / "log.txt").read_text())[1])
    assert ended - died < 60, log[-4000:]  # TensorFlow's heartbeats time out in about 10 s
    assert survivor.returncode == 2 and "Traceback" not in log, log[-4000:]
    errors = [line for line in log.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: worker {lost} stopped or cannot be reached, so worker "
                                                     f"{1 - lost} stops too."), log[-4000:]


@pytest.mark.slow  # about 60 s on 2 cores
def test_a_worker_stuck_after_the_agreement_stops_the_other_at_the_timeout_naming_it(tmp_path):
    """A worker that is alive but stuck once training started keeps sending heartbeats, so TensorFlow's next
    collective op on the other worker waited for it for good, without a word. The other must stop soon after
    CAPTIONING_JOIN_TIMEOUT seconds without progress, with one line naming the stuck worker and what to do."""
    projects = [tmp_path / f"machine{index}" for index in range(2)]
    for project in projects:
        write_inputs(project, "multi_worker")
    timeout = 30  # also the start-up join's: room for the two TensorFlow imports to end apart under load
    processes = start_workers(projects, FAILING_AFTER_AGREEMENT.replace("sys.argv[2]", "1"), HOW="hang",
                              CAPTIONING_JOIN_TIMEOUT=str(timeout))
    chief = processes[0]
    ended = chief_ended(processes)
    stopped = time.time()
    log = (projects[0] / "log.txt").read_text()
    stuck = float(re.search(r"dying at ([\d.]+)", (projects[1] / "log.txt").read_text())[1])
    assert ended and chief.returncode == -signal.SIGKILL and "Traceback" not in log, log[-4000:]
    assert timeout - 5 < stopped - stuck < timeout + 60, log[-4000:]  # the bound, and not long after it
    errors = [line for line in log.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(
        f"error: worker 0: training made no progress for {timeout} s, so it stops (CAPTIONING_JOIN_TIMEOUT): "
        "worker 1 is stuck while alive"), log[-4000:]
    assert "kill -9" in errors[0]


# train_lstm, but worker 1 hangs, alive (its heartbeats go on), after its strategy started and before the
# workers' agreement: as on a hung network file system while it reads its data.
STUCK_BEFORE_AGREEMENT = """
import sys, time
import captioning.train as train
agree = train.check_agreement
def hang_then_agree(placement, *args):
    if placement.worker.startswith("worker 1 "):
        print("hanging", flush=True)
        time.sleep(3600)
    agree(placement, *args)
train.check_agreement = hang_then_agree
from captioning.errors import run_cli
from stages.train_lstm import main
run_cli(main)
"""


@pytest.mark.slow  # about 40 s on 2 cores
def test_a_worker_stuck_before_the_agreement_stops_the_other_at_the_join_timeout(tmp_path):
    """TensorFlow's first collective op waits for every worker with no limit, and a stuck worker still sends
    heartbeats: the other waited for good, without a word. It must stop at CAPTIONING_JOIN_TIMEOUT after it
    got there, with one line saying what to do."""
    projects = [tmp_path / f"machine{index}" for index in range(2)]
    for project in projects:
        write_inputs(project, "multi_worker")
    timeout = 30  # also the start-up join's: room for the two TensorFlow imports to end apart under load
    processes = start_workers(projects, STUCK_BEFORE_AGREEMENT, CAPTIONING_JOIN_TIMEOUT=str(timeout))
    chief = processes[0]
    ended = chief_ended(processes)
    log = (projects[0] / "log.txt").read_text()
    assert "hanging" in (projects[1] / "log.txt").read_text()
    assert ended and chief.returncode == -signal.SIGKILL and "Traceback" not in log, log[-4000:]
    errors = [line for line in log.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(
        f"error: worker 0: not every worker reached the start of training within {timeout} s of this one, so it "
        "stops (CAPTIONING_JOIN_TIMEOUT). A worker whose output stopped"), log[-4000:]


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    return run_in_process(tmp_path_factory.mktemp("default"), "default")


def test_mirrored_on_cpu_trains_exactly_like_default(default_run, tmp_path):
    """With no GPU, MirroredStrategy has one replica (the CPU): the very same numbers as no strategy."""
    metrics, weights = run_in_process(tmp_path, "mirrored")
    assert metrics["epochs"] == 1
    assert without_timing(metrics) == without_timing(default_run[0])
    for mine, theirs in zip(weights, default_run[1], strict=True):
        np.testing.assert_array_equal(mine, theirs)


# Two logical CPUs stand in for two GPUs. Must run before TensorFlow sets up its devices: a new process.
TWO_REPLICAS = """
from captioning.tf_setup import tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
mirrored = tf.distribute.MirroredStrategy
tf.distribute.MirroredStrategy = lambda: mirrored(["/cpu:0", "/cpu:1"])
from captioning.errors import run_cli
from stages.train_lstm import main
run_cli(main)
"""


def test_mirrored_with_two_replicas_learns_like_one(default_run, tmp_path):
    """Each global batch is split in two and the gradients are averaged, not summed: without dropout the
    curves match one device's up to the per-replica averaging of the token loss."""
    write_inputs(tmp_path, "mirrored")
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    params["train"].update(epochs=1, dropout=0.0)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    result = subprocess.run([sys.executable, "-c", TWO_REPLICAS], cwd=tmp_path, capture_output=True, text=True,
                            env=stages_env(), timeout=150)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "strategy mirrored: 2 local replica(s); global batch 16" in result.stdout
    metrics, expected = json.loads((tmp_path / "metrics/train.json").read_text()), default_run[0]
    for key in ("loss", "val_loss"):  # a loss counted twice (summed gradients) would be ~2x
        assert metrics[key] == pytest.approx(expected[key], rel=0.01), key
    assert metrics["val_accuracy"] == pytest.approx(expected["val_accuracy"], abs=0.02)


def test_a_worker_waiting_for_the_others_says_so_and_stops_at_the_join_timeout(tmp_path):
    """Until every worker has started, the first one waits inside TensorFlow, which sets no time limit and
    heeds neither SIGTERM nor Ctrl-C. One line must say what it waits for and for how long, and the wait
    must end there with one line saying what to do (a worker that failed before joining, or was never
    started, left it waiting silently for good)."""
    workers = [f"127.0.0.1:{port}" for port in free_ports(2)]
    env = stages_env(CUDA_VISIBLE_DEVICES="", CAPTIONING_JOIN_TIMEOUT="5", TF_CONFIG=json.dumps(
        {"cluster": {"worker": workers}, "task": {"type": "worker", "index": 0}}))
    process = subprocess.Popen([sys.executable, "-c", "from captioning.distribute import make_placement; "
                                "make_placement('multi_worker'); print('started')"],
                               cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:  # TensorFlow's import takes a few seconds, then the 5 s limit
        out, err = process.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        process.kill()  # the old code's wait never ends
        out, err = process.communicate()
    assert out == "worker 0: waiting for all 2 workers of TF_CONFIG to start (at most 5 s, CAPTIONING_JOIN_TIMEOUT)\n"
    assert process.returncode == -signal.SIGKILL
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    assert errors[0].startswith("error: worker 0: not all 2 workers of TF_CONFIG started within 5 s, so it stops "
                                "(CAPTIONING_JOIN_TIMEOUT). Start the missing"), err


@pytest.mark.parametrize("value", ["soon", "-1", "nan"])
def test_a_join_timeout_that_is_no_number_of_seconds_is_one_clear_line(monkeypatch, value):
    from captioning.distribute import join_timeout
    from captioning.errors import UserError

    monkeypatch.setenv("CAPTIONING_JOIN_TIMEOUT", value)
    with pytest.raises(UserError, match=rf"^CAPTIONING_JOIN_TIMEOUT is '{value}': use the seconds .*\(0: no limit\)"):
        join_timeout()
    monkeypatch.setenv("CAPTIONING_JOIN_TIMEOUT", "0")
    assert join_timeout() == 0
    monkeypatch.delenv("CAPTIONING_JOIN_TIMEOUT")
    assert join_timeout() > 60  # a default that leaves a few minutes to start every worker


def test_multi_worker_without_tf_config_is_a_clear_error(monkeypatch):
    from captioning.distribute import make_placement
    from captioning.errors import UserError

    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(UserError, match="needs the TF_CONFIG environment variable"):
        make_placement("multi_worker")
    monkeypatch.setenv("TF_CONFIG", '{"cluster": {"worker": ["127.0.0.1:1"]}, "task": {"type": "worker", "index": 3}}')
    with pytest.raises(UserError, match="TF_CONFIG is not a valid cluster description"):
        make_placement("multi_worker")


@pytest.mark.parametrize("cluster, words", [
    (["127.0.0.1:1"], "cluster must be a JSON object"),  # was an AttributeError traceback
    ({"worker": ["127.0.0.1:1"], "ps": ["127.0.0.1:2"]}, "cluster role 'ps'"),  # was a hang: no ps ever joins
    ({"worker": ["localhost"]}, 'address "localhost" is not "host:port"'),  # was a gRPC traceback
    ({"worker": [12345]}, 'address 12345 is not "host:port"'),  # was a TypeError traceback
    ({"chief": ["127.0.0.1:1", "127.0.0.1:2"], "worker": ["127.0.0.1:3"]}, "at most one chief"),
])
def test_a_tf_config_tensorflow_cannot_run_is_one_clear_line_before_tensorflow_sees_it(monkeypatch, cluster, words):
    from captioning.distribute import make_placement, tf
    from captioning.errors import UserError

    def strategy():
        raise AssertionError("TF_CONFIG reached TensorFlow: a traceback or a hang")
    monkeypatch.setattr(tf.distribute, "MultiWorkerMirroredStrategy", strategy)
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": cluster, "task": {"type": "worker", "index": 0}}))
    with pytest.raises(UserError, match=f"TF_CONFIG is not a valid cluster description .*{re.escape(words)}"):
        make_placement("multi_worker")


def flip_middle_byte(data: bytes) -> bytes:
    return data[:len(data) // 2] + bytes([data[len(data) // 2] ^ 0xFF]) + data[len(data) // 2 + 1:]


@pytest.mark.parametrize("damage", [lambda data: b"not a model any more",
                                    flip_middle_byte])  # a zip whose CRC fails: zipfile.BadZipFile
def test_a_damaged_model_file_is_decided_before_the_workers_agree(tmp_path, monkeypatch, capsys, damage):
    """Under multi_worker the workers compare their starting epochs (check_agreement); a checkpoint whose
    state is fine but whose model file is damaged must count as "start over" in that comparison, or this
    worker would train from epoch 0 while the others, agreeing on the checkpoint's epoch, resume. (With
    any strategy, a damaged file means one line and starting over, never a traceback.)"""
    import captioning.train as train_module
    from captioning.distribute import Placement
    from captioning.feature_files import FeatureStore
    from captioning.tf_setup import tf

    run_in_process(tmp_path, "default")  # a finished one-epoch run and its checkpoint
    checkpoints, data = tmp_path / "checkpoints", tmp_path / "data"
    state = json.loads((checkpoints / "state.json").read_text())
    assert state["epoch"] == 1
    model_file = checkpoints / state["model_file"]
    model_file.write_bytes(damage(model_file.read_bytes()))

    agreed = []
    monkeypatch.setattr(train_module, "check_agreement", lambda placement, _, epoch: agreed.append(epoch))
    # the chief of a multi-worker run, on the default strategy (the agreement itself is replaced above)
    chief = Placement(tf.distribute.get_strategy(), "multi_worker", True, "worker 0 of 2 (chief)")
    config = train_module.TrainConfig(**{**TINY_TRAIN, "epochs": 2, "dropout": 0.0})  # run_in_process's but epochs
    paths = train_module.TrainPaths(data / "features", data / "model", checkpoints, tmp_path / "dvclive",
                                    (data / "captions.parquet",))
    store = FeatureStore(paths.features)
    training = train_module.prepare_data(config, pd.read_parquet(data / "captions.parquet"),
                                         (data / "split/train.txt").read_text().split(),
                                         (data / "split/dev.txt").read_text().split(), store)
    capsys.readouterr()
    _, started = train_module.resume_or_build(config, training, store, chief, paths)
    assert started["epoch"] == 0 and agreed == [0]  # it agreed on the epoch it really starts from
    said = capsys.readouterr().out
    assert "cannot resume from" in said and "training starts over" in said and "resuming" not in said


def test_a_damaged_best_weights_file_means_starting_over_not_a_traceback_at_the_end(tmp_path, capsys):
    """fit loads the best epoch's weights after the remaining epochs: a damaged file must be found when
    the checkpoint is read, and mean one line and a fresh start."""
    run_in_process(tmp_path, "default")
    checkpoints = tmp_path / "checkpoints"
    best = checkpoints / json.loads((checkpoints / "state.json").read_text())["best_file"]
    best.write_bytes(best.read_bytes()[:len(best.read_bytes()) // 2])  # cut short
    shutil.rmtree(tmp_path / "data")  # run_in_process writes the inputs again
    capsys.readouterr()
    again, _ = run_in_process(tmp_path, "default")
    said = capsys.readouterr().out
    assert f"cannot resume from {best}" in said and "training starts over" in said and "resuming" not in said
    assert again["epochs"] == 1 and again["kept_epoch"] == 1

@pytest.mark.parametrize("damage", [lambda best: best.write_bytes(best.read_bytes()[:len(best.read_bytes()) // 2]),
                                    lambda best: best.unlink()], ids=["cut-short", "deleted"])
def test_without_restore_best_weights_a_damaged_best_weights_file_is_ignored_and_the_run_resumes(tmp_path, capsys,
                                                                                                 damage):
    """With train.restore_best_weights: false the best epoch's weights are never loaded, so a damaged (or
    lost) file is no reason to train again from epoch 1: one line says it is ignored, and the run resumes
    to the numbers of a run that was never interrupted."""
    off = {"restore_best_weights": False}
    whole, whole_weights = run_in_process(tmp_path / "whole", "default", **off, epochs=2)
    run_in_process(tmp_path / "killed", "default", **off)
    checkpoints = tmp_path / "killed/checkpoints"
    best = checkpoints / json.loads((checkpoints / "state.json").read_text())["best_file"]
    damage(best)
    shutil.rmtree(tmp_path / "killed/data")  # run_in_process writes the inputs again
    capsys.readouterr()
    resumed, weights = run_in_process(tmp_path / "killed", "default", **off, epochs=2)
    said = capsys.readouterr().out
    assert "resuming from the checkpoint after epoch 1" in said and "starts over" not in said
    assert re.search(rf"^ignoring {re.escape(str(best))} \(.+\): train.restore_best_weights is false", said, re.M)
    assert without_timing(resumed) == without_timing(whole)
    for mine, theirs in zip(weights, whole_weights, strict=True):
        np.testing.assert_array_equal(mine, theirs)
    assert not best.exists()  # no state names it any more


def test_switching_restore_best_weights_resumes_the_checkpoint(tmp_path, capsys):
    """Every epoch is trained and checkpointed alike whatever train.restore_best_weights says (the best
    epoch's weights are saved either way): switching it only changes which weights the run ends with, so it
    resumes, to the numbers of a run that had the new value from the start, instead of training again."""
    whole, whole_weights = run_in_process(tmp_path / "whole", "default", restore_best_weights=False, epochs=2)
    run_in_process(tmp_path / "switched", "default", restore_best_weights=True)
    shutil.rmtree(tmp_path / "switched/data")  # run_in_process writes the inputs again
    capsys.readouterr()
    resumed, weights = run_in_process(tmp_path / "switched", "default", restore_best_weights=False, epochs=2)
    said = capsys.readouterr().out
    assert "resuming from the checkpoint after epoch 1" in said and "starts over" not in said
    assert resumed["epochs"] == 2 and without_timing(resumed) == without_timing(whole)
    for mine, theirs in zip(weights, whole_weights, strict=True):
        np.testing.assert_array_equal(mine, theirs)


@pytest.fixture(scope="module")
def patience_runs(tmp_path_factory):
    """Two uninterrupted runs of OVERFITTING, one per train.patience: {patience: (project, metrics, weights)}."""
    runs = {}
    for patience in (1, 2):
        project = tmp_path_factory.mktemp(f"patience{patience}")
        runs[patience] = (project, *run_in_process(project, "default", **OVERFITTING, patience=patience))
    assert runs[1][1]["epochs"] < runs[2][1]["epochs"]  # each patience stopped where the comment above says
    return runs


@pytest.mark.parametrize("before, after", [(1, 2), (2, 1)], ids=["raised", "lowered"])
def test_a_changed_patience_resumes_to_the_run_that_had_it_from_the_start(patience_runs, tmp_path, capsys, before,
                                                                         after):
    """train.patience only decides when training stops: a checkpoint of another patience holds the very epochs of
    a run with the new one, so it resumes (it trained again from epoch 1). A larger patience trains on from the
    last epoch; a smaller one whose stop point has passed stops at once with the best epoch that run keeps."""
    shutil.copytree(patience_runs[before][0] / "checkpoints", tmp_path / "checkpoints")
    capsys.readouterr()
    resumed, weights = run_in_process(tmp_path, "default", **OVERFITTING, patience=after)
    said = capsys.readouterr().out
    scratch, whole, whole_weights = patience_runs[after]
    assert f"resuming from the checkpoint after epoch {min(whole['epochs'], patience_runs[before][1]['epochs'])}" \
        in said and "starts over" not in said, said
    assert without_timing(resumed) == without_timing(whole)  # kept epoch, epochs, stopped early, its losses
    assert (tmp_path / "data/model/model.keras").read_bytes() == (scratch / "data/model/model.keras").read_bytes()
    for mine, theirs in zip(weights, whole_weights, strict=True):
        np.testing.assert_array_equal(mine, theirs)
    assert_same_curves(tmp_path, scratch)
    if after < before:  # it counted every epoch of the longer checkpoint, more than the run it keeps trained for
        assert resumed["train_seconds"] < patience_runs[before][1]["train_seconds"]
    assert_counts_its_own_epochs(resumed, tmp_path / "checkpoints")


@pytest.mark.parametrize("epochs", [2, 3])
def test_fewer_epochs_resume_to_the_run_that_had_them_from_the_start(patience_runs, tmp_path, capsys, epochs):
    """train.epochs only decides when training stops: a checkpoint of more epochs holds every epoch of a run with
    fewer, and its best epoch (2) is that run's, so it ends there instead of training again from epoch 1."""
    longer, longer_metrics, _ = patience_runs[2]  # OVERFITTING's 4 epochs, best epoch 2
    scratch = tmp_path / "scratch"
    whole, whole_weights = run_in_process(scratch, "default", **OVERFITTING | {"epochs": epochs})
    shutil.copytree(longer / "checkpoints", tmp_path / "fewer/checkpoints")
    capsys.readouterr()
    resumed, weights = run_in_process(tmp_path / "fewer", "default", **OVERFITTING | {"epochs": epochs})
    said = capsys.readouterr().out
    assert f"resuming from the checkpoint after epoch {epochs}" in said and "starts over" not in said, said
    assert without_timing(resumed) == without_timing(whole) and resumed["epochs"] == epochs  # history, kept epoch
    assert (tmp_path / "fewer/data/model/model.keras").read_bytes() == (scratch / "data/model/model.keras").read_bytes()
    for mine, theirs in zip(weights, whole_weights, strict=True):
        np.testing.assert_array_equal(mine, theirs)
    assert_same_curves(tmp_path / "fewer", scratch)
    assert_counts_its_own_epochs(resumed, tmp_path / "fewer/checkpoints")
    assert resumed["train_seconds"] < longer_metrics["train_seconds"]
    assert len(json.loads((tmp_path / "fewer/checkpoints/state.json").read_text())["history"]) == 4  # all kept


def assert_same_curves(project: Path, scratch: Path) -> None:
    """The history, as DVCLive logs it, is the one of the run trained from scratch."""
    for curve in ("train/loss.tsv", "val/loss.tsv"):
        assert (project / "dvclive/plots/metrics" / curve).read_text() == \
            (scratch / "dvclive/plots/metrics" / curve).read_text()


def assert_counts_its_own_epochs(metrics: dict, checkpoints: Path) -> None:
    """train_seconds is the training time of the run's own epochs (as a run trained from scratch reports it), not
    of every epoch its checkpoint holds."""
    epoch_seconds = json.loads((checkpoints / "state.json").read_text())["epoch_seconds"]
    assert metrics["train_seconds"] == round(sum(epoch_seconds[:metrics["epochs"]]), 2)


def test_best_weights_dropped_without_restore_best_weights_mean_starting_over_when_it_is_back_on(tmp_path, capsys):
    """With train.restore_best_weights: false a damaged best-weights file is let go and the state names none
    (its best epoch stays); a run that then asks for the best epoch cannot end with it: one line, a fresh start
    (not an end with the last epoch's weights passed off as the best)."""
    run_in_process(tmp_path, "default", restore_best_weights=False)
    state_file = tmp_path / "checkpoints/state.json"
    state = json.loads(state_file.read_text())
    (tmp_path / "checkpoints" / state["best_file"]).unlink()  # as the spare best file's removal leaves it
    state_file.write_text(json.dumps({**state, "best_file": None,
                                      "sha256": {state["model_file"]: state["sha256"][state["model_file"]]}}))
    shutil.rmtree(tmp_path / "data")  # run_in_process writes the inputs again
    capsys.readouterr()
    again, _ = run_in_process(tmp_path, "default", restore_best_weights=True, epochs=2)
    said = capsys.readouterr().out
    assert re.search(rf"^cannot resume from {re.escape(str(state_file))} \(the weights of its best epoch \(1\) were "
                     r"dropped by a run with train.restore_best_weights: false\): training starts over", said, re.M)
    assert "resuming" not in said and again["epochs"] == 2


def edit_rng_state(checkpoints: Path) -> None:
    state = json.loads((checkpoints / "state.json").read_text())
    (checkpoints / "state.json").write_text(json.dumps({**state, "rng_state": state["rng_state"][:1]}))


def flip_model_file(checkpoints: Path) -> None:
    model_file = checkpoints / json.loads((checkpoints / "state.json").read_text())["model_file"]
    model_file.write_bytes(flip_middle_byte(model_file.read_bytes()))


def flip_best_weights(checkpoints: Path) -> None:
    """Change one byte of the best epoch's largest weight array: HDF5 keeps no checksum, so such a file
    still loads, with other weights."""
    import h5py

    best = checkpoints / json.loads((checkpoints / "state.json").read_text())["best_file"]
    with h5py.File(best, "r") as stored:
        arrays = []
        stored.visititems(lambda _, item: arrays.append(item) if isinstance(item, h5py.Dataset) else None)
        offset = max(arrays, key=lambda array: array.size).id.get_offset()
    data = bytearray(best.read_bytes())
    data[offset] ^= 0x40
    best.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [edit_rng_state, flip_model_file, flip_best_weights])
def test_starting_over_ends_with_the_numbers_of_a_run_without_checkpoint(default_run, tmp_path, capsys, damage):
    """Reading a checkpoint that then proves damaged builds layers, which draws from the global RNG: the
    fresh model must still be the one a run without any checkpoint builds (same seed, same numbers). A
    changed best-weights file is found by its sha256 (it would load), not kept in the saved model."""
    run_in_process(tmp_path, "default")
    damage(tmp_path / "checkpoints")
    shutil.rmtree(tmp_path / "data")  # run_in_process writes the inputs again
    capsys.readouterr()
    again, weights = run_in_process(tmp_path, "default")
    said = capsys.readouterr().out
    assert "cannot resume from" in said and "training starts over" in said and "resuming" not in said
    assert without_timing(again) == without_timing(default_run[0])
    for mine, theirs in zip(weights, default_run[1], strict=True):
        np.testing.assert_array_equal(mine, theirs)

def test_a_diverged_run_stops_with_one_line_and_saves_no_model(tmp_path):
    """A NaN loss from epoch 1 on (here: a learning rate so large that the first steps overflow the
    weights; NaN features, which did it before, are now refused when the features are read) must not end
    as a saved model whose "best" epoch is NaN: the stage stops with one line, no traceback, and writes
    neither a model nor a checkpoint of that epoch."""
    write_inputs(tmp_path, "default")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"train": {**TINY_TRAIN, "learning_rate": 1e35}}))
    result = subprocess.run([sys.executable, "-m", "stages.train_lstm"], cwd=tmp_path, capture_output=True, text=True,
                            env=stages_env(), timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr, (result.stdout + result.stderr)[-4000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-4000:]
    diverged = re.match(r"error: training diverged in epoch (\d+): train loss \S+, val loss \S+\. ", errors[0])
    assert diverged and re.search(r"\b(nan|inf)\b", errors[0]), errors[0]
    assert not (tmp_path / "data/model").exists() and not (tmp_path / "metrics").exists()
    finished = int(diverged[1]) - 1  # the epochs before it, which the checkpoint keeps
    state = tmp_path / "checkpoints/state.json"
    assert json.loads(state.read_text())["epoch"] == finished if finished else not state.exists()


def test_resuming_reads_the_best_weights_once(tmp_path, monkeypatch, capsys):
    """They are loaded when training ends; checking them when the checkpoint is read (their sha256) must
    not load them a second time (a whole model's weights, read and thrown away)."""
    from captioning.tf_setup import keras

    first, _ = run_in_process(tmp_path, "default")
    best = json.loads((tmp_path / "checkpoints/state.json").read_text())["best_file"]
    shutil.rmtree(tmp_path / "data")  # run_in_process writes the inputs again
    loaded = []
    load_weights = keras.Model.load_weights
    monkeypatch.setattr(keras.Model, "load_weights",
                        lambda model, path, *args, **kwargs: (loaded.append(Path(path).name),
                                                              load_weights(model, path, *args, **kwargs))[1])
    capsys.readouterr()
    again, _ = run_in_process(tmp_path, "default")
    assert "resuming from the checkpoint after epoch 1" in capsys.readouterr().out
    assert loaded == [best]
    assert without_timing(again) == without_timing(first)


def test_a_resumed_run_removes_the_partial_writes_a_kill_left(tmp_path, capsys):
    """A kill while a checkpoint file is written leaves files.atomic_path's temporary file behind (as big
    as a model); the rerun resumes and deletes it instead of keeping one more for every kill."""
    import tempfile

    run_in_process(tmp_path, "default")
    checkpoints = tmp_path / "checkpoints"
    kept = sorted(path.name for path in checkpoints.iterdir())
    for name, suffix in (("epoch-0002.keras", ".tmp.keras"), ("state.json", ".tmp")):  # atomic_path's naming
        handle, _ = tempfile.mkstemp(prefix=f".{name}.", suffix=suffix, dir=checkpoints)
        os.write(handle, b"half a file")
        os.close(handle)
    shutil.rmtree(tmp_path / "data")  # run_in_process writes the inputs again
    capsys.readouterr()
    run_in_process(tmp_path, "default")
    assert "resuming from the checkpoint after epoch 1" in capsys.readouterr().out
    assert sorted(path.name for path in checkpoints.iterdir()) == kept

def test_a_worker_resuming_a_finished_run_keeps_the_best_epoch_and_writes_nothing(tmp_path, monkeypatch):
    """A worker that is not the chief checkpoints into a temporary folder, so the best epoch of a resumed
    run may be only in the shared checkpoint folder (here: the run had finished all its epochs, then was
    killed before saving the model). It must load it from there, not fail, and still write nothing."""
    import captioning.train as train_module
    from captioning.distribute import Placement
    from captioning.tf_setup import tf

    run_in_process(tmp_path, "default")  # the chief's run, checkpoints in the shared folder
    data = tmp_path / "data"
    saved = keras_weights(data / "model/model.keras")
    written = {path: path.stat().st_mtime_ns for path in tmp_path.rglob("*")}

    other = Placement(tf.distribute.get_strategy(), "multi_worker", False, "worker 1 of 2")
    monkeypatch.setattr(train_module, "make_placement", lambda name: other)
    monkeypatch.setattr(train_module, "check_agreement", lambda *args: None)  # one process: nothing to agree
    monkeypatch.setattr(train_module, "stuck_worker_deadline", contextlib.nullcontext)  # nor anyone to wait for
    held = []
    save_bundle = train_module.save_bundle
    monkeypatch.setattr(train_module, "save_bundle",
                        lambda model, *args: (held.append(model.get_weights()), save_bundle(model, *args)))
    metrics = train_module.train(
        train_module.TrainConfig(**{**TINY_TRAIN, "epochs": 1, "dropout": 0.0}),
        pd.read_parquet(data / "captions.parquet"), (data / "split/train.txt").read_text().split(),
        (data / "split/dev.txt").read_text().split(),
        train_module.TrainPaths(data / "features", data / "model", tmp_path / "checkpoints", tmp_path / "dvclive",
                                (data / "captions.parquet",)))
    assert metrics is None
    assert len(held) == 1 and len(held[0]) == len(saved)
    for mine, theirs in zip(held[0], saved, strict=True):  # the chief's kept epoch, as in a run never killed
        np.testing.assert_array_equal(mine, theirs)
    assert {path: path.stat().st_mtime_ns for path in tmp_path.rglob("*")} == written


def keras_weights(model_file: Path) -> list[np.ndarray]:
    from captioning.model import keras  # registers the custom loss and metric the model file names

    return keras.models.load_model(model_file).get_weights()
