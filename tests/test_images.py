"""`load_image` on every kind of file users ship: each gives the right upright RGB pixels or a precise
ImageError. Every file is built here, tiny, with Pillow/NumPy (no TensorFlow, runs in about a second)."""
from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from captioning import images
from captioning.images import ImageError, load_image

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def mean_colour(array: np.ndarray) -> np.ndarray:
    return array.reshape(-1, 3).astype(float).mean(0)


def assert_colour(array: np.ndarray, expected, tolerance: float = 12) -> None:
    assert np.abs(mean_colour(array) - np.array(expected, float)).max() <= tolerance, mean_colour(array)


def assert_rgb(array: np.ndarray, size: int) -> None:
    assert array.shape == (size, size, 3) and array.dtype == np.uint8


def halves(height: int, width: int, left=RED, right=BLUE) -> np.ndarray:
    """An image whose left half is `left` and right half is `right`."""
    pixels = np.empty((height, width, 3), np.uint8)
    pixels[:, : width // 2] = left
    pixels[:, width // 2:] = right
    return pixels


def png_header(width: int, height: int) -> bytes:
    """A valid PNG signature + IHDR claiming width x height, with an empty IDAT: a few dozen bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def reason(path, size: int = 16) -> str:
    with pytest.raises(ImageError) as caught:
        load_image(path, size)
    return str(caught.value)


# ------------------------------------------------------------------------------------------ refused

def test_missing_file(tmp_path):
    assert reason(tmp_path / "nowhere.jpg") == "file not found: check the path"


def test_a_broken_symlink_is_named_with_its_target(tmp_path):
    """A link whose target is gone was "file not found", sending the user after a file that is right there."""
    (tmp_path / "photo.jpg").symlink_to(tmp_path / "moved away.jpg")
    text = reason(tmp_path / "photo.jpg")
    assert text.startswith("broken symbolic link") and str(tmp_path / "moved away.jpg") in text


def test_a_symlink_to_an_image_is_read_through(tmp_path):
    Image.new("RGB", (32, 32), RED).save(tmp_path / "real.png")
    (tmp_path / "link.jpg").symlink_to("real.png")  # relative, as `ln -s` makes it
    assert_colour(load_image(tmp_path / "link.jpg", 8), RED, 0)


def cut_file(kind: str) -> bytes:
    """The first bytes of a file of that kind: its signature, and not enough header to open it."""
    if kind == "HEIF":
        return b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64)  # an iPhone's photo
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), RED).save(buffer, format=kind)
    return buffer.getvalue()[:{"GIF": 20, "AVIF": 100}[kind]]


@pytest.mark.parametrize("kind", ["HEIF", "AVIF", "GIF"])
def test_a_photo_cut_short_in_its_header_is_named_as_damaged(tmp_path, kind):
    """A download of a GIF, AVIF or HEIC interrupted in its header was "not an image file Pillow can read ...:
    convert it to JPEG or PNG", which a cut file cannot be: it is named as the damaged photo it is, with
    getting it again first among what to do."""
    (tmp_path / "photo.img").write_bytes(cut_file(kind))
    text = reason(tmp_path / "photo.img")
    assert text.startswith(f"{kind} file that cannot be opened") and "cut short" in text and images.REDO in text
    assert reason(cut_file(kind)) == text  # an upload is told the same


@pytest.mark.parametrize(("content", "named", "remedy"), [
    (b"\n<!DOCTYPE html>\n<html><head><title>404 Not Found</title>", "web page", "download the image itself"),
    (b"<html lang='en'><body><img src='dog.jpg'></body></html>", "web page", "download the image itself"),
    (b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>', "SVG", "PNG"),
    (b'<svg xmlns="http://www.w3.org/2000/svg"><circle r="4"/></svg>', "SVG", "PNG"),
], ids=["html error page", "html page", "svg with xml header", "svg"])
def test_a_web_page_or_a_drawing_is_named_for_what_it_is(tmp_path, content, named, remedy):
    """A download that got an error page, saved as photo.jpg, or a page's URL given to the server or the
    caption command where its image's was meant, and an SVG logo: all were "not an image file Pillow can
    read ...: convert it to JPEG or PNG", which is no help for a web page."""
    (tmp_path / "photo.jpg").write_bytes(content)
    text = reason(tmp_path / "photo.jpg")
    assert named in text and remedy in text
    assert reason(content) == text  # an upload, or a URL's body, is told the same


@pytest.mark.parametrize("kind", ["empty", "truncated", "not an image", "missing", "folder"])
def test_every_refusal_says_what_to_do(tmp_path, kind):
    """The team's rule for bad input: the error names the problem and what to do about it, the same for
    extraction's report, the caption command and the server (all read this message)."""
    path = tmp_path / "photo.jpg"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        Image.new("RGB", (64, 64), RED).save(tmp_path / "full.jpg")
        path.write_bytes((tmp_path / "full.jpg").read_bytes()[:200])
    elif kind == "not an image":
        path.write_text("holiday notes\n")
    elif kind == "folder":
        path.mkdir()
    problem, _, advice = reason(path).rpartition(": ")
    assert problem and any(verb in advice for verb in ("again", "convert", "check", "name")), (problem, advice)


def test_folder_instead_of_file(tmp_path):
    (tmp_path / "photo.jpg").mkdir()
    assert "folder" in reason(tmp_path / "photo.jpg")


def test_zero_byte_file(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    assert reason(tmp_path / "empty.jpg").startswith("empty file (0 bytes)")


@pytest.mark.parametrize("keep", [0.5, 0.98], ids=["half", "tail-cut"])
def test_truncated_jpeg(tmp_path, keep):
    noise = np.random.default_rng(0).integers(0, 256, (96, 96, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "full.jpg", quality=90)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: int(len(data) * keep)])
    assert "truncated" in reason(tmp_path / "cut.jpg")


def test_jpeg_header_only(tmp_path):
    Image.new("RGB", (64, 64), RED).save(tmp_path / "full.jpg")
    (tmp_path / "head.jpg").write_bytes((tmp_path / "full.jpg").read_bytes()[:200])
    assert reason(tmp_path / "head.jpg").startswith("cannot decode image")


def test_text_file_named_jpg(tmp_path):
    (tmp_path / "notes.jpg").write_text("these are my holiday notes, not a photo\n")
    assert reason(tmp_path / "notes.jpg").startswith("not an image file")


def test_decompression_bomb_over_twice_the_limit_real_limit(tmp_path):
    """Pillow's own hard error (> 2x MAX_IMAGE_PIXELS), from a 60-byte header: nothing is decoded."""
    (tmp_path / "bomb.png").write_bytes(png_header(20_000, 20_000))  # 400 Mpx > 2 x 89.5 Mpx
    assert "decompression bomb" in reason(tmp_path / "bomb.png")


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # pytest resets our module filter
def test_decompression_bomb_between_limit_and_twice_real_limit(tmp_path):
    """Pillow only warns between 1x and 2x its limit; load_image must refuse, not decode 100 Mpx."""
    (tmp_path / "bomb.png").write_bytes(png_header(10_000, 10_000))  # 100 Mpx: over 89.5, under 179
    text = reason(tmp_path / "bomb.png")
    assert "decompression bomb" in text and "10000x10000" in text


def test_pixel_limit_is_configurable(tmp_path, monkeypatch):
    """A real (small) image over a lowered MAX_PIXELS is refused; under it, loaded."""
    Image.new("RGB", (40, 30), RED).save(tmp_path / "big.png")
    monkeypatch.setattr(images, "MAX_PIXELS", 1000)
    assert "40x30" in reason(tmp_path / "big.png")
    monkeypatch.setattr(images, "MAX_PIXELS", 1200)
    assert_colour(load_image(tmp_path / "big.png", 8), RED, 0)


# ------------------------------------------------------------------------------------------ accepted

def test_plain_jpeg_resized_to_requested_square(tmp_path):
    Image.fromarray(halves(48, 80)).save(tmp_path / "plain.jpg", quality=95)
    array = load_image(tmp_path / "plain.jpg", 20)
    assert_rgb(array, 20)
    assert_colour(array[:, :8], RED)
    assert_colour(array[:, 12:], BLUE)


def test_png_bytes_named_jpg(tmp_path):
    Image.fromarray(halves(32, 32)).save(tmp_path / "actually_png.jpg", format="PNG")
    array = load_image(tmp_path / "actually_png.jpg", 16)
    assert_rgb(array, 16)
    assert (array[:, :7] == RED).all() and (array[:, 9:] == BLUE).all()


def test_grayscale(tmp_path):
    Image.fromarray(np.full((24, 24), 100, np.uint8), mode="L").save(tmp_path / "grey.jpg", quality=95)
    array = load_image(tmp_path / "grey.jpg", 16)
    assert_rgb(array, 16)
    assert_colour(array, (100, 100, 100), 2)


def test_cmyk_jpeg_colours(tmp_path):
    # Magenta + yellow = red. Adobe CMYK JPEGs store inverted values: a classic source of wrong colours.
    Image.new("CMYK", (32, 32), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=95)
    assert Image.open(tmp_path / "cmyk.jpg").mode == "CMYK"
    array = load_image(tmp_path / "cmyk.jpg", 16)
    assert_rgb(array, 16)
    assert_colour(array, RED, 20)
    Image.new("CMYK", (32, 32), (255, 255, 0, 0)).save(tmp_path / "cmyk_blue.jpg", quality=95)
    assert_colour(load_image(tmp_path / "cmyk_blue.jpg", 16), BLUE, 20)


def test_rgba_transparent_area_is_white(tmp_path):
    pixels = np.zeros((32, 32, 4), np.uint8)  # right half fully transparent (its RGB is black)
    pixels[:, :16] = (*RED, 255)
    Image.fromarray(pixels, mode="RGBA").save(tmp_path / "alpha.png")
    array = load_image(tmp_path / "alpha.png", 32)
    assert_rgb(array, 32)
    assert (array[:, :15] == RED).all()
    assert (array[:, 17:] == WHITE).all()


def test_palette_png_with_transparency_is_white(tmp_path):
    image = Image.new("P", (16, 16), 0)
    image.putpalette([0, 0, 0, *RED])
    image.paste(1, (0, 0, 8, 16))
    image.save(tmp_path / "palette.png", transparency=0)
    array = load_image(tmp_path / "palette.png", 16)
    assert (array[:, :7] == RED).all() and (array[:, 9:] == WHITE).all()


@pytest.mark.parametrize("mode,key", [("RGB", (0, 0, 0)), ("L", 0)])
def test_a_png_colour_key_is_transparent_and_comes_out_white(tmp_path, mode, key):
    image = Image.new(mode, (16, 16), key)
    image.paste(RED if mode == "RGB" else 200, (0, 0, 8, 16))
    image.save(tmp_path / "keyed.png", transparency=key)  # a tRNS chunk: pixels of the key colour are transparent
    array = load_image(tmp_path / "keyed.png", 16)
    assert (array[:, 9:] == WHITE).all()
    assert (array[:, :7] == (RED if mode == "RGB" else (200, 200, 200))).all()


def test_a_16_bit_png_colour_key_comes_out_white_as_an_8_bit_one_does(tmp_path):
    """A 16-bit grey PNG's tRNS grey was dropped when the image was scaled to 8 bits, so its see-through
    pixels came out as their underlying grey (black here), where the same picture in 8 bits gives white."""
    pixels = np.zeros((16, 16), np.uint16)
    pixels[:, :8] = 200 * 257  # light grey left half; the right half (0) is the transparent key
    pixels[0, 0] = 1           # a grey the key does not name, though it rounds to the same 8-bit grey
    Image.fromarray(pixels).save(tmp_path / "deep.png", transparency=0)
    Image.fromarray((pixels // 257).astype(np.uint8)).save(tmp_path / "plain.png", transparency=0)
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    deep = load_image(tmp_path / "deep.png", 16)
    assert (deep[:, 9:] == WHITE).all()
    assert (deep[1:, :7] == (200, 200, 200)).all()
    assert (deep[0, 0] <= 1).all()  # not the key: stays black
    assert (load_image(tmp_path / "plain.png", 16)[:, 9:] == WHITE).all()


def test_16_bit_grayscale_uses_full_range(tmp_path):
    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (8, 1))
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    array = load_image(tmp_path / "deep.png", 64)
    assert_rgb(array, 64)
    row = array[0, :, 0].astype(int)
    assert row[0] <= 2 and row[-1] >= 253                     # full 8-bit range
    assert np.all(np.diff(row) >= 0)                           # still a ramp
    assert (array[..., 0] == array[..., 1]).all()              # still grey
    assert abs(int(array[0, 32, 0]) - 130) <= 4                # mid-grey, not clipped to white
    # A dark 16-bit image stays dark: scaled by the type's range, not stretched by its own maximum.
    Image.fromarray(np.full((8, 8), 65535 // 4, np.uint16)).save(tmp_path / "dark.png")
    assert_colour(load_image(tmp_path / "dark.png", 8), (64, 64, 64), 2)


@pytest.mark.parametrize("orientation, top, bottom", [(6, RED, BLUE), (8, BLUE, RED)])
def test_exif_rotated_jpeg_comes_out_upright(tmp_path, orientation, top, bottom):
    """Stored sideways (left half red) with an orientation tag: 6 turns it clockwise, 8 anticlockwise."""
    image = Image.fromarray(halves(32, 64))
    exif = image.getexif()
    exif[0x0112] = orientation
    image.save(tmp_path / "phone.jpg", exif=exif.tobytes(), quality=95)
    array = load_image(tmp_path / "phone.jpg", 32)
    assert_rgb(array, 32)
    assert_colour(array[:14], top)
    assert_colour(array[18:], bottom)


def test_corrupt_exif_still_loads(tmp_path):
    Image.new("RGB", (16, 16), BLUE).save(tmp_path / "odd.jpg", exif=b"Exif\x00\x00garbage", quality=95)
    assert_colour(load_image(tmp_path / "odd.jpg", 8), BLUE)


def test_same_file_gives_same_pixels(tmp_path):
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(tmp_path / "a.jpg")
    assert np.array_equal(load_image(tmp_path / "a.jpg", 24), load_image(tmp_path / "a.jpg", 24))


def test_32_bit_float_grayscale_tiff_is_not_black(tmp_path):
    ramp = np.tile(np.linspace(0.0, 1.0, 64, dtype=np.float32), (8, 1))  # the usual 0..1 float image
    Image.fromarray(ramp, mode="F").save(tmp_path / "float.tif")
    assert Image.open(tmp_path / "float.tif").mode == "F"
    array = load_image(tmp_path / "float.tif", 64)
    assert_rgb(array, 64)
    row = array[0, :, 0].astype(int)
    assert row[0] <= 2 and row[-1] >= 253 and np.all(np.diff(row) >= 0)
    # Values above 1 are scaled by the image's maximum instead of clipped to white.
    wide = np.tile(np.linspace(0.0, 1000.0, 64, dtype=np.float32), (8, 1))
    Image.fromarray(wide, mode="F").save(tmp_path / "wide.tif")
    row = load_image(tmp_path / "wide.tif", 64)[0, :, 0].astype(int)
    assert abs(row[32] - 130) <= 4 and row[-1] >= 253


# ------------------------------------------------------------------ HEIC (iPhones' photos), through pi-heif

HEIC = Path(__file__).parent / "fixtures" / "heic"  # made from real photos by make_fixtures.py there
SIZE = 224  # the network's input size: enough pixels for a fair mean difference


def mean_difference(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(float) - b.astype(float)).mean())


@pytest.mark.parametrize("name", ["upright.heic", "rotated.heic"])
def test_a_heic_photo_loads_upright_close_to_the_jpeg_it_was_made_from(flickr8k, name):
    """rotated.heic is stored sideways with both a HEIF rotation and EXIF Orientation 6, as an iPhone writes
    it: turned once it is upright, turned twice (or not at all) it is sideways. HEIC and JPEG are both lossy,
    so the margin is a few grey levels; a turned copy of a photo is tens of levels away."""
    from fixtures.heic.make_fixtures import PHOTOS

    heic = load_image(HEIC / name, SIZE)
    jpeg = load_image(flickr8k / "Images" / PHOTOS[name], SIZE)
    assert_rgb(heic, SIZE)
    assert mean_difference(heic, jpeg) < 4
    for turns in (1, 2, 3):
        assert mean_difference(np.rot90(heic, turns), jpeg) > 5 * mean_difference(heic, jpeg)
    assert np.array_equal(load_image((HEIC / name).read_bytes(), SIZE), heic)  # an upload reads the same


@pytest.mark.parametrize("orientation", range(1, 9))
def test_a_heic_of_every_exif_orientation_comes_out_upright_once(orientation):
    """Cameras store the sensor's pixels turned and/or mirrored, with both the HEIF irot/imir and the EXIF tag:
    applying either once gives the picture upright; applying both (twice) gives it turned or mirrored again."""
    from fixtures.heic.make_fixtures import QUADRANTS

    array = load_image(HEIC / f"orientation-{orientation}.heic", 32)
    for row, colours in enumerate(QUADRANTS):
        for column, colour in enumerate(colours):
            quadrant = array[row * 16: (row + 1) * 16, column * 16: (column + 1) * 16]
            assert_colour(quadrant[3:-3, 3:-3], colour, 20)


def test_a_heic_with_alpha_is_composited_on_white(flickr8k):
    """alpha.heic's right half is fully transparent: white, as for a PNG, and its left half is the photo."""
    from fixtures.heic.make_fixtures import PHOTOS

    heic = load_image(HEIC / "alpha.heic", SIZE)
    jpeg = load_image(flickr8k / "Images" / PHOTOS["alpha.heic"], SIZE)
    assert_colour(heic[:, SIZE // 2 + 2:], WHITE, 1)
    assert mean_difference(heic[:, : SIZE // 2 - 2], jpeg[:, : SIZE // 2 - 2]) < 4


def test_premultiplied_alpha_is_composited_on_white_too():
    """An HEIC whose colours are stored multiplied by alpha reads as Pillow's mode "RGBa" (as does "La", and a
    TIFF's associated alpha): convert("RGB") dropped its alpha and left the see-through half black."""
    array = load_image(HEIC / "premultiplied-alpha.heic", 32)
    assert_colour(array[:, :14], RED, 12)
    assert_colour(array[:, 18:], WHITE, 1)
    grey = Image.fromarray(halves(8, 16, (90, 90, 90), (200, 200, 200))).convert("LA")
    grey.putalpha(Image.fromarray(halves(8, 16, WHITE, (0, 0, 0))[..., 0]))
    assert_colour(np.asarray(images._to_rgb(grey.convert("La")))[:, 8:], WHITE, 0)


@pytest.mark.parametrize("kept", [0.05, 0.5, 0.95])
def test_a_heic_cut_short_is_one_line_saying_what_to_do(tmp_path, kept):
    """libheif's message ends with a newline: the error went out on two lines (a broken report line)."""
    whole = (HEIC / "upright.heic").read_bytes()
    (tmp_path / "IMG_0002.HEIC").write_bytes(whole[: int(len(whole) * kept)])
    text = reason(tmp_path / "IMG_0002.HEIC")
    assert "\n" not in text and text.strip() == text and text.endswith(images.UNDECODABLE)


def test_an_avif_of_the_heif_brand_mif1_is_still_read_by_pillow(tmp_path):
    """"mif1" starts AVIF files as well as HEIC ones: pi-heif, which has no AV1 decoder, must not get them first."""
    Image.fromarray(halves(16, 32)).save(tmp_path / "photo.avif", quality=90)
    data = (tmp_path / "photo.avif").read_bytes()
    assert data[4:12] == b"ftypavif"
    array = load_image(data[:8] + b"mif1" + data[12:], 32)
    assert_colour(array[:, :14], RED, 20)
    assert_colour(array[:, 18:], BLUE, 20)


# ------------------------------------------------------------------------ the caption command's --out


@pytest.mark.parametrize("kind", ["transparent png", "float tiff", "16-bit png"])
def test_the_captioned_picture_shows_what_was_captioned(tmp_path, kind):
    """--out drew the file through a bare convert("RGB"): a transparent logo on black and a float or 16-bit
    grey photo as one black or white square, while the caption described load_image's white-backed, scaled
    pixels. The picture now shows those."""
    from captioning.plots import captioned_image

    source = tmp_path / ("image.tif" if "tiff" in kind else "image.png")
    if kind == "transparent png":
        pixels = np.zeros((60, 60, 4), np.uint8)  # see-through, in a red frame
        pixels[:10] = pixels[-10:] = pixels[:, :10] = pixels[:, -10:] = (215, 35, 35, 255)
        Image.fromarray(pixels, "RGBA").save(source)
    elif kind == "float tiff":
        Image.fromarray(np.full((60, 60), 0.5, np.float32)).save(source)  # mid grey, as 0..1 floats
    else:
        Image.fromarray(np.full((60, 60), 20000, np.uint16)).save(source)  # a darker grey in 16 bits
    captioned = load_image(source, 60)[30, 30].astype(float)  # the middle, as the backbone got it
    captioned_image(source, "a caption", tmp_path / "out.png")
    figure = np.asarray(Image.open(tmp_path / "out.png").convert("RGB")).astype(float)
    # The picture is centred in the axes, which span 0.125-0.9 of the width and 0.12-0.88 of the height.
    height, width = figure.shape[:2]
    middle = figure[int(0.5 * height) - 5: int(0.5 * height) + 5, int(0.5125 * width) - 5: int(0.5125 * width) + 5]
    assert np.abs(middle.reshape(-1, 3).mean(0) - captioned).max() <= 12, (middle.mean((0, 1)), captioned)


def plot_picture(data: bytes, folder) -> object:
    from captioning import plots

    (folder / "drawing.eps").write_bytes(data)
    return plots._picture(folder / "drawing.eps")


@pytest.mark.parametrize("read", [lambda data, folder: load_image(data, 16), plot_picture],
                         ids=["load_image", "plot"])
def test_postscript_is_refused_without_running_ghostscript(tmp_path, monkeypatch, read):
    """Pillow renders EPS by running Ghostscript on the file: for an upload or a URL's body from anyone, an
    interpreter run on untrusted input (and its failure named the server's temporary files). The plots
    opened images with steps of their own and ran it on an EPS among the photos."""
    from PIL import EpsImagePlugin

    marker = tmp_path / "ghostscript-ran"
    fake = tmp_path / "bin" / "gs"
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\nif [ "$1" = "--version" ]; then echo 10.0; exit 0; fi\necho "$@" > {marker}\nexit 1\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", None)  # looked up again: found, as where Ghostscript is installed
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n%%EOF\n"
    with pytest.raises(ImageError, match="PostScript"):
        read(eps, tmp_path)
    assert not marker.exists()


def test_pillows_own_bomb_refusal_names_the_limit_in_force(tmp_path):
    """Above twice Pillow's limit Image.open refuses by itself, and the message named Pillow's 178956970
    whatever limit was in force: the server's `--max-pixels` 40000000 reply named a limit it does not have.
    Now it reads as the check below that limit does: the image's pixels and the limit in force."""
    (tmp_path / "bomb.png").write_bytes(png_header(20_000, 20_000))  # 400 Mpx > 2 x 89.5 Mpx
    with pytest.raises(images.ImageTooLarge) as caught:
        load_image(tmp_path / "bomb.png", 16, max_pixels=40_000_000)
    text = str(caught.value)
    assert "400000000 pixels is over the limit of 40000000" in text
    assert str(2 * images.MAX_PIXELS) not in text


def test_a_large_photo_is_not_copied_whole_on_its_way_to_the_network(tmp_path):
    """A 16-megapixel PNG took four times its decoded size at peak: exif_transpose copied the upright photo and
    convert("RGB") copied it again, beside the decoded image held open. Now it takes about its own size.
    Measured in a fresh process by its peak resident memory (VmHWM: ru_maxrss would count the forking
    parent's too)."""
    side = 4000
    gradient = np.broadcast_to(np.linspace(0, 255, side, dtype=np.uint8)[:, None, None], (side, side, 3))
    Image.fromarray(np.ascontiguousarray(gradient)).save(tmp_path / "large.png", compress_level=1)
    probe = ("import re, sys; from captioning.images import load_image\n"
             "peak = lambda: int(re.search(r'VmHWM:\\s*(\\d+)', open('/proc/self/status').read())[1])\n"
             "before = peak(); load_image(sys.argv[1], 224); print(peak() - before)")
    result = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "large.png")],
                            capture_output=True, text=True, check=True)
    decoded_kb = side * side * 3 / 1024
    assert int(result.stdout) < 2 * decoded_kb, (int(result.stdout), decoded_kb)
