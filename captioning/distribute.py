"""Where training runs: one device (`default`), all local GPUs (`mirrored`), or several machines
(`multi_worker`, configured by the standard TF_CONFIG environment variable).

The model is built and compiled inside `strategy.scope()`, and Keras' `fit` splits every global batch
(train.batch_size captions) between the replicas and all-reduces the gradients, so every replica
applies the same update. Under `multi_worker` only the chief writes the run's outputs; the other
workers run exactly the same steps (collective ops need every worker) and write to a temporary folder
that is deleted afterwards: the standard Keras multi-worker pattern.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from captioning.errors import UserError
from captioning.tf_setup import keras, tf

TF_CONFIG_EXAMPLE = ('TF_CONFIG=\'{"cluster": {"worker": ["host0:12345", "host1:12345"]}, '
                     '"task": {"type": "worker", "index": 0}}\'')


@dataclass(frozen=True)
class Placement:
    strategy: tf.distribute.Strategy
    name: str  # default | mirrored | multi_worker
    is_chief: bool  # writes checkpoints, the model, metrics and DVCLive curves
    worker: str  # e.g. "worker 1 of 2", for log lines
    # Tells stuck_worker_deadline's watchdog that training made progress (or, with False, that another deadline
    # covers the wait that follows); a no-op outside it.
    progress: Callable[[bool], None] = field(default=lambda running=True: None, compare=False)

    @property
    def distributed(self) -> bool:
        return self.name != "default"

    def scope(self):
        """The strategy's scope, or no context at all for `default` (so its numerics are untouched)."""
        return self.strategy.scope() if self.distributed else contextlib.nullcontext()


def make_placement(name: str) -> Placement:
    """Create the strategy. Call it before any other TensorFlow work: MultiWorkerMirroredStrategy
    starts the gRPC server of this worker and must exist before TensorFlow builds its devices."""
    if name == "default":
        return Placement(tf.distribute.get_strategy(), name, True, "single process")
    if name == "mirrored":
        strategy = tf.distribute.MirroredStrategy()
        return Placement(strategy, name, True, f"{strategy.num_replicas_in_sync} local replica(s)")
    # multi_worker: the one left of params.STRATEGIES, which read_section checked
    task_type, task_id, cluster = _tf_config()
    workers = len(cluster.get("worker", [])) + len(cluster.get("chief", []))
    # The strategy waits, without a timeout of its own or a word, until every worker of TF_CONFIG has started
    # it: say so first, or a worker whose peers failed before they got here (or never started) looks hung.
    seconds = join_timeout()
    limit = f"at most {seconds:g} s, {JOIN_TIMEOUT_VARIABLE}" if seconds else f"no limit: {JOIN_TIMEOUT_VARIABLE}=0"
    print(f"{task_type} {task_id}: waiting for all {workers} workers of TF_CONFIG to start ({limit})", flush=True)
    with join_deadline(seconds, f"{task_type} {task_id}", workers):
        strategy = _reduce_nested_values(tf.distribute.MultiWorkerMirroredStrategy())
    chief = task_type == "chief" or (task_type == "worker" and task_id == 0 and "chief" not in cluster)
    return Placement(strategy, name, chief, f"{task_type} {task_id} of {workers} workers"
                     f"{' (chief)' if chief else ''}, {strategy.num_replicas_in_sync} replicas in all")


# Seconds a multi_worker worker waits for the others: to start, to reach the agreement, to make progress in training
JOIN_TIMEOUT_VARIABLE = "CAPTIONING_JOIN_TIMEOUT"
DEFAULT_JOIN_TIMEOUT = 600.0  # the README asks to start all workers within 10 minutes of each other

