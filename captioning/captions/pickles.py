"""Captions pickles: every shape the unpickled object may have (see the package docstring).

The file is unpickled by `captioning.safe_pickle`, never `pickle.load`; this module only reads the
plain data (or DataFrame) that comes out.
"""
from __future__ import annotations

from pathlib import Path

from captioning.captions.records import NAME_WITH_NUMBER, Record, as_text, byte_lines, pair_record, str_lines
from captioning.captions.token_text import text_records, token_record
from captioning.errors import UserError

IMAGE_COLUMNS = ("image", "image_name", "image_file", "image_filename", "filename", "file_name", "img", "file")
CAPTION_COLUMNS = ("caption", "captions", "text", "comment", "sentence", "description")
NUMBER_COLUMNS = ("caption_number",)


def pickle_records(obj, path: Path) -> tuple[str, list[Record]]:
    """Records from an unpickled object, by its shape."""
    if isinstance(obj, str):
        return text_records(str_lines(obj), "pickle:str", "pickle:str")
    if isinstance(obj, (bytes, bytearray)):
        return text_records(byte_lines(bytes(obj).removeprefix(b"\xef\xbb\xbf")), "pickle:bytes", "pickle:bytes")
    if isinstance(obj, (list, tuple)):
        return "pickle:list", [_item_record(i, item) for i, item in enumerate(obj)]
    if isinstance(obj, dict):
        return "pickle:dict", [record for key, value in obj.items() for record in _dict_records(key, value)]
    if type(obj).__name__ == "DataFrame" and type(obj).__module__.startswith("pandas"):
        return "pickle:dataframe", _dataframe_records(obj, path)
    raise UserError(f"{path}: unknown captions format: the pickle holds a {type(obj).__name__}. Expected the "
                    "token file text, a list of lines or (image, caption) pairs, a dict, or a DataFrame.")


def _item_record(index: int, item) -> Record:
    """A list item: a token line (str/bytes), an (image, caption) pair or an {image, caption} dict."""
    source = f"item {index}"
    if isinstance(item, (list, tuple)) and len(item) == 2:
        return pair_record(source, item, *item)
    if isinstance(item, dict):
        image_key, caption_key = _find_column(item, IMAGE_COLUMNS), _find_column(item, CAPTION_COLUMNS)
        if image_key is None or caption_key is None:
            return Record(source, item, problem="item is a dict without an image and a caption key")
        return pair_record(source, item, item[image_key], item[caption_key])
    if not isinstance(item, (str, bytes, bytearray)):
        return Record(source, item, problem=f"item is neither a caption line, an (image, caption) pair "
                                            f"nor an {{image, caption}} dict ({type(item).__name__})")
    text, problem = as_text(item, "line")
    if problem:
        return Record(source, item, problem=problem)
    if "\n" in text.strip():
        return Record(source, text, problem="item holds several lines; expected one caption line per item")
    return token_record(Record(source, text))


def _dict_records(key, value) -> list[Record]:
    """`image -> [captions]` (number = position) or `"image#k" -> caption`."""
    if isinstance(value, (list, tuple)):
        return [_dict_caption(f"key {key!r} item {i}", key, caption, i) for i, caption in enumerate(value)]
    source = f"key {key!r}"
    if not isinstance(value, (str, bytes, bytearray)):
        return [Record(source, value, problem=f"value is neither a caption nor a list of captions "
                                              f"({type(value).__name__})")]
    name, problem = as_text(key, "key")
    if problem:
        return [Record(source, value, problem=problem)]
    named = NAME_WITH_NUMBER.fullmatch(name.strip())
    if named is None and "#" in name:
        number = name.rpartition("#")[2]
        return [Record(source, value, problem=f"caption number {number!r} is not a non-negative integer")]
    if named is None:
        return [Record(source, value, problem="key has no '#<number>'; expected 'name.jpg#0': caption "
                                              "or 'name.jpg': [captions]")]
    return [_dict_caption(source, named["image"], value, int(named["number"]))]


def _dict_caption(source: str, image, caption, number: int) -> Record:
    image, problem = as_text(image, "key")
    if problem is None:
        caption, problem = as_text(caption, "caption")
    if problem:
        return Record(source, caption, problem=problem)
    return Record(source, caption, image=image.strip(), number=number, raw=caption.strip())


def _find_column(columns, names: tuple[str, ...]):
    """The first of `names` among `columns` (DataFrame columns or dict keys), ignoring case."""
    by_name = {str(column).strip().lower(): column for column in columns}
    return next((by_name[name] for name in names if name in by_name), None)


def _dataframe_records(frame, path: Path) -> list[Record]:
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
            records.append(Record(f"row {i}", text, problem=problem))
            continue
        records.append(pair_record(f"row {i}", text, image, caption, None if number is None else int(number)))
    return records


def _is_whole_number(value) -> bool:
    try:
        return int(value) == value and int(value) >= 0 and not isinstance(value, bool)
    except (TypeError, ValueError, OverflowError):
        return False
