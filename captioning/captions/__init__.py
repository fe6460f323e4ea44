"""Read a captions file, in any of the formats people ship Flickr8k in, into one table and a report.

Why one reader for every format: the later stages (split, features, training, scoring) then see a
single table, and the report says exactly which lines were dropped and why, instead of a stage
failing on line 6731 or silently training on a broken caption.

Format detection, first rule that matches:

1. Pickle: the name ends in `.pkl`/`.pickle`, or the file starts with the protocol 2-5 marker
   (byte 0x80, then 2..5). It is loaded with `captioning.safe_pickle`, never `pickle.load`, and its
   content decides the shape:
   - str / bytes: the whole text of a token file or Kaggle csv (rules 3-4) -> "pickle:str" / "pickle:bytes"
   - list or tuple of token lines (str/bytes), of (image, caption) pairs, of (image, [captions])
     pairs, or of {"image": ..., "caption": ...} / {"image": ..., "captions": [...]} dicts (key names
     as for DataFrame columns)                                               -> "pickle:list"
   - set or frozenset of token lines, numbered in sorted order              -> "pickle:set"
   - dict image -> list of captions (number = position in the list), dict image -> one caption,
     or dict "name.jpg#k" -> caption                                         -> "pickle:dict"
   - pandas DataFrame with an image column (image/image_name/filename/...) and a caption column
     (caption/captions/text/...), only with `allow_pandas_pickle=True`      -> "pickle:dataframe"
2. COCO captions JSON: the name ends in `.json`, or the first non-blank character is `{` -> "coco_json"
3. Kaggle captions.txt: the first line is the header `image,caption` (csv quoting)        -> "kaggle_csv"
4. Any other text is Flickr8k token text, one `name.jpg#k<TAB>caption` per line        -> "token_txt"
   (a file with NUL bytes near its start is refused instead: it is not text).

Token lines: the key is `image#digits`. After the digits the separator is, in this order:
a TAB; a literal backslash-t (the two characters `\\t`); one or more spaces; a bare `t` followed by
an upper-case letter (a TAB that lost its backslash: `x.jpg#0tA girl ...`); or nothing, when the
caption starts right after the digits with a letter (`x.jpg#0A girl ...`). Every separator but TAB is
accepted and counted in the report's `separator_repairs`. Without a real TAB, the image name cannot
contain spaces.

Encoding: each line of a text file (and each bytes value in a pickle) is decoded alone, as UTF-8,
else cp1252, else latin-1 (encodings.ENCODINGS); the report lists the lines that needed a fallback.

Hostile input: `safe_pickle` refuses nesting deeper than 100 levels before unpickling, `pickles`
refuses more than 2,000,000 records, or records holding more than 500 million characters of text,
before building them, and skipped items are shown through a
bounded repr, so deep, wide, cyclic or huge structures give a UserError or a skipped record.

Caption numbers: the `#k` of a token key; the position in a list of captions; otherwise (Kaggle
csv, COCO, (image, caption) pairs, dict image -> caption, DataFrame rows) the order in which captions
of that image appear, counting from 0 - unless the image name itself ends in `#k`, or a DataFrame has
a `caption_number` column.

Sources in the report: `line N` (1-based, as an editor shows it), `item i` / `row i` /
`annotation i` (0-based index into the list, DataFrame or annotations array), `item i caption j`
for an image's list of captions, `key 'x.jpg' item i` and `key 'x.jpg#k'` for dicts.

Only image names are compared with a listing of `images_dir`: no image is opened here, and names
with `/`, `\\`, `..`, a drive or an absolute path are refused, so nothing outside the folder is read.
"""
from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from captioning import safe_pickle
from captioning.captions.coco_json import coco_records
from captioning.captions.pickles import pickle_records
from captioning.captions.records import Record, byte_lines
from captioning.captions.report import check_records, fail_if_unusable, summarise
from captioning.captions.token_text import text_records
from captioning.encodings import as_utf8
from captioning.errors import UserError
from captioning.params import missing_images_folder

__all__ = ["load_captions"]

PICKLE_SUFFIXES = (".pkl", ".pickle")


def load_captions(path, images_dir, *, allow_pandas_pickle: bool = False,
                  max_skipped_fraction: float = 0.5) -> tuple[pd.DataFrame, dict]:
    """Parse the captions file at `path`; keep captions whose image file exists in `images_dir`.

    Returns the table (columns image, caption_number, raw_caption, caption, source; sorted by image
    then caption_number) and a JSON-ready report. Raises `UserError` when the file cannot be read
    or recognised, when more than `max_skipped_fraction` of its records are malformed, or when no
    caption is left. Missing image files are reported, not counted as malformed.
    """
    path = Path(path)
    data = _read_bytes(path)
    files = _list_folder(images_dir)
    fmt, records = _parse(data, path, allow_pandas_pickle)
    check_records(records)
    table, report = summarise(records, files, source=str(path), fmt=fmt)
    fail_if_unusable(report, path, images_dir, max_skipped_fraction)
    return table, report


def _read_bytes(path: Path) -> bytes:
    if not path.is_file():
        raise UserError(f"captions file not found: {path}. Set data.captions in params.yaml to a "
                        "Flickr8k token file, Kaggle captions.txt, COCO captions json or captions pickle.")
    try:
        return path.read_bytes()
    except OSError as err:
        raise UserError(f"cannot read captions file {path}: {err.strerror}. Check its permissions.") from err


def _list_folder(images_dir) -> set[str]:
    """Names of the files in `images_dir`, listed once; the images themselves are never opened."""
    try:
        with os.scandir(images_dir) as entries:
            return {entry.name for entry in entries if entry.is_file()}
    except (FileNotFoundError, NotADirectoryError) as err:
        raise missing_images_folder(images_dir) from err
    except OSError as err:
        raise UserError(f"cannot list images folder {images_dir}: {err.strerror}.") from err


def _parse(data: bytes, path: Path, allow_pandas: bool) -> tuple[str, list[Record]]:
    """Pick the format by the rules in the package docstring and parse every record."""
    if path.suffix.lower() in PICKLE_SUFFIXES or _looks_like_pickle(data):
        obj = safe_pickle.loads(data, allow_pandas=allow_pandas, source=str(path))
        return pickle_records(obj, path)
    body = as_utf8(data)
    if path.suffix.lower() == ".json" or body.lstrip()[:1] == b"{":
        return "coco_json", coco_records(body, path)
    if b"\x00" in body[:8192]:
        raise UserError(f"{path}: unknown captions format (binary data, not a pickle). Use a Flickr8k "
                        "token file, Kaggle captions.txt, COCO captions json or a captions pickle.")
    return text_records(byte_lines(body), "token_txt", "kaggle_csv")


def _looks_like_pickle(data: bytes) -> bool:
    return len(data) >= 2 and data[0] == 0x80 and 2 <= data[1] <= 5
