"""features.engine: ray on a local two-node Ray cluster (one CPU each, so two workers): the same
files as a local run, byte for byte; a worker killed mid-run loses and duplicates no image; and
`dvc repro` runs the stage on the cluster. Tiny images at 64 px, random weights."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import yaml
from PIL import Image
from ray.util.annotations import RayDeprecationWarning

from captioning import files
from captioning.backbones import make_spec
from captioning.errors import UserError
from captioning.extract_ray import RayEngine
from captioning.feature_files import FEATURE_FILES
from captioning.features import extract_features
from captioning.tiny_project import make_project, set_params, tool_env

# Ray marks an API for removal with a RayDeprecationWarning, naming our line: an error here, so that a call
# of ours that the next Ray upgrade would break fails the tests now (ray_remote_args_fn did, for 2.64).
# The class is imported here, not in a test: Ray's first import puts its own filter for it in front.
pytestmark = [pytest.mark.slow,
              pytest.mark.filterwarnings(f"error::{RayDeprecationWarning.__module__}.RayDeprecationWarning"
                                         r":captioning\.extract_ray")]
SPEC = make_spec("random", 0, 64, "float32")
TIMING = {"seconds", "images_per_second", "engine"}
ACTOR_TITLE = "MapWorker(MapBatches(BackboneActor))"  # Ray names each actor process ray::<this>


@pytest.fixture(scope="module")
def cluster():
    """Two Ray nodes on this machine, always shut down (also when a test fails)."""
    from ray.cluster_utils import Cluster

    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        nodes.add_node(num_cpus=1)
        nodes.wait_for_nodes()
        yield nodes
    finally:
        nodes.shutdown()


def write_images(folder, count: int) -> list[str]:
    """`count` photos of mixed sizes, plus a file that is not an image and one that is missing."""
    folder.mkdir(parents=True)
    names = []
    for i in range(count):
        pixels = np.random.default_rng(i).integers(0, 256, (40 + i % 7, 60 - i % 5, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i:03d}.jpg", quality=90)
        names.append(f"img{i:03d}.jpg")
    (folder / "notes.jpg").write_text("not a photo\n")
    return names[:3] + ["notes.jpg"] + names[3:] + ["gone.jpg"]


def same_outputs(local, remote, local_report: dict, remote_report: dict) -> None:
    """The same feature files byte for byte, and the same report but for timings and the engine's own entry."""
    for name in FEATURE_FILES:
        assert (remote / name).read_bytes() == (local / name).read_bytes(), name
    assert sorted(path.name for path in remote.iterdir()) == sorted(path.name for path in local.iterdir())
    assert ({k: v for k, v in remote_report.items() if k not in TIMING}
            == {k: v for k, v in local_report.items() if k not in TIMING})


def features_hash(project) -> str:
    """The hash dvc.lock records for data/features: what decides whether the later stages rerun."""
    outs = yaml.safe_load((project / "dvc.lock").read_text())["stages"]["extract_resnet_features"]["outs"]
    return next(out["md5"] for out in outs if out["path"] == "data/features")


def test_ray_writes_the_files_a_local_run_writes(cluster, tmp_path):
    images = write_images(tmp_path / "images", 21)
    local = extract_features(images, tmp_path / "images", tmp_path / "local", SPEC, batch_size=4)
    engine = RayEngine(SPEC, 4, cluster.address, progress=False)
    report = extract_features(images, tmp_path / "images", tmp_path / "ray", SPEC, batch_size=4,
                              compute_rows=engine, engine_report=engine.summary)
    same_outputs(tmp_path / "local", tmp_path / "ray", local, report)
    assert [f["image"] for f in report["failed"]] == ["notes.jpg", "gone.jpg"]  # reported as locally
    assert report["engine"]["workers"] == 2 and report["engine"]["actor_restarts"] == 0
    assert sum(report["engine"]["images_per_worker_process"].values()) == len(images)
    assert np.load(tmp_path / "ray/features.npy").std() > 0  # real features, not zeros