# The join's watchdog, a plain Python process (no TensorFlow: it starts in milliseconds). While the worker waits
# inside TensorFlow it holds the GIL and heeds neither Ctrl-C nor SIGTERM (TensorFlow catches it), so no thread,
# timer or signal handler of its own can end the wait, and coordination's cluster_register_timeout_in_ms does
# not bound it either: the watchdog says why and ends it with SIGKILL, which nothing can catch (and so does
# Ctrl-C while it waits). The worker may write to its stdin: "p" (progress) starts the wait again, "s" stops
# the clock until the next "p"; argv[4] "s" starts it stopped.
WATCHDOG = """
import os, select, signal, sys, time
worker, seconds, message, start = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3], sys.argv[4]
# Ctrl-C reaches the watchdog too (same process group): end the deaf worker with it, as the user asked.
signal.signal(signal.SIGINT, lambda *_: (os.kill(worker, signal.SIGKILL), sys.exit(1)))
deadline = None if start == "s" else time.monotonic() + seconds
while deadline is None or time.monotonic() < deadline:
    if select.select([sys.stdin], [], [], 0.2)[0]:
        said = os.read(sys.stdin.fileno(), 4096)
        if not said:  # the worker closed its end: it ended
            sys.exit(0)
        deadline = None if said.endswith(b"s") else time.monotonic() + seconds
    if os.getppid() != worker:  # the worker ended some other way
        sys.exit(0)
print(message, file=sys.stderr, flush=True)
os.kill(worker, signal.SIGKILL)
"""


def join_timeout() -> float:
    """$CAPTIONING_JOIN_TIMEOUT in seconds (0: wait for ever), DEFAULT_JOIN_TIMEOUT when it is unset."""
    raw = os.environ.get(JOIN_TIMEOUT_VARIABLE, "")
    try:
        seconds = float(raw) if raw.strip() else DEFAULT_JOIN_TIMEOUT
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds >= 0):
        raise UserError(f"{JOIN_TIMEOUT_VARIABLE} is {raw!r}: use the seconds a multi_worker worker waits for the "
                        "others to start (0: no limit), or unset it for the default "
                        f"{DEFAULT_JOIN_TIMEOUT:g}.")
    return seconds


@contextlib.contextmanager
def join_deadline(seconds: float, worker: str, workers: int) -> Iterator[None]:
    """End this process with one line on stderr when the body (the strategy's start, which waits for every
    worker of TF_CONFIG) takes more than `seconds`; 0: no limit."""
    with deadline(seconds, f"error: {worker}: not all {workers} workers of TF_CONFIG started within {seconds:g} s, "
                           f"so it stops ({JOIN_TIMEOUT_VARIABLE}). Start the missing ones (a worker that stopped "
                           f"says why in its own output), then every worker again; {JOIN_TIMEOUT_VARIABLE}=0 waits "
                           "with no limit."):
        yield


@contextlib.contextmanager
def deadline(seconds: float, message: str, stopped: bool = False) -> Iterator[Callable[[bool], None]]:
    """End this process with `message` on stderr when the body, a wait inside TensorFlow for the other
    workers, takes more than `seconds` (the WATCHDOG); 0: no limit. Yields `progress(running=True)`: the wait
    starts again from the call, or (running False) is not timed until the next call; `stopped`: not timed
    until the first call."""
    if not seconds:
        yield lambda running=True: None
        return
    watchdog = subprocess.Popen([sys.executable, "-c", WATCHDOG, str(os.getpid()), str(seconds), message,
                                 "s" if stopped else "p"], stdin=subprocess.PIPE)

    def progress(running: bool = True) -> None:
        with contextlib.suppress(OSError):  # a watchdog that ended has nothing left to time
            watchdog.stdin.write(b"p" if running else b"s")
            watchdog.stdin.flush()

    try:
        yield progress
    finally:
        watchdog.kill()
        watchdog.wait()
        with contextlib.suppress(OSError):
            watchdog.stdin.close()


