"""Feature extraction split in shards and merged gives exactly the files of one run.

Small random images at image_size 32 (the smallest ResNet-50 accepts) keep the backbone fast on 2 cores.
"""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import yaml
from captioning.shards import SHARD_FILE, merge_shards, shard_images
from PIL import Image

from captioning import files
from captioning.errors import UserError
from captioning.tiny_project import tool_env

SIZE = 32
SETTINGS = {"weights": "random", "seed": 0, "image_size": SIZE, "precision": "float32", "backbone": "resnet50"}
TIMING = ("seconds", "images_per_second", "shards")


def write_images(folder) -> list[str]:
    """Ten good images of different sizes, one that is not an image, one listed but missing."""
    folder.mkdir(parents=True)
    names = []
    for i in range(10):
        rng = np.random.default_rng(i)
        pixels = rng.integers(0, 256, (30 + 3 * i, 50 - 2 * i, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i:02d}.jpg", quality=90)
        names.append(f"img{i:02d}.jpg")
    (folder / "notes.jpg").write_text("not a photo\n")
    return sorted(names + ["notes.jpg", "gone.jpg"])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One extraction of all images, and the same images as two shards (with another batch size)."""
    from captioning.shards import extract_shard

    from captioning.backbones import make_spec
    from captioning.features import extract_features

    root = tmp_path_factory.mktemp("shards")
    images = write_images(root / "images")
    spec = make_spec(**SETTINGS)
    extract_features(images, root / "images", root / "single", spec, batch_size=4)
    for index in range(2):
        extract_shard(images, root / "images", root / f"shard{index}", spec, batch_size=3, index=index, count=2)
    return root, images


def project_with(root, images) -> None:
    """What the merge-features command reads from the project folder."""
    files.write_lines(root / "data/images.txt", images)
    (root / "params.yaml").write_text(yaml.safe_dump({"features": {**SETTINGS, "batch_size": 4}}))


def merge_command(root, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "captioning", "merge-features", *map(str, args)], cwd=root,
                          capture_output=True, text=True, env=tool_env(), timeout=120)


def test_two_shards_merged_equal_one_run(runs):
    root, images = runs
    project_with(root, images)
    result = merge_command(root, root / "shard1", root / "shard0", "--out", root / "merged")  # any order
    assert result.returncode == 0, result.stderr
    single, merged = root / "single", root / "merged"
    assert (merged / "features.npy").read_bytes() == (single / "features.npy").read_bytes()
    assert np.load(merged / "features.npy").shape == (10, 2048)
    pd.testing.assert_frame_equal(pd.read_parquet(merged / "index.parquet"), pd.read_parquet(single / "index.parquet"))
    assert (merged / "backbone.json").read_bytes() == (single / "backbone.json").read_bytes()
    one, joined = files.read_json(single / "report.json"), files.read_json(merged / "report.json")
    assert {k: v for k, v in joined.items() if k not in TIMING} == {k: v for k, v in one.items() if k not in TIMING}
    assert [f["image"] for f in joined["failed"]] == ["gone.jpg", "notes.jpg"]
    assert [s["images"] for s in joined["shards"]] == [6, 6]
    assert sorted(p.name for p in merged.iterdir()) == ["backbone.json", "features.npy", "index.parquet", "report.json"]


def test_shards_take_every_nth_image():
    names = [f"{i}.jpg" for i in range(7)]
    assert shard_images(names, 0, 3) == ["0.jpg", "3.jpg", "6.jpg"]
    assert shard_images(names, 2, 3) == ["2.jpg", "5.jpg"]
    assert sorted(sum((shard_images(names, i, 3) for i in range(3)), [])) == names
    for index, count in ((3, 3), (-1, 2), (0, 0), (0, 8)):
        with pytest.raises(UserError, match="shard"):
            shard_images(names, index, count)


def test_merge_refuses_an_incomplete_or_mixed_set(runs, tmp_path):
    root, images = runs
    with pytest.raises(UserError, match="shard 0 of 2, but 1 folders were given"):
        merge_shards([root / "shard0"], images, tmp_path / "out")
    with pytest.raises(UserError, match="are both shard 0"):
        merge_shards([root / "shard0", root / "shard0"], images, tmp_path / "out")
    with pytest.raises(UserError, match="another image list"):
        merge_shards([root / "shard0", root / "shard1"], images[:-1], tmp_path / "out")
    with pytest.raises(UserError, match="features.seed=0 but params.yaml has 5"):
        merge_shards([root / "shard0", root / "shard1"], images, tmp_path / "out", {**SETTINGS, "seed": 5})
    with pytest.raises(UserError, match="is not a finished shard"):
        merge_shards([root / "shard0", root / "single"], images, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_shard_of_only_bad_images_still_merges(runs, tmp_path):
    from captioning.shards import extract_shard

    from captioning.backbones import make_spec

    root, _ = runs
    images = ["img00.jpg", "notes.jpg", "img01.jpg"]  # shard 1 of 2 is notes.jpg alone
    spec = make_spec(**SETTINGS)
    for index in range(2):
        extract_shard(images, root / "images", tmp_path / f"s{index}", spec, batch_size=2, index=index, count=2)
    assert np.load(tmp_path / "s1/features.npy").shape == (0, 2048)
    report = merge_shards([tmp_path / "s0", tmp_path / "s1"], images, tmp_path / "out", SETTINGS)
    assert report["images_extracted"] == 2 and report["failed"][0]["image"] == "notes.jpg"
    index = pd.read_parquet(tmp_path / "out/index.parquet")
    assert list(index["image"]) == ["img00.jpg", "img01.jpg"]
    single = np.load(root / "single/features.npy")
    np.testing.assert_array_equal(np.load(tmp_path / "out/features.npy"), single[:2])  # img00, img01 lead


def test_extract_shard_command_reads_the_project(runs, tmp_path):
    """The CLI extracts from params.yaml + data/images.txt, like the stage, and marks the folder a shard."""
    root, images = runs
    project_with(tmp_path, images)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(
        {"data": {"images": str(root / "images")}, "features": {**SETTINGS, "batch_size": 4}}))
    result = subprocess.run([sys.executable, "-m", "captioning", "extract-shard", "--index", "1", "--count", "2",
                             "--out", "part"], cwd=tmp_path, capture_output=True, text=True,
                            env=tool_env(), timeout=300)
    assert result.returncode == 0, result.stderr
    assert "shard 1 of 2: 5 images" in result.stdout
    assert files.read_json(tmp_path / "part" / SHARD_FILE)["index"] == 1
    assert (tmp_path / "part/features.npy").read_bytes() == (root / "shard1/features.npy").read_bytes()