def kill_one_worker_when(engine: RayEngine, rows: int, killed: list) -> None:
    """Once `rows` images have come back, SIGKILL one actor process of this test's cluster (found by
    its process title; the cluster's raylets, and so its workers, descend from this process)."""
    deadline = time.monotonic() + 300
    while engine.rows_done < rows and time.monotonic() < deadline:
        time.sleep(0.05)
    for process in psutil.process_iter(["pid", "cmdline"]):
        if ACTOR_TITLE in " ".join(process.info["cmdline"] or []) and \
                os.getpid() in [parent.pid for parent in process.parents()]:
            os.kill(process.info["pid"], signal.SIGKILL)
            killed.append(process.info["pid"])
            return


def test_a_killed_worker_loses_and_repeats_no_image(cluster, tmp_path):
    images = write_images(tmp_path / "images", 158)  # 40 batches of 4: the kill lands mid-run
    local = extract_features(images, tmp_path / "images", tmp_path / "local", SPEC, batch_size=4)
    engine = RayEngine(SPEC, 4, cluster.address, progress=False)
    killed: list[int] = []
    killer = threading.Thread(target=kill_one_worker_when, args=(engine, 12, killed), daemon=True)
    killer.start()
    report = extract_features(images, tmp_path / "images", tmp_path / "ray", SPEC, batch_size=4,
                              compute_rows=engine, engine_report=engine.summary)
    killer.join(timeout=10)
    assert killed, "no worker process was found to kill"
    assert engine.rows_done == len(images)  # every image came back once (a repeat is a UserError)
    same_outputs(tmp_path / "local", tmp_path / "ray", local, report)
    assert report["engine"]["actor_restarts"] >= 1
    assert sum(report["engine"]["images_per_worker_process"].values()) == len(images)


# Appended to the copy of the package the workers get: a batch holding "poison" kills its worker process, as a
# decoder that crashes on one file would, every time Ray retries it.
CRASHING_DECODER = """

def _crash_on_poison(fill):
    def crashing(self, paths, *args, **kwargs):
        if any("poison" in str(path) for path in paths):
            os._exit(1)
        return fill(self, paths, *args, **kwargs)
    return crashing


FeatureComputer.fill = _crash_on_poison(FeatureComputer.fill)
"""


def test_a_batch_that_keeps_killing_its_worker_ends_the_run(cluster, tmp_path, monkeypatch):
    """Restarts and retries are Ray Data's own, without a limit (Ray 2.60 deprecates setting them): a batch
    that kills its worker every time must still end the run, with one line, once no image has come back
    for DataContext.execution_no_progress_timeout_s (short here; 30 minutes by default)."""
    import ray

    import captioning

    package = tmp_path / "shipped" / "captioning"
    shutil.copytree(Path(captioning.__file__).parent, package, ignore=shutil.ignore_patterns("__pycache__"))
    with open(package / "features.py", "a") as source:
        source.write(CRASHING_DECODER)
    monkeypatch.setattr(captioning, "__file__", str(package / "__init__.py"))  # what _connect ships to workers
    monkeypatch.chdir(tmp_path)  # workers start in the driver's folder, and would import the project's package
    monkeypatch.setattr(ray.data.DataContext.get_current(), "execution_no_progress_timeout_s", 20)
    images = write_images(tmp_path / "images", 6)
    shutil.copy(tmp_path / "images" / images[0], tmp_path / "images" / "poison.jpg")
    engine = RayEngine(SPEC, 4, cluster.address, progress=False)
    with pytest.raises(UserError, match=r"^feature extraction on Ray failed: ExecutionTimeoutError: .*once no "
                                        r"image has come back for 20 s") as raised:
        extract_features([*images, "poison.jpg"], tmp_path / "images", tmp_path / "ray", SPEC, batch_size=4,
                         compute_rows=engine)
    assert "\n" not in str(raised.value)
    assert not (tmp_path / "ray" / "features.npy").exists()