@contextlib.contextmanager
def stuck_worker_deadline(placement: Placement) -> Iterator[Placement]:
    """Under multi_worker, `placement` with a `progress` that keeps a watchdog from ending this worker: when
    training makes no progress (no step, no epoch) for CAPTIONING_JOIN_TIMEOUT seconds after the workers'
    agreement, one line names the other workers, one of which is stuck, and the worker ends (status 137).

    A worker that stopped or froze ends the others through TensorFlow's heartbeats
    (stop_cleanly_when_a_worker_is_lost); one that is alive but stuck (a hung file system, a deadlock) keeps
    sending them, and the others' next collective op would wait for it for good. TensorFlow's own bound, the
    CommunicationOptions timeout, is meant for debugging only: a thread per collective op. The clock starts
    at the agreement (check_agreement, which stops it while its own deadline times the wait). The stuck
    worker's own watchdog fires at about the same time, and its end would make a waiting worker report it as
    lost with a different line, or two; so each worker waits a second longer than the one before it in the
    cluster, and the first waiting one speaks before it."""
    if placement.name != "multi_worker":
        yield placement
        return
    me, workers, seconds = _me(placement), _workers(placement), join_timeout()
    seconds = seconds and seconds + workers.index(me)  # 0: no limit
    others = " or ".join(worker for worker in workers if worker != me)
    with deadline(seconds, f"error: {me}: training made no progress for {seconds:g} s, so it stops "
                           f"({JOIN_TIMEOUT_VARIABLE}): {others} is stuck while alive (the one whose output stopped "
                           "first; a stuck worker still answers TensorFlow's heartbeats). End it with kill -9 (it "
                           "does not heed SIGTERM), then start every worker again: they resume from the shared "
                           f"checkpoints; {JOIN_TIMEOUT_VARIABLE}=0 waits with no limit.", stopped=True) as progress:
        yield replace(placement, progress=progress)


class Progress(keras.callbacks.Callback):
    """Tells stuck_worker_deadline's watchdog after every training and validation step."""

    def __init__(self, placement: Placement):
        super().__init__()
        self.progress = placement.progress

    def on_train_batch_end(self, batch, logs=None):
        self.progress(True)

    def on_test_batch_end(self, batch, logs=None):
        self.progress(True)

    def on_epoch_end(self, epoch, logs=None):  # after EpochEnd's checkpoint, which may take a while
        self.progress(True)


def _reduce_nested_values(strategy: tf.distribute.Strategy) -> tf.distribute.Strategy:
    """Make MultiWorkerMirroredStrategy.reduce take what Keras 3's fit gives it with 2+ workers.

    Two known incompatibilities (keras-team/keras#20329, tensorflow/tensorflow#72388), both worked
    around here rather than by patching Keras:
    - fit reduces one whole input batch ((inputs dict, targets)) to build the model, but this strategy
      reduces single tensors only ("Attempt to convert a value ({'features': PerReplica...})"): reduce
      leaf by leaf, as MirroredStrategy does;
    - fit averages every logged metric with axis=0, but a metric is a scalar ("Invalid reduction
      dimension 0 for input with 0 dimensions"): a scalar has no batch axis, so average across
      replicas only (the metrics are already synchronised, so this changes no value).
    Every worker makes the same calls in the same order, so the collectives still match.
    """
    reduce = strategy.reduce

    def reduce_each(reduce_op, value, axis=None):
        def one(leaf):
            rank = strategy.experimental_local_results(leaf)[0].shape.rank
            return reduce(reduce_op, leaf, axis=None if rank == 0 else axis)
        return tf.nest.map_structure(one, value)

    strategy.reduce = reduce_each
    return strategy


