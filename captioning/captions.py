"""Read a captions file, in any of the formats people ship Flickr8k in, into one table and a report.

Why one reader for every format: the later stages (split, features, training, scoring) then see a
single table, and the report says exactly which lines were dropped and why, instead of a stage
failing on line 6731 or silently training on a broken caption.

Format detection, first rule that matches:

1. Pickle: the name ends in `.pkl`/`.pickle`, or the file starts with the protocol 2-5 marker
   (byte 0x80, then 2..5). It is loaded with `captioning.safe_pickle`, never `pickle.load`, and its
   content decides the shape:
   - str / bytes: the whole text of a token file or Kaggle csv (rules 3-4) -> "pickle:str" / "pickle:bytes"
   - list or tuple of token lines (str/bytes), of (image, caption) pairs, or of
     {"image": ..., "caption": ...} dicts (key names as for DataFrame columns) -> "pickle:list"
   - dict image -> list of captions (number = position in the list),
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

Caption numbers: the `#k` of a token key; the position in a dict's list; otherwise (Kaggle csv, COCO,
(image, caption) pairs, DataFrame rows) the order in which captions of that image appear, counting
from 0 - unless the image name itself ends in `#k`, or a DataFrame has a `caption_number` column.

Sources in the report: `line N` (1-based, as an editor shows it), `item i` / `row i` /
`annotation i` (0-based index into the list, DataFrame or annotations array), `key 'x.jpg' item i`
and `key 'x.jpg#k'` for dicts.

Only image names are compared with a listing of `images_dir`: no image is opened here, and names
with `/`, `\\`, `..`, a drive or an absolute path are refused, so nothing outside the folder is read.
"""
from __future__ import annotations

import csv
import functools
import json
import math
import os
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from captioning import safe_pickle
from captioning.errors import UserError
from captioning.text import clean_caption

PICKLE_SUFFIXES = (".pkl", ".pickle")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
EXCERPT_CHARS = 200
SEPARATOR_KINDS = ("literal_backslash_t", "bare_t", "spaces", "missing")
IMAGE_COLUMNS = ("image", "image_name", "image_file", "image_filename", "filename", "file_name", "img", "file")
CAPTION_COLUMNS = ("caption", "captions", "text", "comment", "sentence", "description")
NUMBER_COLUMNS = ("caption_number",)
TABLE_COLUMNS = ["image", "caption_number", "raw_caption", "caption", "source"]

_DIGITS = re.compile(r"[0-9]+")
_NAME_WITH_NUMBER = re.compile(r"(?P<image>.+)#(?P<number>[0-9]+)", re.DOTALL)
# Separator rule for a token line without a real TAB (lines with a TAB are split on it instead).
# The key is `image#digits`, the image being the longest run of non-spaces before `#digits`. Then,
# tried in this order: a literal backslash-t (`\t`, two characters); one or more spaces; a bare `t`
# before an upper-case letter (`x.jpg#0tA girl`: the TAB lost its backslash); nothing, if a letter
# follows the digits (`x.jpg#0A girl`). The name of the group that matched is the repair kind.
_REPAIRED_LINE = re.compile(
    r"(?P<image>\S+)#(?P<number>[0-9]+)"
    r"(?:(?P<literal_backslash_t>\\t)|(?P<spaces> +)|(?P<bare_t>t)(?=[A-Z])|(?P<missing>)(?=[^\W\d_]))"
    r"(?P<caption>.*)",
    re.DOTALL,
)
_KEY_ONLY = re.compile(r"(?P<image>\S+)#(?P<number>[0-9]+)")
# Names that could reach outside the images folder (separators, `..`, a Windows drive; an absolute
# POSIX path starts with `/`), or hold control characters.
_UNSAFE_NAME = re.compile(r"^[A-Za-z]:|[/\\]|\.\.|[\x00-\x1f]")
_PLAIN_NAMES_ONLY = "; only plain file names inside the images folder are allowed"


@dataclass
class _Record:
    """One input record (a line, item, row or annotation), parsed or with the reason it is skipped."""

    source: str
    text: object                  # the record as read; shown (cut to 200 chars) only if skipped
    image: str | None = None
    number: int | None = None     # None: numbered by order of appearance of its image
    raw: str = ""
    separator: str | None = None  # repair kind when the separator was not a TAB
    problem: str | None = None
    caption: str = ""


