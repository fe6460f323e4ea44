"""Checks every format shares (safe image names, numbering, duplicates), the table, and the data report."""
from __future__ import annotations

import functools
import re
import unicodedata
from collections import Counter, defaultdict
from pathlib import Path

import pandas as pd

from captioning.captions.records import MAX_CAPTION_NUMBER, Record, excerpt
from captioning.captions.token_text import SEPARATOR_KINDS
from captioning.encodings import FALLBACK_ENCODINGS
from captioning.errors import UserError
from captioning.text import clean_caption

# The photo formats extraction reads (images.load_image; HEIC/HEIF, iPhones' and, as .hif, cameras', through
# pi-heif): a file of any of them that no caption names is listed. (Not read from Pillow, whose list holds PDF,
# EPS, HDF5...)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".avif", ".heic", ".heif",
                  ".hif")
TABLE_COLUMNS = ["image", "caption_number", "raw_caption", "caption", "source"]
# Names that could reach outside the images folder (separators, `..`, a Windows drive; an absolute
# POSIX path starts with `/`), or hold control characters.
_UNSAFE_NAME = re.compile(r"^[A-Za-z]:|[/\\]|\.\.|[\x00-\x1f]")
_PLAIN_NAMES_ONLY = "; only plain file names inside the images folder are allowed"


@functools.lru_cache(maxsize=65536)
def _name_problem(image: str) -> str | None:
    """Why an image name is refused: it must be a plain file name inside the images folder."""
    if not image:
        return "empty image name"
    bad = _UNSAFE_NAME.search(image)
    if bad is None:
        return None
    if image.startswith(("/", "\\")):
        return f"image name {image!r} is an absolute path{_PLAIN_NAMES_ONLY}"
    if bad.group().endswith(":"):
        return f"image name {image!r} starts with a drive ({bad.group()}){_PLAIN_NAMES_ONLY}"
    if bad.group() in ("/", "\\", ".."):
        return f"image name {image!r} contains {bad.group()!r}{_PLAIN_NAMES_ONLY}"
    return f"image name {image!r} contains a control character"


def _surrogate_problem(record: Record) -> str | None:
    """A pickled str may hold a lone surrogate: not valid Unicode, so no file (parquet, json) could store it."""
    for what, text in (("image name", record.image), ("caption", record.raw)):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            return f"{what} holds a lone surrogate (U+{ord(text[err.start]):04X}), which is not valid Unicode"
    return None


def check_records(records: list[Record]) -> None:
    """Number captions by order where needed, then mark refused names, empty captions and duplicates.

    Numbering counts every record that parsed into an image and a caption, even one skipped below
    (empty caption, refused name), so one broken caption does not shift its image's later numbers.
    """
    next_number: Counter = Counter()
    first_seen: dict[tuple[str, int], str] = {}
    for record in records:
        if record.problem is not None:
            continue
        if record.number is None:
            record.number = next_number[record.image]
            next_number[record.image] += 1
        record.problem = _record_problem(record, first_seen)
        if record.problem is None:
            first_seen[(record.image, record.number)] = record.source


def _record_problem(record: Record, first_seen: dict) -> str | None:
    problem = _name_problem(record.image) or _surrogate_problem(record)
    if problem:
        return problem
    if record.number > MAX_CAPTION_NUMBER:  # a pickled int: any size
        return f"caption number is larger than {MAX_CAPTION_NUMBER}, the most the table holds"
    if not record.raw:
        return "empty caption"
    record.caption = clean_caption(record.raw)
    # Cleaning keeps apostrophes and combining marks, so "''" (an SQL-escaped empty text) or a lone accent
    # survive it: they have no letters or digits either, and would be trained on as a caption.
    if not any(char.isalnum() for char in record.caption):
        return "caption has no letters or digits"
    first = first_seen.get((record.image, record.number))
    if first is not None:
        return f"duplicate caption {record.image}#{record.number}: the first one, at {first}, is kept"
    return None


