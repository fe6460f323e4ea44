"""Official split files as people have them: UTF-8 with or without a byte-order mark, UTF-16, cp1252, any
line ends, blank lines; and the rules a split must keep."""
from __future__ import annotations

import pytest

from captioning.errors import UserError
from captioning.split import OFFICIAL_FILES, official_split, seeded_split

IMAGES = ["a.jpg", "b.jpg", "c.jpg", "café.jpg", "d.jpg"]


def write_split(folder, lists: dict[str, list[str]], encoding: str = "utf-8", line_end: str = "\n") -> None:
    for name, filename in OFFICIAL_FILES.items():
        (folder / filename).write_bytes((line_end.join(lists[name]) + line_end).encode(encoding))


@pytest.mark.parametrize("encoding,line_end", [("utf-8", "\n"), ("utf-8-sig", "\r\n"), ("utf-16", "\r\n"),
                                               ("cp1252", "\r"), ("utf-8", "\n\n  ")])
def test_split_files_are_read_however_they_were_saved(tmp_path, encoding, line_end):
    write_split(tmp_path, {"train": ["a.jpg", "café.jpg", "b.jpg"], "dev": ["c.jpg"], "test": ["d.jpg", "gone.jpg"]},
                encoding, line_end)
    splits, report = official_split(tmp_path, IMAGES)
    assert splits == {"train": ["a.jpg", "b.jpg", "café.jpg"], "dev": ["c.jpg"], "test": ["d.jpg"]}
    assert report["test"] == {"listed": 2, "available": 1} and report["images_in_no_split"]["count"] == 0


def test_an_image_in_two_splits_is_refused(tmp_path):
    write_split(tmp_path, {"train": ["a.jpg", "b.jpg"], "dev": ["b.jpg"], "test": ["c.jpg"]})
    with pytest.raises(UserError, match="b.jpg is listed in both Flickr_8k.trainImages.txt and "
                                        "Flickr_8k.devImages.txt"):
        official_split(tmp_path, IMAGES)


def test_a_missing_split_file_is_named(tmp_path):
    write_split(tmp_path, {"train": ["a.jpg"], "dev": ["b.jpg"], "test": ["c.jpg"]})
    (tmp_path / OFFICIAL_FILES["dev"]).unlink()
    with pytest.raises(UserError, match="Flickr_8k.devImages.txt is missing"):
        official_split(tmp_path, IMAGES)


def run_split_stage(folder, check: bool = True, **changes):
    """`python -m stages.split` in `folder`, over IMAGES' captions, with the project's params and `changes`
    ({section: {key: value}})."""
    import subprocess
    import sys

    import pandas as pd
    import yaml
    from helpers import stages_env

    from captioning.tiny_project import PROJECT

    params = yaml.safe_load((PROJECT / "params.yaml").read_text())
    for section, values in changes.items():
        params[section].update(values)
    (folder / "params.yaml").write_text(yaml.safe_dump(params))
    (folder / "data").mkdir(exist_ok=True)
    pd.DataFrame({"image": IMAGES}).to_parquet(folder / "data/captions.parquet")
    return subprocess.run([sys.executable, "-m", "stages.split"], cwd=folder, env=stages_env(),
                          capture_output=True, text=True, check=check)


def test_captioned_images_in_no_split_file_are_counted_on_the_stage_line(tmp_path):
    """Real Flickr8k lists 8,000 of its 8,091 photos: the rest are used nowhere, which the stage's line
    must say, not only the report (where it names them)."""
    import yaml

    (tmp_path / "lists").mkdir()
    write_split(tmp_path / "lists", {"train": ["a.jpg", "b.jpg"], "dev": ["c.jpg"], "test": ["gone.jpg"]})
    result = run_split_stage(tmp_path, data={"split_dir": "lists"})
    assert result.stdout.startswith("train 2 of 2 listed images, dev 1 of 1 listed images, test 0 of 1 listed images")
    assert "2 captioned images in no split file, not used (named in data/reports/split_report.json)" in result.stdout
    report = yaml.safe_load((tmp_path / "data/reports/split_report.json").read_text())
    assert report["images_in_no_split"]["images"] == ["café.jpg", "d.jpg"]


def test_the_seeded_split_line_counts_each_split():
    from captioning.split import summary

    splits, report = seeded_split(IMAGES, 0, 0.6, 0.2)
    assert summary(splits, report, "r.json") == "train 3 images, dev 1 images, test 1 images"


@pytest.mark.parametrize("official", [True, False])
def test_an_empty_dev_split_stops_the_split_stage_not_training(tmp_path, official):
    """Training needs dev photos (their loss picks the epoch kept), but an empty dev split passed `split` and
    stopped only `train_lstm`, after the whole extraction had run."""
    if official:
        (tmp_path / "lists").mkdir()
        write_split(tmp_path / "lists", {"train": ["a.jpg", "b.jpg"], "dev": ["gone.jpg"], "test": ["c.jpg"]})
        result = run_split_stage(tmp_path, check=False, data={"split_dir": "lists"})
        remedy = "the official lists in data.split_dir name none of your photos for it"
    else:
        result = run_split_stage(tmp_path, check=False, split={"train_fraction": 0.8, "dev_fraction": 0.0})
        remedy = "raise split.train_fraction / split.dev_fraction"
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "the dev split is empty, and training needs both train and dev photos" in result.stderr
    assert remedy in result.stderr
    assert not (tmp_path / "data/split").exists()  # nothing for a later stage to take as a split


def test_the_seeded_split_follows_its_seed_and_keeps_every_image_once():
    """split.seed must matter (a split that ignored it would make every seed the same experiment) and the same
    seed must give the same lists; each image lands in exactly one split."""
    images = [f"{n:04d}.jpg" for n in range(200)]
    first, _ = seeded_split(images, 1, 0.8, 0.1)
    assert seeded_split(list(reversed(images)), 1, 0.8, 0.1)[0] == first  # the input's order does not matter
    assert seeded_split(images, 2, 0.8, 0.1)[0]["test"] != first["test"]
    assert sorted(sum(first.values(), [])) == images
    assert [len(first[name]) for name in ("train", "dev", "test")] == [160, 20, 20]
