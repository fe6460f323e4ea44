"""Sharing runs through a DVC remote, as the README's "Sharing runs" section says: `dvc push` in one
clone, `git clone` + `dvc pull` in another, and there `dvc repro` reruns nothing. The inputs travel
the same way, tracked with `dvc add` as a user's own captions and photos would be.

A local folder stands in for the remote (S3, SSH, a shared drive: the same commands). The finished run
is the session's tiny `dvc repro`, copied, so this costs git, push, pull and a no-op repro.
"""
from __future__ import annotations

import pytest
from helpers import copy_project, stages_run

from captioning.tiny_project import run

PULLED = ("data/demo/captions.pkl", "data/model/model.keras", "data/features/features.npy",
          "data/predictions.parquet", "plots/predictions.png")


@pytest.mark.slow
def test_push_on_one_clone_pull_on_another_reruns_nothing(demo_run, tmp_path):
    origin = copy_project(demo_run, tmp_path / "origin")  # the shared run stays untouched
    remote = tmp_path / "remote"
    run(["dvc", "remote", "add", "-d", "shared", str(remote)], origin)
    run(["dvc", "add", "data/demo"], origin)  # the inputs, as your own data under data/ would be tracked
    run(["git", "add", "-A"], origin)
    run(["git", "commit", "-qm", "run, and the shared remote"], origin)
    run(["dvc", "push"], origin)
    assert any(remote.rglob("*")), "dvc push wrote nothing to the remote"

    other = tmp_path / "other"
    run(["git", "clone", "-q", str(origin), str(other)], tmp_path)
    assert (other / "data/demo.dvc").is_file()  # committed: .gitignore lets `dvc add`'s pointer into git
    assert not (other / "data/demo").exists() and not (other / "data/model").exists()
    before = run(["dvc", "status"], other).stdout
    assert "deleted" in before, before  # without the pull there is something to rerun: the check can fail

    run(["dvc", "pull"], other)
    status = run(["dvc", "status"], other).stdout
    assert "Data and pipelines are up to date." in status, status
    repro = run(["dvc", "repro"], other)
    assert stages_run(repro.stdout) == [], repro.stdout
    for name in PULLED:
        assert (other / name).read_bytes() == (origin / name).read_bytes(), name