def summarise(records: list[Record], files: set[str], *, source: str, fmt: str) -> tuple[pd.DataFrame, dict]:
    valid = [record for record in records if record.problem is None]
    skipped = [{"line": r.source, "reason": r.problem, "text": excerpt(r.text)}
               for r in records if r.problem is not None]
    kept = sorted((r for r in valid if r.image in files), key=lambda r: (r.image, r.number))
    missing: dict[str, list[str]] = defaultdict(list)
    for record in valid:
        if record.image not in files:
            missing[record.image].append(record.source)
    named = {record.image for record in valid}
    unnamed = sorted(_shown_name(name) for name in files
                     if name.lower().endswith(IMAGE_SUFFIXES) and name not in named)
    repairs = Counter(record.separator for record in valid if record.separator)
    report = {
        "source": source,
        "format": fmt,
        "lines_read": len(records),
        "rows_parsed": len(valid),
        "skipped_count": len(skipped),
        "skipped": skipped,
        "image_names": len(named),
        "images_found": len(named & files),
        "rows_kept": len(kept),
        "missing_images": {
            "count": len(missing),
            "captions_excluded": sum(map(len, missing.values())),
            "images": {name: missing[name] for name in sorted(missing)},
            "near_matches": near_matches(missing, files),
        },
        "images_without_captions": {"count": len(unnamed), "images": unnamed},
        "separator_repairs": {kind: repairs[kind] for kind in SEPARATOR_KINDS},
    }
    for encoding in FALLBACK_ENCODINGS:
        sources = [record.source for record in records if record.encoding == encoding]
        report[fallback_key(encoding)] = {"count": len(sources), "lines": sources}
    return _table(kept), report


def _shown_name(name: str) -> str:
    """A file name as the report can store it: one that is not valid UTF-8 (a Windows zip unpacked here,
    say) holds surrogates, shown as the bytes they stand for (caf\\xe9.jpg)."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def fallback_key(encoding: str) -> str:
    """The report key listing the records decoded with a fallback `encoding`: decoded_as_cp1252, ..."""
    return "decoded_as_" + encoding.replace("-", "")


def _table(records: list[Record]) -> pd.DataFrame:
    return pd.DataFrame({
        "image": pd.Series([r.image for r in records], dtype=str),
        "caption_number": pd.Series([r.number for r in records], dtype="int64"),
        "raw_caption": pd.Series([r.raw for r in records], dtype=str),
        "caption": pd.Series([r.caption for r in records], dtype=str),
        "source": pd.Series([r.source for r in records], dtype=str),
    }, columns=TABLE_COLUMNS)


def _folded(name: str) -> str:
    return unicodedata.normalize("NFC", name).casefold()


def near_matches(missing, files: set[str]) -> dict[str, str]:
    """{missing name: the folder's file} for names that differ from one file only in upper/lower case or
    Unicode form: a camera's IMG_1.JPG named img_1.jpg, a name typed composed (NFC) beside a file copied from a
    Mac in decomposed form (NFD). Reported, not matched: on Linux x.jpg and X.JPG can be two photos, and the
    split lists name images as the captions do."""
    by_folded = defaultdict(list)
    for name in files:
        by_folded[_folded(name)].append(name)
    matches = {name: by_folded.get(_folded(name), []) for name in sorted(missing)}
    return {name: found[0] for name, found in matches.items() if len(found) == 1}


def fail_if_unusable(report: dict, path: Path, images_dir, max_skipped_fraction: float) -> None:
    """Stop the pipeline when the file is mostly broken or leaves nothing to train on."""
    read, skipped = report["lines_read"], report["skipped_count"]
    if read == 0:
        raise UserError(f"{path}: no caption records in the file. Point data.captions at a non-empty captions file.")
    if skipped / read > max_skipped_fraction:
        examples = "; ".join(f"{s['line']}: {s['reason']}" for s in report["skipped"][:3])
        raise UserError(f"{path}: {skipped} of {read} caption records are malformed ({skipped / read:.0%}), more "
                        f"than data.max_skipped_fraction = {max_skipped_fraction}. First ones: {examples}. Fix the "
                        "file, check that it is a supported format, or raise data.max_skipped_fraction.")
    if report["rows_parsed"] == 0:
        raise UserError(f"{path}: no usable caption in {read} records. Check the file format.")
    if report["rows_kept"] == 0:
        raise UserError(f"{path}: none of its {report['image_names']} image names has a file in {images_dir}. "
                        f"{near_match_hint(report) or 'Set data.images to the folder that holds these photos.'}")


def near_match_hint(report: dict) -> str:
    """What to do about missing names that differ from a file only in case or Unicode form ('' if none)."""
    near = report["missing_images"]["near_matches"]
    if not near:
        return ""
    name, file = next(iter(near.items()))
    return (f"{len(near)} of the missing names differ from a file in the folder only in upper/lower case or "
            f"Unicode form (as {name!r} and {file!r}; all in the report's missing_images.near_matches): rename "
            "the files or the names in the captions file to match.")
