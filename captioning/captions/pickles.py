"""Captions pickles: every shape the unpickled object may have (see the package docstring).

The file is unpickled by `captioning.safe_pickle`, never `pickle.load`, which also refuses nesting
deeper than any captions shape needs; this module only reads the plain data (or DataFrame) that comes
out, and never walks deeper than the shapes below.
"""
from __future__ import annotations

import itertools
from pathlib import Path

from captioning.captions.records import (
    LINE_BREAK,
    NAME_WITH_NUMBER,
    Record,
    as_text,
    byte_lines,
    fallback_encoding,
    pair_record,
    short_repr,
    str_lines,
)
from captioning.captions.token_text import text_records, token_record
from captioning.errors import UserError

IMAGE_COLUMNS = ("image", "image_name", "image_file", "image_filename", "filename", "file_name", "img", "file")
CAPTION_COLUMNS = ("caption", "captions", "text", "comment", "sentence", "description")
NUMBER_COLUMNS = ("caption_number",)
# A pickle can refer to one object many times (memo references), so a few kilobytes can stand for
# billions of captions: `{name: same_list for 10000 names}`. The records are counted before any is
# built; COCO, the largest common captions set, has about 617,000.
MAX_RECORDS = 2_000_000
# The same holds for text: one 1 MB caption referenced 5,000 times is a 1 MB file, but every record
# copies and cleans its caption, so parsing it would need tens of GB and the stage would be killed
# for lack of memory. The text the records hold is measured before any is built: 500 million
# characters is 250 for each of MAX_RECORDS records (COCO's captions and names hold about 55 million).
MAX_TEXT_CHARS = 500_000_000
_SEQUENCES = (list, tuple)
_TEXT = (str, bytes, bytearray)


def pickle_records(obj, path: Path) -> tuple[str, list[Record]]:
    """Records from an unpickled object, by its shape."""
    if isinstance(obj, str):
        return text_records(str_lines(obj), "pickle:str", "pickle:str")
    if isinstance(obj, (bytes, bytearray)):
        return text_records(byte_lines(bytes(obj).removeprefix(b"\xef\xbb\xbf")), "pickle:bytes", "pickle:bytes")
    if type(obj).__name__ == "DataFrame" and type(obj).__module__.startswith("pandas"):
        return "pickle:dataframe", _dataframe_records(obj, path)
    if not isinstance(obj, (*_SEQUENCES, dict, set, frozenset)):
        raise UserError(f"{path}: unknown captions format: the pickle holds a {type(obj).__name__}. Expected the "
                        "token file text, a list of lines or (image, caption) pairs, a dict, a set of lines, "
                        "or a DataFrame.")
    keys = _RecordKeys()
    _check_record_count(obj, path, keys)
    if isinstance(obj, dict):
        return "pickle:dict", [record for key, value in obj.items() for record in _dict_records(key, value)]
    if isinstance(obj, (set, frozenset)):
        return "pickle:set", _set_records(obj, path)
    return "pickle:list", [record for i, item in enumerate(obj) for record in _item_records(i, item, keys)]


class _RecordKeys:
    """The (image key, caption key) of a dict item, looked up once per dict object.

    Why: finding them reads every key of the dict, and a list can refer to one dict of 40,000 keys
    40,000 times (a 0.5 MB pickle); looking them up again for each reference grows with the square
    (8 s for 4,000 x 4,000 here, so about 15 minutes for that file). The dicts are held by the
    unpickled object while it is read, so their ids stay theirs.
    """

    def __init__(self):
        self._found: dict[int, tuple] = {}

    def __call__(self, item: dict) -> tuple:
        found = self._found.get(id(item))
        if found is None:
            found = self._found[id(item)] = (_find_column(item, IMAGE_COLUMNS), _find_column(item, CAPTION_COLUMNS))
        return found


