"""Loading one image robustly with Pillow, for extraction and for the caption command alike.

Pillow rather than `tf.io.decode_image` because user photos come in every shape: EXIF-rotated
phone pictures, iPhones' HEIC, CMYK and 16-bit files, PNG bytes named `.jpg`, truncated downloads. Each is either
turned into a correct RGB array or refused with a reason; a failure never stops the pipeline.
Using the same function at training and serving time removes one source of train/serve skew.
"""
from __future__ import annotations

import io
import os
import re
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pi_heif
from PIL import Image, ImageOps

from captioning.errors import one_line

# Pillow's own limit (~89 megapixels): anything larger is refused as a possible decompression bomb.
MAX_PIXELS = Image.MAX_IMAGE_PIXELS

# Pillow raises above 2 x its limit but only warns between 1x and 2x; `load_image` refuses that band
# itself (the size check below), so the warning is noise. Silenced once here rather than per call with
# warnings.catch_warnings(), which is not thread-safe, and load_image runs in tf.data's parallel threads.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

# HEIC/HEIF (iPhones save photos so) through pi-heif's Pillow opener, registered here, the one module every image
# is opened through, so extraction, the caption command, the server and the plots read it alike. Pillow's own
# readers are registered first, in the order Image.open tries them (preinit's common formats, then init's):
# a file of the shared "mif1" brand may be AVIF or HEIC, and Pillow's AVIF reader passes an HEVC one on, while
# pi-heif, which has no AV1 decoder, would fail an AVIF outright.
# pi-heif applies the HEIF rotation and mirroring (irot/imir) while decoding and sets the EXIF Orientation
# it hands Pillow to 1 (keeping the original in info["original_orientation"]), so exif_transpose below leaves an
# iPhone's photo, which carries both, as decoded: upright once. Only the primary image is used: no thumbnails,
# depth maps or auxiliary images are listed.
Image.preinit()
Image.init()
pi_heif.register_heif_opener(thumbnails=False, depth_images=False, aux_images=False)


# What the user can do about each kind of unusable file: one wording for extraction's report, the caption
# command's error lines and the server's replies.
REDO = "download, copy or export it again"
CONVERT = "convert it to JPEG or PNG"
UNDECODABLE = f"{REDO}, or {CONVERT}"  # damaged, cut short, or a variant Pillow cannot decode


class ImageError(Exception):
    """The file is not a usable image; the message says why."""


class ImageTooLarge(ImageError):
    """The image has more pixels than allowed (a possible decompression bomb)."""


PREMULTIPLIED = {"RGBa": "RGBA", "La": "LA"}  # Pillow's premultiplied-alpha modes -> their plain ones


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16/32-bit integer and 32-bit float grey: scale to 8 bits, not clip as Pillow's conversion does
        # (which turns a float image in 0..1 black). 16-bit by the type's range; 32-bit integer and float
        # by the image's own maximum, but never stretching one already within 0..1.
        array = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        peak = 65535.0 if image.mode.startswith("I;16") else max(float(array.max()), 1.0)
        key = image.info.get("transparency")  # a 16-bit PNG's tRNS grey, in the file's own units
        image = Image.fromarray(np.clip(array / peak * 255.0, 0, 255).astype(np.uint8), mode="L")
        if isinstance(key, int):
            # The key is matched before scaling (several 16-bit greys share one 8-bit grey); the mask makes it
            # "LA", so the see-through pixels come out white below, as they do in an 8-bit keyed PNG.
            image.putalpha(Image.fromarray(np.where(array == key, 0, 255).astype(np.uint8), mode="L"))
    if image.mode in PREMULTIPLIED:
        # Colours stored multiplied by their alpha (an HEIC whose alpha is marked so, a TIFF's associated alpha):
        # divided back, then composited below; convert("RGB") dropped the alpha, leaving see-through pixels black.
        image = image.convert(PREMULTIPLIED[image.mode])
    if image.mode in ("RGBA", "LA", "PA") or (image.mode in ("P", "RGB", "L") and "transparency" in image.info):
        # (P: a transparent palette entry; RGB and L: a PNG's tRNS colour key)
        # Composite transparency on white, as a viewer shows it, instead of dropping alpha to black.
        rgba = image if image.mode == "RGBA" else image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    # convert() copies even an image already in the mode: a full-size copy of a large photo, for nothing
    return image if image.mode == "RGB" else image.convert("RGB")


def _source(image: str | Path | bytes | BinaryIO) -> Path | BinaryIO:
    """A path to open, or a file object (bytes are wrapped); empty input and folders are refused here."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        if len(image) == 0:
            raise ImageError(f"empty file (0 bytes): {REDO}")
        return io.BytesIO(image)
    if hasattr(image, "read"):
        return image
    path = Path(image)
    if path.is_dir():
        raise ImageError("is a folder, not an image file: name the images in it (folder/*.jpg)")
    if path.is_file() and path.stat().st_size == 0:
        raise ImageError(f"empty file (0 bytes): {REDO}")
    if path.is_symlink() and not path.exists():
        # "file not found" would send the user looking for a file that is right there, as a link
        raise ImageError(f"broken symbolic link (its target {os.readlink(path)} does not exist): "
                         "point it at the image or replace it with the file")
    return path


def _too_large(what: str, max_pixels: int) -> ImageTooLarge:
    return ImageTooLarge(f"refused as a possible decompression bomb: {what} is over the limit of {max_pixels} "
                         "pixels; resize it to fewer")


def _head(source: Path | BinaryIO, count: int = 512) -> bytes:
    """The first bytes of a file or stream, or b"" when they cannot be read again."""
    try:
        if isinstance(source, Path):
            with source.open("rb") as file:
                return file.read(count)
        source.seek(0)
        return source.read(count)
    except (OSError, ValueError):  # a stream that cannot seek back (io.UnsupportedOperation is both)
        return b""


def _signature_of(head: bytes) -> str | None:
    """The image format whose signature the file starts with, by the readers' own checks (Pillow's and
    pi-heif's), or None. Readers without a check, which would claim anything, are left out."""
    prefix = head[:16]  # as much as Image.open hands the checks
    for name in Image.ID:
        accept = Image.OPEN[name][1]
        try:
            # True only: a check may instead return a message saying the format's support is not installed
            if accept is not None and accept(prefix) is True:
                return name
        except Exception:  # noqa: BLE001 - a check that trips on these bytes does not recognise them
            continue
    return None


