"""Output files: captions drawn as text whatever they hold (matplotlib would read "$...$" as TeX and fail on
it), and written with the mode a new file gets."""
from __future__ import annotations

import os

import numpy as np
from PIL import Image

from captioning import files
from captioning.plots import captioned_image, image_grid

ODD_CAPTIONS = ["a red sign with a smiley $^_^$ on it", "a $5 and a $10 note", "$\\frac$ and $_$"]


def test_captions_with_dollar_signs_are_drawn_as_text(tmp_path):
    photo = tmp_path / "photo.jpg"
    Image.fromarray(np.full((24, 32, 3), 120, np.uint8)).save(photo)
    image_grid([(photo, caption) for caption in ODD_CAPTIONS], tmp_path / "grid.png", columns=3, title="odd")
    captioned_image(photo, ODD_CAPTIONS[0], tmp_path / "one.png")
    assert (tmp_path / "grid.png").stat().st_size > 0 and (tmp_path / "one.png").stat().st_size > 0


def test_outputs_get_the_mode_the_umask_gives_not_mkstemps_0600(tmp_path):
    """mkstemp makes 0600 files, and every output is renamed from one: other users of a shared project
    could not read the metrics or plots."""
    umask = os.umask(0o022)
    os.umask(umask)
    files.write_text(tmp_path / "metrics.json", "{}")
    assert (tmp_path / "metrics.json").stat().st_mode & 0o777 == 0o666 & ~umask