def _tf_config() -> tuple[str, int, dict]:
    """Read TF_CONFIG, failing with one clear line instead of a hang or a gRPC traceback."""
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        raise UserError("train.strategy: multi_worker needs the TF_CONFIG environment variable on every "
                        f"worker, e.g. {TF_CONFIG_EXAMPLE} (index 1 on the second machine).")
    try:
        config = json.loads(raw)
        cluster, task = _mapping(config, "TF_CONFIG")["cluster"], config["task"]
        _check_cluster(_mapping(cluster, "cluster"))
        task_type, task_id = _mapping(task, "task")["type"], int(task["index"])  # as TensorFlow reads it
        if task_type not in ("chief", "worker") or not isinstance(cluster.get(task_type), list) \
                or not 0 <= task_id < len(cluster[task_type]):
            raise ValueError(f"task {task_type} {task_id} is not in the cluster")
    except (ValueError, KeyError, TypeError) as err:
        raise UserError(f"TF_CONFIG is not a valid cluster description ({err}); expected e.g. "
                        f"{TF_CONFIG_EXAMPLE}.") from None
    return task_type, task_id, cluster


def _mapping(value, what: str) -> dict:
    if not isinstance(value, dict):
        raise TypeError(f"{what} must be a JSON object, not {json.dumps(value)}")
    return value


# Roles MultiWorkerMirroredStrategy can run with: it has no parameter servers, and waits forever for a
# "ps" task that never joins; an evaluator is not part of the training cluster.
ROLES = ("chief", "worker", "evaluator")


def _check_cluster(cluster: dict) -> None:
    """What TensorFlow would otherwise reject with a traceback (or wait forever for): unknown roles, a
    second chief, addresses that are not "host:port"."""
    for role, addresses in cluster.items():
        if role not in ROLES:
            raise ValueError(f"cluster role {role!r} is not one of {', '.join(ROLES)}")
        if not isinstance(addresses, list):
            raise ValueError(f"cluster {role} must be a list of \"host:port\" addresses")
        for address in addresses:
            if not isinstance(address, str) or not address.rpartition(":")[2].isdigit() \
                    or not address.rpartition(":")[0]:
                raise ValueError(f"cluster {role} address {json.dumps(address)} is not \"host:port\"")
    if len(cluster.get("chief", [])) > 1:
        raise ValueError("a cluster has at most one chief")


def shard_by_data(dataset: tf.data.Dataset, placement: Placement) -> tf.data.Dataset:
    """Under multi_worker, let each worker keep its replicas' slices of every global batch.

    Our datasets are index ranges fed through numpy_function, not files, so sharding by file cannot
    apply; DATA sharding makes every worker compute the same global batch and keep its own part of it
    (the batch is cut into per-replica pieces first), so the global batch stays train.batch_size.
    """
    if placement.name != "multi_worker":
        return dataset
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options)


def check_agreement(placement: Placement, fingerprint: str, epoch: int) -> None:
    """Under multi_worker, stop unless every worker trains the same thing from the same epoch.

    Workers that disagree (other data or params, or one resuming a checkpoint the others lack) would
    otherwise hang in the first collective or silently average unrelated gradients.
    """
    if placement.name != "multi_worker":
        return
    mine = tf.constant([[int(fingerprint[:15], 16), epoch]], tf.int64)  # 60 bits of the hash fit an int64

    @tf.function
    def everyones():
        return placement.strategy.run(lambda: tf.identity(mine))

    # The first collective op: it waits, again without a limit of its own, until every worker gets here. A worker
    # that started but is stuck before it (say, reading its data from a hung network file system) keeps sending
    # heartbeats, so TensorFlow would wait for it for good and without a word.
    seconds = join_timeout()
    placement.progress(False)  # its own deadline times this wait
    with deadline(seconds, f"error: {_me(placement)}: not every worker reached the start of training within "
                           f"{seconds:g} s of this one, so it stops ({JOIN_TIMEOUT_VARIABLE}). A worker whose "
                           "output stopped before this one's is stuck (say, on a hung file system): end it with "
                           "kill -9 (it does not heed SIGTERM), then start every worker again; "
                           f"{JOIN_TIMEOUT_VARIABLE}=0 waits with no limit."):
        rows = placement.strategy.gather(everyones(), axis=0).numpy()  # one row per replica of every worker
    placement.progress(True)
    if len(set(rows[:, 0])) > 1:
        raise UserError("the workers do not train the same thing: their params, training code or input files "
                        "differ. Give every machine the same commit and the same `dvc pull`ed data.")
    if len(set(rows[:, 1])) > 1:
        raise UserError(f"the workers would start from different epochs ({sorted(set(rows[:, 1].tolist()))}): the "
                        "checkpoint folder must be shared by all workers (or deleted on all of them to start over).")


