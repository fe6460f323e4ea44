"""caption_files, the caption command's loop, with the model stubbed: what it keeps while it works."""
from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np

from captioning import inference


def test_fetched_images_are_not_kept_when_no_picture_is_drawn(monkeypatch):
    """Every URL's bytes were kept to the end of the call for --out, even without --out: captioning a list of
    a thousand photo URLs held a thousand photos (up to --fetch-max-mb each) in memory at once."""
    size = 2 * 2**20

    class Loaded:
        image_size = 8

        def __init__(self, *args, **kwargs):
            pass

        def caption(self, pixels):
            return [inference.Decoded("a dog runs", []) for _ in pixels]

    monkeypatch.setattr(inference, "LoadedCaptioner", Loaded)
    monkeypatch.setattr(inference, "read_source",
                        lambda source, image_size, limits: (np.zeros((8, 8, 3), np.uint8), bytes(size)))
    urls = [f"https://example.com/{n}.jpg" for n in range(20)]
    tracemalloc.start()
    try:
        results, errors = inference.caption_files(urls, Path("unused"), {})
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [caption for _, caption in results] == ["a dog runs"] * 20 and not errors
    assert peak < 5 * size, f"{peak / 2**20:.0f} MB at the peak for {size / 2**20:.0f} MB photos"
