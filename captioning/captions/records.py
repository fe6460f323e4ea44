"""The record every format parses into, and the helpers the formats share: line splitting, text values,
(image, caption) pairs, and the excerpt of a skipped record shown in the report."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

EXCERPT_CHARS = 200
NAME_WITH_NUMBER = re.compile(r"(?P<image>.+)#(?P<number>[0-9]+)", re.DOTALL)


@dataclass
class Record:
    """One input record (a line, item, row or annotation), parsed or with the reason it is skipped."""

    source: str
    text: object                  # the record as read; shown (cut to 200 chars) only if skipped
    image: str | None = None
    number: int | None = None     # None: numbered by order of appearance of its image
    raw: str = ""
    separator: str | None = None  # repair kind when the separator was not a TAB
    problem: str | None = None
    caption: str = ""


def byte_lines(data: bytes) -> list[Record]:
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
            lines.append(Record(f"line {number}", chunk.decode("utf-8")))
        except UnicodeDecodeError as err:
            problem = f"bytes are not valid UTF-8 (byte 0x{chunk[err.start]:02x} at column {err.start + 1})"
            lines.append(Record(f"line {number}", chunk.decode("utf-8", "backslashreplace"), problem=problem))
    return lines


def str_lines(text: str) -> list[Record]:
    """The same split for text that is already decoded (a pickled str)."""
    chunks = text.removeprefix("\ufeff").split("\n")
    if chunks[-1] == "":
        chunks.pop()
    return [Record(f"line {n}", chunk.removesuffix("\r")) for n, chunk in enumerate(chunks, start=1)]


def as_text(value, what: str) -> tuple[str | None, str | None]:
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


def pair_record(source: str, text, image, caption, number=None) -> Record:
    """An (image, caption) record; an image name ending in `#k` carries its caption number."""
    image, problem = as_text(image, "image name")
    if problem is None:
        caption, problem = as_text(caption, "caption")
    if problem:
        return Record(source, text, problem=problem)
    image = image.strip()
    named = NAME_WITH_NUMBER.fullmatch(image)
    if named and number is None:
        image, number = named["image"], int(named["number"])
    return Record(source, text, image=image, number=number, raw=caption.strip())


def excerpt(text) -> str:
    return (text if isinstance(text, str) else repr(text))[:EXCERPT_CHARS]
