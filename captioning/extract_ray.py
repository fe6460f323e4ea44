"""Feature extraction on a Ray cluster (`features.engine: ray`): the same files as a local run.

Ray Data streams the image list through a pool of actors (`map_batches` with `concurrency=`), one
actor per CPU of the cluster. Each actor builds the backbone once, from the same BackboneSpec and
`build_backbone` as a local run, and computes a batch with the same FeatureComputer, so a row's
bytes are the ones a local run writes. Why the bytes match: an input row of the dataset is one
whole local batch (the same `features.batch_size` images the local tf.data pipeline groups), so
batch composition never changes, and the lone-image twin in FeatureComputer covers the last batch.
The actors send back one row per image with its row number; the driver writes it into the
memory-mapped raw file extract_features gives it, so neither side holds more than a few batches.

Faults: an actor that dies (process killed, node lost) is restarted by Ray and the batches it held
are retried, by Ray Data's own actor fault tolerance (Ray 2.60 deprecates every way to set other
max_restarts / max_task_retries, and names no replacement); a batch that keeps killing its worker
ends the run through Ray Data's no-progress guard. The driver checks that every row arrives
exactly once and the report counts the restarts it saw. A bad image is an error string in its row,
as locally (never an exception, so never retried), and so is a backbone a worker cannot build (a
UserError, in every row it is handed: `fatal`), which the driver raises as the local run does. Ray is
imported only here, only for this engine.
"""
from __future__ import annotations

import logging
import os
import socket
from collections import Counter
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

import captioning
from captioning.errors import UserError
from captioning.layout import CACHE_ENV

CONNECT_TIMEOUT_S = 5
START_HINT = ("start a cluster with `ray start --head` (see README, Scaling out), or set "
              "features.ray_address: null to start a private local Ray")


class BackboneActor:
    """One per worker: builds the backbone once, then turns batches of paths into feature rows."""

    def __init__(self, spec: dict, batch_size: int):
        import ray

        from captioning.backbones import build_backbone, feature_dim
        from captioning.feature_files import BackboneSpec
        from captioning.features import FeatureComputer

        spec = BackboneSpec(**spec)
        self.batch_size, self.feature_dim = batch_size, feature_dim(spec)
        self.worker = f"{ray.get_runtime_context().get_actor_id()}:{os.getpid()}"
        try:
            self.computer, self.failure = FeatureComputer(build_backbone(spec), spec.image_size), ""
        except UserError as err:
            # Not raised: Ray keeps only the text of a constructor's exception (ActorDiedError), Ray Data
            # starts other actors to fail alike, and it rewrites a batch's exception. Each batch this
            # actor gets carries the message instead (`fatal`), and the driver raises it as it is.
            self.computer, self.failure = None, str(err)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows, features, errors = [], [], []
        for start, paths in zip(batch["start"], batch["paths"], strict=True):
            paths = [str(path) for path in paths]
            out = np.zeros((len(paths), self.feature_dim), np.float32)
            failed = self.computer.fill(paths, self.batch_size, out, progress=False) if self.computer else {}
            rows.append(np.arange(start, start + len(paths)))
            features.append(out)
            errors.extend(failed.get(offset, "") for offset in range(len(paths)))
        return {"row": np.concatenate(rows), "feature": np.concatenate(features),
                "error": np.array(errors, dtype=object), "worker": np.array([self.worker] * len(errors), dtype=object),
                "fatal": np.array([self.failure] * len(errors), dtype=object)}


class RayEngine:
    """`compute_rows` for extract_features, on the cluster at `address` (None: RAY_ADDRESS, or a
    private local Ray); `summary()` says afterwards what happened there."""

    def __init__(self, spec, batch_size: int, address: str | None = None, progress: bool = True):
        self.spec, self.batch_size, self.address, self.progress = spec, batch_size, address, progress
        self.rows_by_worker: Counter = Counter()
        self.workers = 0
        self.actor_restarts: int | None = None
        self.rows_done = 0  # images received so far (what the progress bar shows)

    def __call__(self, paths: list[str], out: np.ndarray) -> dict[int, str]:
        import ray

        _connect(ray, self.address)
        try:
            return self._run(ray, paths, out)
        finally:
            self.actor_restarts = _actor_restarts(ray)
            ray.shutdown()

    def _run(self, ray, paths: list[str], out: np.ndarray) -> dict[int, str]:
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # our bar counts images across the cluster instead
        context.enable_operator_progress_bars = False
        self.workers = max(1, int(ray.cluster_resources().get("CPU", 1)))
        # Workers may run anywhere: absolute paths (the images must be at the same path on every node).
        absolute = [str(Path(path).resolve()) for path in paths]
        batches = [{"start": start, "paths": absolute[start:start + self.batch_size]}
                   for start in range(0, len(absolute), self.batch_size)]
        # One block per batch: Ray hands the next batch to whichever actor is free (faster machines
        # take more), and a lost actor costs only the batches it held.
        dataset = ray.data.from_items(batches, override_num_blocks=len(batches)).map_batches(
            BackboneActor, batch_size=1, batch_format="numpy", num_cpus=1,
            compute=ray.data.ActorPoolStrategy(size=self.workers),
            fn_constructor_kwargs={"spec": asdict(_portable(self.spec)), "batch_size": self.batch_size})
        done = np.zeros(len(paths), dtype=bool)
        errors: dict[int, str] = {}
        with tqdm(total=len(paths), desc=f"{self.spec.backbone} features (Ray, {self.workers} workers)", unit="img",
                  disable=not self.progress) as bar:
            for block in _stream(ray, dataset):
                fatal = next((str(text) for text in block["fatal"] if text), "")
                if fatal:  # a worker could not build the backbone: the UserError a local run raises
                    raise UserError(fatal)
                rows = block["row"].astype(np.int64)
                if done[rows].any():
                    raise UserError(f"the Ray run returned image {paths[rows[done[rows]][0]]} twice; "
                                    "rerun the stage (nothing was written).")
                done[rows] = True
                out[rows] = block["feature"]
                errors.update((int(row), str(error)) for row, error in zip(rows, block["error"], strict=True) if error)
                self.rows_by_worker.update(str(worker) for worker in block["worker"])
                self.rows_done += len(rows)
                bar.update(len(rows))
        if not done.all():
            missing = int((~done).sum())
            raise UserError(f"the Ray run ended without {missing} of {len(paths)} images (first: "
                            f"{paths[int(np.argmin(done))]}); rerun the stage (nothing was written).")
        return errors

    def summary(self) -> dict:
        """Workers, restarts (Ray's count), and the images each worker process computed (a restarted
        actor keeps its actor id and gets a new process, so it shows up as a second entry)."""
        pids_per_actor = Counter(worker.split(":")[0] for worker in self.rows_by_worker)
        return {
            "name": "ray",
            "workers": self.workers,
            "actor_restarts": self.actor_restarts,
            "restarted_actors_that_computed_again": sum(count - 1 for count in pids_per_actor.values()),
            "images_per_worker_process": dict(sorted(self.rows_by_worker.items())),
        }