# ---------------------------------------------------------------------------------------- entry point

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
    _check_records(records)
    table, report = _summarise(records, files, source=str(path), fmt=fmt)
    _fail_if_unusable(report, path, images_dir, max_skipped_fraction)
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
        raise UserError(f"images folder not found: {images_dir}. Set data.images in params.yaml "
                        "to the folder holding the photos named in the captions file.") from err
    except OSError as err:
        raise UserError(f"cannot list images folder {images_dir}: {err.strerror}.") from err


# ------------------------------------------------------------------------------------ format detection

def _parse(data: bytes, path: Path, allow_pandas: bool) -> tuple[str, list[_Record]]:
    """Pick the format by the rules in the module docstring and parse every record."""
    if path.suffix.lower() in PICKLE_SUFFIXES or _looks_like_pickle(data):
        obj = safe_pickle.loads(data, allow_pandas=allow_pandas, source=str(path))
        return _pickle_records(obj, path)
    body = data.removeprefix(b"\xef\xbb\xbf")
    if path.suffix.lower() == ".json" or body.lstrip()[:1] == b"{":
        return "coco_json", _coco_records(body, path)
    if b"\x00" in body[:8192]:
        raise UserError(f"{path}: unknown captions format (binary data, not a pickle). Use a Flickr8k "
                        "token file, Kaggle captions.txt, COCO captions json or a captions pickle.")
    return _text_records(_byte_lines(body), "token_txt", "kaggle_csv")


def _looks_like_pickle(data: bytes) -> bool:
    return len(data) >= 2 and data[0] == 0x80 and 2 <= data[1] <= 5


def _text_records(lines: list[_Record], token_format: str, kaggle_format: str) -> tuple[str, list[_Record]]:
    """Kaggle csv when the first line is its header, else token lines."""
    if lines and lines[0].problem is None and _is_kaggle_header(lines[0].text):
        return kaggle_format, _kaggle_records(lines[1:])
    return token_format, [_token_record(line) for line in lines]


def _is_kaggle_header(line: str) -> bool:
    return line.replace('"', "").replace(" ", "").lower() == "image,caption"


# ----------------------------------------------------------------------------------------- text lines

def _byte_lines(data: bytes) -> list[_Record]:
    """Split bytes into lines and decode each one alone, so one bad byte costs only its own line.

    The final newline does not start another line; a trailing CR (CRLF files) is dropped silently.
    """
    chunks = data.split(b"\n")
    if chunks[-1] == b"":
        chunks.pop()
    lines = []
    for number, chunk in enumerate(chunks, start=1):
        chunk = chunk.removesuffix(b"\r")
        try:
            lines.append(_Record(f"line {number}", chunk.decode("utf-8")))
        except UnicodeDecodeError as err:
            problem = f"bytes are not valid UTF-8 (byte 0x{chunk[err.start]:02x} at column {err.start + 1})"
            lines.append(_Record(f"line {number}", chunk.decode("utf-8", "backslashreplace"), problem=problem))
    return lines


def _str_lines(text: str) -> list[_Record]:
    """The same split for text that is already decoded (a pickled str)."""
    chunks = text.removeprefix("\ufeff").split("\n")
    if chunks[-1] == "":
        chunks.pop()
    return [_Record(f"line {n}", chunk.removesuffix("\r")) for n, chunk in enumerate(chunks, start=1)]


def _token_record(line: _Record) -> _Record:
    """Parse one `name.jpg#k<separator>caption` line (separator rule in the module docstring)."""
    if line.problem is not None:
        return line
    text = line.text.removeprefix("\ufeff").strip()
    if not text:
        line.problem = "blank line"
    elif "\t" in text:
        _parse_tab_line(line, text)
    else:
        _parse_repaired_line(line, text)
    return line


def _parse_tab_line(line: _Record, text: str) -> None:
    key, _, caption = text.partition("\t")
    image, hash_sign, number = key.strip().rpartition("#")
    if not hash_sign:
        line.problem = f"key {key.strip()!r} before the TAB has no '#<number>' caption number"
    elif not number:
        line.problem = "no caption number after '#'"
    elif not _DIGITS.fullmatch(number):
        line.problem = f"caption number {number!r} is not a non-negative integer"
    elif not image.strip():
        line.problem = "empty image name before '#'"
    else:
        line.image, line.number, line.raw = image.strip(), int(number), caption.strip()