def _unidentified(source: Path | BinaryIO) -> ImageError:
    """Pillow knows no format for these bytes. Name the usual non-images for what they are, each with its
    remedy: a photo whose start is a known format's but whose header is damaged or cut short (an interrupted
    download of a GIF, AVIF or iPhone HEIC was "not an image file ...: convert it", which a cut file cannot be);
    an SVG drawing; a web page saved as .jpg by a download that got an error page, or a page's address given
    where its image's was meant."""
    head = _head(source)
    start = head.lstrip().lower()
    if name := _signature_of(head):
        return ImageError(f"{name} file that cannot be opened (damaged, cut short, or a variant not supported "
                          f"here): {UNDECODABLE}")
    if start.startswith(b"<svg") or (start.startswith(b"<?xml") and b"<svg" in start):
        return ImageError("SVG drawing, which Pillow cannot read: convert it to PNG")
    if start.startswith((b"<!doctype html", b"<html", b"<head")):
        return ImageError("a web page (HTML), not an image: download the image itself, not the page it is on")
    return ImageError(f"not an image file Pillow can read (unknown or corrupt format): {CONVERT}")


def load_image(image: str | Path | bytes | BinaryIO, size: int, max_pixels: int | None = None) -> np.ndarray:
    """Return the image (a path, its bytes, or a file object) as a (size, size, 3) uint8 RGB array,
    upright (per EXIF; an HEIC per its own rotation), or raise ImageError. Uploads and downloads go through
    here too, so they get the same decoding and the same guards as the files extraction reads. `max_pixels`
    (default MAX_PIXELS, read at call time) is the bomb guard's limit; the server sets a lower one."""
    upright = open_upright_rgb(image, size, max_pixels)
    return np.asarray(upright.resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8)


def open_upright_rgb(image: str | Path | bytes | BinaryIO, draft_side: int,
                     max_pixels: int | None = None) -> Image.Image:
    """The image decoded, upright and in RGB, at its own size and proportions, or ImageError: load_image's
    steps before the resize, which the plots also draw from, so a figure shows the picture the model was given.
    A JPEG is decoded at the smallest scale that keeps `draft_side` pixels a side (draft mode)."""
    max_pixels = MAX_PIXELS if max_pixels is None else max_pixels
    source = None
    try:
        source = _source(image)
        with Image.open(source) as opened:
            return _decode_upright_rgb(opened, draft_side, max_pixels)
    except ImageError:
        raise
    except Exception as err:  # noqa: BLE001 - a malformed file may trip any decoder error; one bad
        # photo must not stop an extraction of thousands (in tf.data it would abort the whole run).
        raise _image_error(err, source, max_pixels) from None


def _decode_upright_rgb(image: Image.Image, draft_side: int, max_pixels: int) -> Image.Image:
    """`open_upright_rgb`'s decoding of the opened `image`, within its guards."""
    if image.format == "EPS":
        # Pillow renders PostScript by running Ghostscript (a whole interpreter, with a record of
        # -dSAFER escapes) on the file, here an upload or a URL's body from anyone: no photo needs it.
        raise ImageError(f"PostScript (EPS) is not accepted: reading it would run Ghostscript; {CONVERT}")
    width, height = image.size
    if width * height > max_pixels:
        raise _too_large(f"{width}x{height} pixels", max_pixels)
    # JPEG draft mode decodes straight at a reduced scale: several times faster.
    image.draft("RGB", (draft_side, draft_side))
    # In place: otherwise a photo already upright is copied whole, beside the decoded one held open here.
    ImageOps.exif_transpose(image, in_place=True)
    image = _to_rgb(image)
    image.load()  # decoded here, inside these guards, and usable once the file is closed
    return image


def _image_error(err: Exception, source, max_pixels: int) -> ImageError:
    """The one-line ImageError for what opening or decoding `source` raised (the more specific errors first:
    a missing file and an unidentified image are OSErrors too)."""
    if isinstance(err, FileNotFoundError):
        return ImageError("file not found: check the path")
    if isinstance(err, PermissionError):
        return ImageError("permission denied: cannot read the file; check its permissions")
    if isinstance(err, Image.DecompressionBombError):
        # Pillow's own refusal, above twice its limit and before `_decode_upright_rgb`'s check, names twice
        # Pillow's limit whatever max_pixels is (the server's --max-pixels): say it as that check does, with the
        # limit in force.
        pixels = re.search(r"\((\d+) pixels\)", str(err))
        return _too_large(f"{pixels[1]} pixels" if pixels else "the image", max_pixels)
    if isinstance(err, Image.UnidentifiedImageError):
        return _unidentified(source)
    if isinstance(err, (OSError, ValueError, SyntaxError)):
        return ImageError(f"cannot decode image ({one_line(err)}): {UNDECODABLE}")
    return ImageError(f"cannot decode image ({type(err).__name__}: {one_line(err)}): {UNDECODABLE}")