def _check_record_count(obj, path: Path, keys: _RecordKeys) -> None:
    if isinstance(obj, dict):
        count = sum(len(value) if isinstance(value, _SEQUENCES) else 1 for value in obj.values())
    else:
        count = sum(len(captions[1]) if (captions := _image_with_captions(item, keys)) else 1 for item in obj)
    _check_totals(path, count, lambda: _record_texts(obj, keys))


def _check_totals(path: Path, count: int, texts) -> None:
    """Refuse `count` records over MAX_RECORDS, or records whose image names and captions (`texts()`, each
    str or bytes counted by its length) hold more than MAX_TEXT_CHARS."""
    if count > MAX_RECORDS:
        raise UserError(f"{path}: the pickle holds {count:,} caption records, more than the {MAX_RECORDS:,} this "
                        "reader accepts (it refers to the same objects over and over). Check how it was made, "
                        "or split it.")
    # Only now, with at most MAX_RECORDS records to visit, is their text measured (len() reads no text).
    chars = sum(map(_text_length, texts()))
    if chars > MAX_TEXT_CHARS:
        raise UserError(f"{path}: the pickle's caption records hold {chars:,} characters of text, more than the "
                        f"{MAX_TEXT_CHARS:,} this reader accepts (it refers to the same text over and over). "
                        "Check how it was made, or split it.")


