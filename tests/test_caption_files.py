"""caption_files, the caption command's loop, with the model stubbed: what it keeps while it works."""
from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np

from captioning import inference


class _Loaded:
    """The model, stubbed: every image is "a dog runs"."""
    image_size = 8

    def __init__(self, *args, **kwargs):
        pass

    def caption(self, pixels):
        return [inference.Decoded("a dog runs", []) for _ in pixels]


def _fetched(size: int):
    """read_source, stubbed: any source but "missing" is an image whose fetched bytes are `size` long."""
    def read_source(source, image_size, limits):
        if str(source).endswith("missing"):
            raise inference.ImageError("file not found")
        return np.zeros((8, 8, 3), np.uint8), bytes(size)
    return read_source


def _peak_while(call):
    tracemalloc.start()
    try:
        return call(), tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_fetched_images_are_not_kept_when_no_picture_is_drawn(monkeypatch):
    """Every URL's bytes were kept to the end of the call for --out, even without --out: captioning a list of
    a thousand photo URLs held a thousand photos (up to --fetch-max-mb each) in memory at once."""
    size = 2 * 2**20
    monkeypatch.setattr(inference, "LoadedCaptioner", _Loaded)
    monkeypatch.setattr(inference, "read_source", _fetched(size))
    urls = [f"https://example.com/{n}.jpg" for n in range(20)]
    (results, errors), peak = _peak_while(lambda: inference.caption_files(urls, Path("unused"), {}))
    assert [caption for _, caption in results] == ["a dog runs"] * 20 and not errors
    assert peak < 5 * size, f"{peak / 2**20:.0f} MB at the peak for {size / 2**20:.0f} MB photos"


def test_pictures_are_numbered_by_argument_and_drawn_batch_by_batch(monkeypatch, tmp_path):
    """--out numbered pictures by how many images had been read before, so after an unreadable second
    argument the third image's picture was x-2.png; and every batch's fetched bytes were kept to the end."""
    size = 2 * 2**20
    drawn = []
    monkeypatch.setattr(inference, "LoadedCaptioner", _Loaded)
    monkeypatch.setattr(inference, "read_source", _fetched(size))
    monkeypatch.setattr("captioning.plots.captioned_image", lambda image, caption, target: drawn.append(target.name))
    sources = ["https://example.com/a.jpg", "missing", *(f"https://example.com/{n}.jpg" for n in range(18))]
    (results, errors), peak = _peak_while(
        lambda: inference.caption_files(sources, Path("unused"), {}, out=tmp_path / "x.png", batch_size=2))
    assert errors == [("missing", "file not found")] and len(results) == 19
    assert drawn == ["x-1.png", *(f"x-{n}.png" for n in range(3, 21))]
    assert peak < 5 * size, f"{peak / 2**20:.0f} MB at the peak for {size / 2**20:.0f} MB photos"