@contextlib.contextmanager
def stop_cleanly_when_a_worker_is_lost(placement: Placement) -> Iterator[None]:
    """Under multi_worker, turn TensorFlow's error for a lost worker into one line that says what to do.

    A worker that fails after the agreement (a crash, a kill, an error of its own) leaves the others in,
    or on their way to, a collective op that can never complete. They do not hang: TensorFlow's
    coordination service notices the missing heartbeats (about 10 s) or the refused connection, aborts
    every collective op, and the op raises UnavailableError, the documented signal that "it's required
    to restart in order to recover" (DeadlineExceededError when the chief, which runs the service, is frozen
    and leaves the heartbeats unanswered). Its message is a traceback of gRPC details; the workers it names
    (other than this one) are the ones lost. A worker that is alive but stuck keeps sending heartbeats,
    so TensorFlow would wait for it: check_agreement's deadline bounds that wait before the agreement,
    stuck_worker_deadline's after it.
    """
    try:
        yield
    except (tf.errors.UnavailableError, tf.errors.DeadlineExceededError) as err:
        if placement.name != "multi_worker":
            raise
        me = _me(placement)
        lost = {f"{job} {task}" for job, task in re.findall(r"/job:(\w+)/(?:replica:\d+/)?task:(\d+)", str(err))} - {me}
        if not lost and "CoordinationService" in str(err):
            # A request to the coordination service that timed out (its heartbeat: DeadlineExceeded) names no other
            # task: the service runs on the chief, which stopped answering (a frozen process, a lost machine).
            lost = {_coordinator(placement)} - {me}
        lost = sorted(lost) or ["another worker"]
        raise UserError(f"{' and '.join(lost)} stopped or cannot be reached, so {me} stops too. "
                        "The lost worker's own output says why; fix that and start every worker again (with a "
                        "shared checkpoints/ folder they resume from the last finished epoch).") from None


def _me(placement: Placement) -> str:
    """This worker as TF_CONFIG names it, e.g. "worker 1"."""
    resolver = placement.strategy.cluster_resolver
    return f"{resolver.task_type} {resolver.task_id}"


def _workers(placement: Placement) -> list[str]:
    """Every worker of the cluster as TF_CONFIG names it, e.g. ["worker 0", "worker 1"]."""
    return [f"{job} {task}" for job, tasks in placement.strategy.cluster_resolver.cluster_spec().as_dict().items()
            for task in (range(len(tasks)) if isinstance(tasks, list) else sorted(tasks))]


def _coordinator(placement: Placement) -> str:
    """The task that runs TensorFlow's coordination service: the chief, else worker 0 (TensorFlow's rule)."""
    return "chief 0" if "chief" in placement.strategy.cluster_resolver.cluster_spec().as_dict() else "worker 0"


@contextlib.contextmanager
def output_dir(placement: Placement, path: Path) -> Iterator[Path]:
    """`path` on the chief; on another worker a temporary folder, deleted on exit. Every worker must
    still save (saving can read distributed variables), only the chief's files are kept."""
    if placement.is_chief:
        yield Path(path)
        return
    temporary = Path(tempfile.mkdtemp(prefix=f"worker-{Path(path).name}-"))
    try:
        yield temporary
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


class NullLive:
    """DVCLive's interface, doing nothing: the curves are logged by the chief only."""

    def log_metric(self, *args, **kwargs):
        pass

    def next_step(self):
        pass

    def end(self):
        pass