def _record_texts(obj, keys: _RecordKeys):
    """The image name and caption of every record `pickle_records` would build from a dict, list, tuple or set."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            for caption in value if isinstance(value, _SEQUENCES) else (value,):
                yield from (key, caption)
        return
    for item in obj:
        if (captions := _image_with_captions(item, keys)) is not None:
            for caption in captions[1]:
                yield from (captions[0], caption)
        elif isinstance(item, _SEQUENCES) and len(item) == 2:
            yield from item
        elif isinstance(item, dict):
            yield from (item[key] for key in keys(item) if key is not None)
        else:
            yield item


def _text_length(value) -> int:
    """Characters of a str, bytes of bytes; anything else becomes a skipped record shown through a bounded repr."""
    return len(value) if isinstance(value, _TEXT) else 0


def _image_with_captions(item, keys: _RecordKeys) -> tuple[object, list | tuple] | None:
    """(image, captions) for `(image, [caption, ...])` or `{"image": ..., "captions": [...]}`, else None."""
    if isinstance(item, _SEQUENCES) and len(item) == 2 and isinstance(item[1], _SEQUENCES):
        return item[0], item[1]
    if isinstance(item, dict):
        image_key, caption_key = keys(item)
        if image_key is not None and caption_key is not None and isinstance(item[caption_key], _SEQUENCES):
            return item[image_key], item[caption_key]
    return None


def _item_records(index: int, item, keys: _RecordKeys) -> list[Record]:
    """A list item: one caption (see `_item_record`), or an image with a list of captions (number = position)."""
    source = f"item {index}"
    if (captions := _image_with_captions(item, keys)) is not None:
        image, texts = captions
        return [pair_record(f"{source} caption {k}", text, image, text, k) for k, text in enumerate(texts)]
    return [_item_record(source, item, keys)]


def _item_record(source: str, item, keys: _RecordKeys) -> Record:
    """A token line (str/bytes), an (image, caption) pair or an {image, caption} dict."""
    if isinstance(item, _SEQUENCES) and len(item) == 2:
        return pair_record(source, item, *item)
    if isinstance(item, dict):
        image_key, caption_key = keys(item)
        if image_key is None or caption_key is None:
            return Record(source, item, problem="item is a dict without an image and a caption key")
        return pair_record(source, item, item[image_key], item[caption_key])
    if not isinstance(item, _TEXT):
        return Record(source, item, problem=f"item is neither a caption line, an (image, caption) pair "
                                            f"nor an {{image, caption}} dict ({type(item).__name__})")
    return _line_record(source, item)


def _line_record(source: str, line: str | bytes | bytearray) -> Record:
    text, _ = as_text(line, "line")
    if LINE_BREAK.search(text.strip()):
        return Record(source, text, problem="item holds several lines; expected one caption line per item")
    return token_record(Record(source, text, encoding=fallback_encoding(line)))


def _set_records(lines: set | frozenset, path: Path) -> list[Record]:
    """A set of token lines. A set has no order of its own: items are numbered in sorted order."""
    others = sorted({type(line).__name__ for line in lines if not isinstance(line, _TEXT)})
    if others:
        raise UserError(f"{path}: unknown captions format: the pickle holds a set with {', '.join(others)} items. "
                        "A set is read as a set of caption lines (str or bytes) only.")
    ordered = sorted(lines, key=lambda line: (not isinstance(line, str), line))
    return [_line_record(f"item {i}", line) for i, line in enumerate(ordered)]


def _dict_records(key, value) -> list[Record]:
    """`image -> [captions]` (number = position), `"image#k" -> caption`, or `image -> caption`."""
    source = f"key {short_repr(key)}"
    if isinstance(value, _SEQUENCES):
        return [pair_record(f"{source} item {i}", caption, key, caption, i) for i, caption in enumerate(value)]
    if not isinstance(value, _TEXT):
        return [Record(source, value, problem=f"value is neither a caption nor a list of captions "
                                              f"({type(value).__name__})")]
    name, problem = as_text(key, "key")
    if problem:
        return [Record(source, value, problem=problem)]
    if "#" in name and NAME_WITH_NUMBER.fullmatch(name.strip()) is None:
        number = name.rpartition("#")[2]
        return [Record(source, value, problem=f"caption number {number!r} is not a non-negative integer")]
    return [pair_record(source, value, key, value)]


def _find_column(columns, names: tuple[str, ...]):
    """The first of `names` among `columns` (DataFrame columns or dict keys), ignoring case."""
    by_name = {column.strip().lower(): column for column in columns if isinstance(column, str)}
    return next((by_name[name] for name in names if name in by_name), None)
def _dataframe_records(frame, path: Path) -> list[Record]:
    try:  # a pickle can leave a DataFrame half-built (its state without `_mgr`): every use of it then fails
        frame.columns, len(frame)
    except Exception as err:
        raise UserError(f"{path}: the pickled DataFrame is damaged ({type(err).__name__}: {err}). Re-create it, "
                        "or use a Flickr8k token text file instead.") from err
    image_column = _find_column(frame.columns, IMAGE_COLUMNS)
    caption_column = _find_column(frame.columns, CAPTION_COLUMNS)
    if image_column is None or caption_column is None:
        raise UserError(f"{path}: the pickled DataFrame needs an image column ({', '.join(IMAGE_COLUMNS)}) and "
                        f"a caption column ({', '.join(CAPTION_COLUMNS)}); it has {short_repr(list(frame.columns))}.")
    number_column = _find_column(frame.columns, NUMBER_COLUMNS)
    # The same bounds as for plain data: an object column can hold one long caption under many rows.
    images, captions = frame[image_column].tolist(), frame[caption_column].tolist()
    _check_totals(path, len(frame), lambda: itertools.chain(images, captions))
    numbers = frame[number_column].tolist() if number_column is not None else [None] * len(frame)
    records = []
    for i, (image, caption, number) in enumerate(zip(images, captions, numbers, strict=True)):
        text = {"image": image, "caption": caption}
        if number is not None and not _is_whole_number(number):
            problem = f"caption number {short_repr(number)} is not a non-negative integer"  # repr fails on long ints
            records.append(Record(f"row {i}", text, problem=problem))
            continue
        records.append(pair_record(f"row {i}", text, image, caption, None if number is None else int(number)))
    return records


def _is_whole_number(value) -> bool:
    try:
        return int(value) == value and int(value) >= 0 and not isinstance(value, bool)
    except (TypeError, ValueError, OverflowError):
        return False
