"""Shared fixtures: a tiny `dvc repro` of the demo project and the real data. The helpers the tests and
benchmarks share are in tests/helpers.py and captioning/tiny_project.py, not here."""
from __future__ import annotations

import inspect
import os
from pathlib import Path

import pytest

from captioning.tiny_project import make_project, run

# A test that runs a whole `dvc repro` (no stage named), itself or through a fixture (even indirectly),
# must be marked slow.
REPRO_FIXTURES = ("demo_run",)
WHOLE_REPRO = '["dvc", "repro"]'


def runs_whole_repro(item) -> bool:
    if any(name in REPRO_FIXTURES for name in item.fixturenames):
        return True
    function = getattr(item, "function", None)
    return function is not None and WHOLE_REPRO in inspect.getsource(function)


# The longest test files (minutes on 2 cores), started first: xdist hands out whole files (--dist loadfile) in
# collection order (--no-loadscope-reorder; its default order, most tests first, started the ~400 s real-photo
# file 21 minutes into a 25-minute run), so the run takes about max(longest file, half of all) instead.
LONGEST_FIRST = ("test_real_flickr8k_pipeline.py", "test_pipeline.py", "test_extract_ray.py", "test_experiments.py",
                 "test_scst.py", "test_distributed.py")


def pytest_collection_modifyitems(items):
    """Refuse to run a test that needs a whole `dvc repro` without the `slow` marker; start the longest files."""
    unmarked = [item.nodeid for item in items if item.get_closest_marker("slow") is None and runs_whole_repro(item)]
    if unmarked:
        raise pytest.UsageError(f"mark these @pytest.mark.slow, they run a whole `dvc repro`: {', '.join(unmarked)}")
    rank = {name: index for index, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


@pytest.fixture(scope="session")
def flickr8k() -> Path:
    """The real Flickr8k folder from $FLICKR8K_DIR: skipped when unset, a failure when set but missing."""
    value = os.environ.get("FLICKR8K_DIR")
    if not value:
        pytest.skip("FLICKR8K_DIR is not set (CI sets it to ../shared/flickr8k)")
    folder = Path(value).resolve()  # a relative path would otherwise be read from each test project's folder
    needed = ["Flickr8k.token.txt", "captions.txt", "Flickr_8k.trainImages.txt", "Images"]
    missing = [name for name in needed if not (folder / name).exists()]
    if missing:
        pytest.fail(f"FLICKR8K_DIR={folder} is set but lacks {', '.join(missing)}")
    return folder


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory) -> Path:
    """One full `dvc repro` of the tiny demo project, shared by the tests that only read its outputs."""
    project = make_project(tmp_path_factory.mktemp("demo_run") / "project")
    run(["dvc", "repro"], project)
    return project
