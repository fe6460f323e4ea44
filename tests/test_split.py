"""Official split files as people have them: UTF-8 with or without a byte-order mark, UTF-16, cp1252, any
line ends, blank lines; and the rules a split must keep."""
from __future__ import annotations

import pytest

from captioning.errors import UserError
from captioning.split import OFFICIAL_FILES, official_split

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