def _parse_repaired_line(line: _Record, text: str) -> None:
    """A line without a real TAB: accept the known broken separators, and remember which one."""
    match = _REPAIRED_LINE.fullmatch(text) or _KEY_ONLY.fullmatch(text)
    if match is None:
        line.problem = _why_no_key(text)
        return
    line.image, line.number = match["image"], int(match["number"])
    line.raw = (match.groupdict().get("caption") or "").strip()
    line.separator = next((kind for kind in SEPARATOR_KINDS if match.groupdict().get(kind) is not None), None)


def _why_no_key(text: str) -> str:
    first_word = text.split()[0]
    if "#" not in first_word:
        return "no TAB and no 'name.jpg#<number>' key at the start of the line"
    image, _, number = first_word.rpartition("#")
    if not image:
        return "empty image name before '#'"
    if not number:
        return "no caption number after '#'"
    if _DIGITS.fullmatch(number):
        return f"no TAB or other known separator after {first_word!r}"
    return f"caption number {number!r} is not a non-negative integer"


# ------------------------------------------------------------------------------------------ kaggle csv

def _kaggle_records(lines: list[_Record]) -> list[_Record]:
    """Rows of a Kaggle captions.txt (header already removed), parsed by the csv module.

    Lines that are not UTF-8 are reported and left out of the csv stream, in file order.
    """
    records: list[_Record] = []
    row_lines: list[_Record] = []

    def good_lines():
        for line in lines:
            if line.problem is not None:
                records.append(line)
                continue
            row_lines.append(line)
            yield line.text

    reader = csv.reader(good_lines())
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as err:
            raise UserError(f"broken csv near {row_lines[0].source if row_lines else 'the start'}: {err}. "
                            "Fix the quoting there.") from err
        first, text = row_lines[0], "\n".join(line.text for line in row_lines)
        row_lines.clear()
        records.append(_kaggle_row(first.source, text, row))
    return records


def _kaggle_row(source: str, text: str, row: list[str]) -> _Record:
    if not any(field.strip() for field in row):
        return _Record(source, text, problem="blank line")
    if len(row) < 2:
        return _Record(source, text, problem="no comma between image and caption")
    # An unquoted comma in the caption splits it into more fields; joining them restores the text.
    return _pair_record(source, text, row[0].strip(), ",".join(row[1:]))


# -------------------------------------------------------------------------------------------- pickles

def _pickle_records(obj, path: Path) -> tuple[str, list[_Record]]:
    """Records from an unpickled object, by its shape (see the module docstring)."""
    if isinstance(obj, str):
        return _text_records(_str_lines(obj), "pickle:str", "pickle:str")
    if isinstance(obj, (bytes, bytearray)):
        return _text_records(_byte_lines(bytes(obj).removeprefix(b"\xef\xbb\xbf")), "pickle:bytes", "pickle:bytes")
    if isinstance(obj, (list, tuple)):
        return "pickle:list", [_item_record(i, item) for i, item in enumerate(obj)]
    if isinstance(obj, dict):
        return "pickle:dict", [record for key, value in obj.items() for record in _dict_records(key, value)]
    if type(obj).__name__ == "DataFrame" and type(obj).__module__.startswith("pandas"):
        return "pickle:dataframe", _dataframe_records(obj, path)
    raise UserError(f"{path}: unknown captions format: the pickle holds a {type(obj).__name__}. Expected the "
                    "token file text, a list of lines or (image, caption) pairs, a dict, or a DataFrame.")


def _as_text(value, what: str) -> tuple[str | None, str | None]:
    """(text, None), or (None, why not) for values that are not str or UTF-8 bytes."""
    if isinstance(value, str):
        return value, None
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode("utf-8"), None
        except UnicodeDecodeError as err:
            return None, f"{what} bytes are not valid UTF-8 (byte 0x{value[err.start]:02x} at position {err.start})"
    if value is None or type(value).__name__ == "NAType" or (isinstance(value, float) and math.isnan(value)):
        return None, f"{what} is missing ({value!r})"
    return None, f"{what} is not text ({type(value).__name__})"