def _actor_restarts(ray) -> int | None:
    """Restarts of this run's actors, from the GCS actor table (ray.util.state would need the
    dashboard, which a minimal cluster does not run); None if Ray cannot say."""
    try:
        from ray._private.state import actors

        table = actors(job_id=ray.JobID.from_hex(ray.get_runtime_context().get_job_id()))
        return sum(actor["NumRestarts"] for actor in table.values() if "BackboneActor" in actor["ActorClassName"])
    except Exception:  # noqa: BLE001 - a private API: the report says "unknown" rather than fail a finished run
        return None


def _portable(spec):
    """The spec each actor builds from: a weights file by absolute path (workers run elsewhere)."""
    if spec.weights in ("imagenet", "random"):
        return spec
    return replace(spec, weights=str(Path(spec.weights).resolve()))


def _connect(ray, address: str | None) -> None:
    """Join the cluster, shipping this package (workers have the same venv, not our code)."""
    package = str(Path(captioning.__file__).parent)
    where = address or os.environ.get("RAY_ADDRESS") or "this machine"
    _check_reachable(address or os.environ.get("RAY_ADDRESS"), where)
    logging.getLogger("ray").setLevel(logging.WARNING)  # Ray's INFO lines would bury the progress bar
    runtime_env = {"py_modules": [package]}
    # Workers of a cluster that `ray start` began have that shell's environment, not this one's: the cache
    # folder for converted weights set here must be handed to them, or they write (or fail to write)
    # elsewhere and tell the user to set the variable they did set. Unset here, each worker keeps its own.
    cache = os.environ.get(CACHE_ENV)
    if cache:
        runtime_env["env_vars"] = {CACHE_ENV: str(Path(cache).expanduser().resolve())}
    try:
        ray.init(address=address, runtime_env=runtime_env, include_dashboard=False,
                 log_to_driver=False, configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise UserError(f"could not connect to the Ray cluster at {where} ({str(err).splitlines()[0]}): "
                        f"{START_HINT}.") from None


def _check_reachable(address: str | None, where: str) -> None:
    """Fail in seconds on a `host:port` nobody listens on: ray.init would keep retrying for minutes."""
    host, _, port = (address or "").rpartition(":")
    if not host or not port.isdigit() or "://" in address:
        return  # None, "auto" or ray://: ray.init's own checks apply
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as err:
        raise UserError(f"could not connect to the Ray cluster at {where} ({err}): {START_HINT}.") from None


def _stream(ray, dataset):
    """The output blocks as they arrive; a failure inside the cluster becomes one clear line."""
    try:
        yield from dataset.iter_batches(batch_size=None, batch_format="numpy")
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - Ray wraps worker errors in many types
        cause = _user_error_in(err)
        if cause:
            raise cause from None
        patience = ray.data.DataContext.get_current().execution_no_progress_timeout_s
        raise UserError(f"feature extraction on Ray failed: {type(err).__name__}: "
                        f"{str(err).strip().splitlines()[-1] if str(err).strip() else ''} (a batch that keeps "
                        f"killing its worker ends the run once no image has come back for {patience:g} s; the "
                        "workers' logs are in /tmp/ray/session_latest/logs).") from None


def _user_error_in(err: BaseException) -> UserError | None:
    """A UserError raised in an actor (bad weights file, ...), however deep Ray wrapped it."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, UserError):
            return UserError(str(err))
        cause = getattr(err, "cause", None)
        err = cause if isinstance(cause, BaseException) else (err.__cause__ or err.__context__)
    return None