def test_a_user_error_in_the_workers_is_the_line_a_local_run_gives(cluster, tmp_path):
    """A backbone the workers cannot build (here a weights file changed after the spec recorded its sha256;
    equally an ImageNet download that fails offline) ended the run with "feature extraction on Ray failed:
    ActorDiedError: captioning.errors.UserError: ... (a worker that dies more than 3 times ...)", after
    Ray had restarted every actor to fail again: Ray keeps only the text of a constructor's exception, so
    _user_error_in never found the UserError its docstring promises. Now it is the local line."""
    images = write_images(tmp_path / "images", 3)
    weights = tmp_path / "backbone.weights.h5"
    weights.write_bytes(b"weights as they were when the spec was made")
    spec = make_spec(str(weights), 0, 64, "float32")
    weights.write_bytes(b"weights replaced since")
    with pytest.raises(UserError) as local:
        extract_features(images, tmp_path / "images", tmp_path / "local", spec, batch_size=4)
    assert "changed since the features were extracted" in str(local.value)
    engine = RayEngine(spec, 4, cluster.address, progress=False)
    with pytest.raises(UserError) as remote:
        extract_features(images, tmp_path / "images", tmp_path / "ray", spec, batch_size=4, compute_rows=engine)
    assert str(remote.value) == str(local.value)
    assert not (tmp_path / "ray" / "features.npy").exists()


def test_the_workers_keep_converted_weights_in_the_cache_folder_set_for_the_run(cluster, tmp_path, monkeypatch):
    """The workers of a cluster started elsewhere (`ray start`) did not see CAPTIONING_CACHE set for the run:
    they converted EfficientNet-Lite0's weights into their own home folder, or, where that is not writable,
    stopped with "set CAPTIONING_CACHE to a folder you can write"."""
    from captioning import efficientnet_lite, extract_ray

    assert extract_ray.CACHE_ENV == efficientnet_lite.CACHE_ENV
    images = write_images(tmp_path / "images", 3)
    monkeypatch.setenv(efficientnet_lite.CACHE_ENV, str(tmp_path / "cache"))  # after the cluster started
    spec = make_spec("imagenet", 0, 64, "float32", backbone="efficientnet_lite0")
    engine = RayEngine(spec, 4, cluster.address, progress=False)
    report = extract_features(images, tmp_path / "images", tmp_path / "ray", spec, batch_size=4,
                              compute_rows=engine, engine_report=engine.summary)
    assert report["images_extracted"] == 3
    assert list((tmp_path / "cache").glob("efficientnet_lite0-*.weights.h5"))


def test_no_cluster_at_the_address_is_a_user_error(tmp_path):
    images = write_images(tmp_path / "images", 2)
    engine = RayEngine(SPEC, 4, "127.0.0.1:1", progress=False)
    with pytest.raises(UserError, match="could not connect to the Ray cluster at 127.0.0.1:1"):
        extract_features(images, tmp_path / "images", tmp_path / "ray", SPEC, batch_size=4, compute_rows=engine)
    assert not (tmp_path / "ray" / "features.npy").exists()


def test_dvc_repro_on_the_cluster_matches_the_local_pipeline(cluster, demo_run, tmp_path):
    """The stage with features.engine: ray and RAY_ADDRESS writes the local run's data/features, with the
    same DVC hash, so switching engines does not retrain."""
    project = make_project(tmp_path / "project")
    set_params(project, {"features": {"engine": "ray"}})
    result = subprocess.run(["dvc", "repro", "extract_resnet_features"], cwd=project, capture_output=True,
                            text=True, timeout=600, env={**tool_env(), "RAY_ADDRESS": cluster.address})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "on Ray: 2 workers" in result.stdout
    same_outputs(demo_run / "data/features", project / "data/features",
                 files.read_json(demo_run / "data/reports/extract_report.json"),
                 files.read_json(project / "data/reports/extract_report.json"))
    assert features_hash(project) == features_hash(demo_run)