def _item_record(index: int, item) -> _Record:
    """A list item: a token line (str/bytes), an (image, caption) pair or an {image, caption} dict."""
    source = f"item {index}"
    if isinstance(item, (list, tuple)) and len(item) == 2:
        return _pair_record(source, item, *item)
    if isinstance(item, dict):
        image_key, caption_key = _find_column(item, IMAGE_COLUMNS), _find_column(item, CAPTION_COLUMNS)
        if image_key is None or caption_key is None:
            return _Record(source, item, problem="item is a dict without an image and a caption key")
        return _pair_record(source, item, item[image_key], item[caption_key])
    if not isinstance(item, (str, bytes, bytearray)):
        return _Record(source, item, problem=f"item is neither a caption line, an (image, caption) pair "
                                             f"nor an {{image, caption}} dict ({type(item).__name__})")
    text, problem = _as_text(item, "line")
    if problem:
        return _Record(source, item, problem=problem)
    if "\n" in text.strip():
        return _Record(source, text, problem="item holds several lines; expected one caption line per item")
    return _token_record(_Record(source, text))


def _pair_record(source: str, text, image, caption, number=None) -> _Record:
    """An (image, caption) record; an image name ending in `#k` carries its caption number."""
    image, problem = _as_text(image, "image name")
    if problem is None:
        caption, problem = _as_text(caption, "caption")
    if problem:
        return _Record(source, text, problem=problem)
    image = image.strip()
    named = _NAME_WITH_NUMBER.fullmatch(image)
    if named and number is None:
        image, number = named["image"], int(named["number"])
    return _Record(source, text, image=image, number=number, raw=caption.strip())


def _dict_records(key, value) -> list[_Record]:
    """`image -> [captions]` (number = position) or `"image#k" -> caption`."""
    if isinstance(value, (list, tuple)):
        return [_dict_caption(f"key {key!r} item {i}", key, caption, i) for i, caption in enumerate(value)]
    source = f"key {key!r}"
    if not isinstance(value, (str, bytes, bytearray)):
        return [_Record(source, value, problem=f"value is neither a caption nor a list of captions "
                                               f"({type(value).__name__})")]
    name, problem = _as_text(key, "key")
    if problem:
        return [_Record(source, value, problem=problem)]
    named = _NAME_WITH_NUMBER.fullmatch(name.strip())
    if named is None and "#" in name:
        number = name.rpartition("#")[2]
        return [_Record(source, value, problem=f"caption number {number!r} is not a non-negative integer")]
    if named is None:
        return [_Record(source, value, problem="key has no '#<number>'; expected 'name.jpg#0': caption "
                                               "or 'name.jpg': [captions]")]
    return [_dict_caption(source, named["image"], value, int(named["number"]))]


def _dict_caption(source: str, image, caption, number: int) -> _Record:
    image, problem = _as_text(image, "key")
    if problem is None:
        caption, problem = _as_text(caption, "caption")
    if problem:
        return _Record(source, caption, problem=problem)
    return _Record(source, caption, image=image.strip(), number=number, raw=caption.strip())


def _find_column(columns, names: tuple[str, ...]):
    """The first of `names` among `columns` (DataFrame columns or dict keys), ignoring case."""
    by_name = {str(column).strip().lower(): column for column in columns}
    return next((by_name[name] for name in names if name in by_name), None)


def _dataframe_records(frame, path: Path) -> list[_Record]:
    image_column = _find_column(frame.columns, IMAGE_COLUMNS)
    caption_column = _find_column(frame.columns, CAPTION_COLUMNS)
    if image_column is None or caption_column is None:
        raise UserError(f"{path}: the pickled DataFrame needs an image column ({', '.join(IMAGE_COLUMNS)}) and "
                        f"a caption column ({', '.join(CAPTION_COLUMNS)}); it has {list(map(str, frame.columns))}.")
    number_column = _find_column(frame.columns, NUMBER_COLUMNS)
    numbers = frame[number_column].tolist() if number_column is not None else [None] * len(frame)
    records = []
    for i, (image, caption, number) in enumerate(zip(frame[image_column].tolist(),
                                                     frame[caption_column].tolist(), numbers)):
        text = {"image": image, "caption": caption}
        if number is not None and not _is_whole_number(number):
            problem = f"caption number {number!r} is not a non-negative integer"
            records.append(_Record(f"row {i}", text, problem=problem))
            continue
        records.append(_pair_record(f"row {i}", text, image, caption, None if number is None else int(number)))
    return records


