"""The `plot` stage's figures on small and unusual inputs (the stage runs on synthetic outputs, no repro)."""
from __future__ import annotations

import struct
import zlib

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from captioning import layout, plots


def write_stage_inputs(root, n_test: int) -> None:
    """What the plot stage reads: params, captions table, predictions, DVCLive curves and the images."""
    images = root / "images"
    images.mkdir()
    names = [f"img{i:02d}.png" for i in range(n_test)]
    for i, name in enumerate(names):
        Image.new("RGB", (32, 24), (i * 9 % 256, 80, 160)).save(images / name)
    (root / "params.yaml").write_text(yaml.safe_dump(
        {"data": {"images": str(images)}, "plot": {"n_samples": 2, "grid_size": 4}}))
    (root / "data").mkdir()
    pd.DataFrame({"image": names, "raw_caption": [f"a caption of {n}" for n in names]}).to_parquet(
        root / layout.CAPTIONS_TABLE)
    pd.DataFrame({"image": names, "generated": ["a thing"] * n_test,
                  "references": [["a ref", "another ref"]] * n_test,
                  "cider": np.linspace(0.1, 2.0, n_test)}).to_parquet(root / layout.PREDICTIONS)
    for split in ("train", "val"):
        for metric in ("loss", "accuracy"):
            folder = root / layout.LIVE_DIR / "plots" / "metrics" / split
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{metric}.tsv").write_text(f"timestamp\tstep\t{metric}\n0\t0\t0.5\n1\t1\t0.4\n")


@pytest.mark.parametrize("n_test", [1, 5, 6, 7, 11, 12, 20])
def test_best_worst_never_shows_an_image_twice_and_says_what_it_shows(tmp_path, monkeypatch, n_test):
    """A test split under 12 images used to fill both rows with the same images (the tiny project's 6
    test images were all "6 best" and all "6 worst") under a title promising 6 of each."""
    from stages import plot as stage

    write_stage_inputs(tmp_path, n_test)
    monkeypatch.chdir(tmp_path)
    grids = {}

    def record(items, path, columns=3, title=""):
        grids[path.name] = (items, columns, title)

    monkeypatch.setattr(plots, "image_grid", record)  # wherever the stage builds its grids from
    monkeypatch.setattr(stage, "image_grid", record, raising=False)
    stage.main()

    items, columns, title = grids["best_worst.png"]
    names = [path.name for path, _ in items]
    assert len(names) == len(set(names)), f"an image is shown twice: {names}"
    ciders = pd.read_parquet(layout.PREDICTIONS).set_index("image")["cider"]
    best, worst = names[:columns], names[columns:]
    assert best and len(best) <= 6 and len(worst) <= 6 and len(worst) <= len(best)
    assert min(ciders[best]) >= max(ciders[worst], default=-1.0), "a worst image scored above a best one"
    assert title.startswith(f"{len(best)} best (top) and {len(worst)} worst (bottom)"), title
    if n_test >= 12:  # a big enough split: six of each, as before
        assert (len(best), len(worst)) == (6, 6)
    else:  # every image shown (at most one odd image goes to the best row)
        assert len(best) + len(worst) == n_test and len(best) - len(worst) in (0, 1)


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares `width` x `height` pixels and holds none: opening it costs nothing."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def test_a_photo_too_large_for_extraction_is_no_crash_of_the_plot_stage(tmp_path, monkeypatch):
    """A 200-megapixel phone photo is over twice Pillow's bomb limit, so Image.open raises
    DecompressionBombError, which is no OSError: the stage died with a traceback when such a photo was
    among the samples (extraction refuses it with a reason; its captions stay in the table)."""
    from stages import plot as stage

    write_stage_inputs(tmp_path, 12)
    (tmp_path / "images" / "img00.png").write_bytes(png_header(16320, 12240))
    monkeypatch.chdir(tmp_path)
    stage.main()
    for name in ("samples", "learning_curves", "predictions", "best_worst"):
        with Image.open(tmp_path / layout.PLOTS_DIR / f"{name}.png") as figure:
            assert figure.width > 0

    fig, ax = plots.plt.subplots()
    try:  # the cell says why there is no picture, and no image is drawn
        plots._show(ax, tmp_path / "images" / "img00.png", "a caption")
        assert not ax.get_images() and [t.get_text() for t in ax.texts] == ["image too large to show"]
    finally:
        plots.plt.close(fig)


@pytest.mark.parametrize("side", [4, 3000])
def test_images_are_drawn_no_larger_than_needed(tmp_path, side):
    """Above the pixel limit extraction uses, an image is refused (not decoded); below it, it is drawn
    from at most DISPLAY_SIDE pixels a side, in its own proportions."""
    path = tmp_path / "photo.jpg"
    Image.new("RGB", (side, side // 2), (200, 30, 30)).save(path)
    fig, ax = plots.plt.subplots()
    try:
        plots._show(ax, path, "")
        (drawn,) = ax.get_images()
        height, width = drawn.get_array().shape[:2]
        assert max(height, width) <= min(side, plots.DISPLAY_SIDE)
        assert width / height == pytest.approx(2.0, rel=0.02)
    finally:
        plots.plt.close(fig)


def odd_mode_images(folder) -> dict[str, object]:
    """64 x 64 photos in the modes user data comes in, each with a content Pillow's convert("RGB") gets wrong."""
    gradient = np.linspace(0, 1, 64 * 64).reshape(64, 64)
    rgba = np.zeros((64, 64, 4), np.uint8)  # transparent black: a viewer shows white
    rgba[:32, :, :] = (200, 40, 40, 255)
    made = {
        "grey16.png": Image.fromarray((gradient * 65535).astype(np.uint16)),
        "float.tiff": Image.fromarray(gradient.astype(np.float32)),
        "rgba.png": Image.fromarray(rgba),
        "la.png": Image.fromarray(rgba[..., [0, 3]]),
        "cmyk.jpg": Image.new("CMYK", (64, 64), (0, 200, 100, 0)),
    }
    for name, image in made.items():
        image.save(folder / name)
    return made


@pytest.mark.parametrize("name", ["grey16.png", "float.tiff", "rgba.png", "la.png", "cmyk.jpg"])
def test_plots_draw_the_picture_extraction_gives_the_model(tmp_path, name):
    """Plots (and the caption command's --out) used Pillow's convert("RGB"): a 16-bit photo came out white,
    a float one black, transparency black, while extraction scales them and puts transparency on white."""
    from captioning.images import load_image

    odd_mode_images(tmp_path)
    fig, ax = plots.plt.subplots()
    try:
        plots._show(ax, tmp_path / name, "a caption")
        (drawn,) = ax.get_images()
        shown = np.asarray(drawn.get_array())
    finally:
        plots.plt.close(fig)
    model_sees = load_image(tmp_path / name, size=64)  # the images are 64 x 64: no resizing on either side
    assert shown.shape == model_sees.shape
    largest_difference = int(np.abs(shown.astype(int) - model_sees.astype(int)).max())
    assert largest_difference <= 1, (
        f"{name}: drawn mean {shown.mean(axis=(0, 1))}, the model's image {model_sees.mean(axis=(0, 1))}")