def _is_whole_number(value) -> bool:
    try:
        return int(value) == value and int(value) >= 0 and not isinstance(value, bool)
    except (TypeError, ValueError, OverflowError):
        return False


# --------------------------------------------------------------------------------------------- COCO

def _coco_records(body: bytes, path: Path) -> list[_Record]:
    """One record per annotation; `image_id` is looked up in the `images` list."""
    try:
        document = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 JSON (byte {err.start}). Re-save it as UTF-8.") from err
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON ({err.msg} at line {err.lineno} column {err.colno}).") from err
    if not (isinstance(document, dict) and isinstance(document.get("images"), list)
            and isinstance(document.get("annotations"), list)):
        raise UserError(f"{path}: JSON but not COCO captions: it needs an 'images' list of "
                        "{id, file_name} and an 'annotations' list of {image_id, caption}.")
    names = {}
    for image in document["images"]:
        if isinstance(image, dict) and "id" in image and "file_name" in image:
            names.setdefault(_hashable(image["id"]), image["file_name"])
    return [_coco_record(i, annotation, names) for i, annotation in enumerate(document["annotations"])]


def _hashable(value):
    return json.dumps(value, sort_keys=True) if isinstance(value, (list, dict)) else value


def _coco_record(index: int, annotation, names: dict) -> _Record:
    source = f"annotation {index}"
    text = json.dumps(annotation, ensure_ascii=False)
    if not isinstance(annotation, dict):
        return _Record(source, text, problem="annotation is not an object")
    if "image_id" not in annotation or "caption" not in annotation:
        return _Record(source, text, problem="annotation has no 'image_id' or no 'caption'")
    image_id = _hashable(annotation["image_id"])
    if image_id not in names:
        return _Record(source, text, problem=f"image_id {annotation['image_id']!r} is not in the 'images' list")
    return _pair_record(source, text, names[image_id], annotation["caption"])


# ------------------------------------------------------------------------------------- shared checks

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


def _check_records(records: list[_Record]) -> None:
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


def _record_problem(record: _Record, first_seen: dict) -> str | None:
    problem = _name_problem(record.image)
    if problem:
        return problem
    if not record.raw:
        return "empty caption"
    record.caption = clean_caption(record.raw)
    if not record.caption:
        return "caption has no letters or digits"
    first = first_seen.get((record.image, record.number))
    if first is not None:
        return f"duplicate caption {record.image}#{record.number}: the first one, at {first}, is kept"
    return None


# ------------------------------------------------------------------------------------ table and report

def _excerpt(text) -> str:
    return (text if isinstance(text, str) else repr(text))[:EXCERPT_CHARS]


def _summarise(records: list[_Record], files: set[str], *, source: str, fmt: str) -> tuple[pd.DataFrame, dict]:
    valid = [record for record in records if record.problem is None]
    skipped = [{"line": r.source, "reason": r.problem, "text": _excerpt(r.text)}
               for r in records if r.problem is not None]
    kept = sorted((r for r in valid if r.image in files), key=lambda r: (r.image, r.number))
    missing: dict[str, list[str]] = defaultdict(list)
    for record in valid:
        if record.image not in files:
            missing[record.image].append(record.source)
    named = {record.image for record in valid}
    unnamed = sorted(name for name in files if name.lower().endswith(IMAGE_SUFFIXES) and name not in named)
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
        },
        "images_without_captions": {"count": len(unnamed), "images": unnamed},
        "separator_repairs": {kind: repairs[kind] for kind in SEPARATOR_KINDS},
    }
    return _table(kept), report


def _table(records: list[_Record]) -> pd.DataFrame:
    return pd.DataFrame({
        "image": pd.Series([r.image for r in records], dtype=str),
        "caption_number": pd.Series([r.number for r in records], dtype="int64"),
        "raw_caption": pd.Series([r.raw for r in records], dtype=str),
        "caption": pd.Series([r.caption for r in records], dtype=str),
        "source": pd.Series([r.source for r in records], dtype=str),
    }, columns=TABLE_COLUMNS)


def _fail_if_unusable(report: dict, path: Path, images_dir, max_skipped_fraction: float) -> None:
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
                        "Set data.images to the folder that holds these photos.")
