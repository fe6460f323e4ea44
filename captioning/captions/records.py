"""The record every format parses into, and the helpers the formats share: line splitting, text values,
(image, caption) pairs, and the excerpt of a skipped record shown in the report."""
from __future__ import annotations

import math
import re
import reprlib
from dataclasses import dataclass

from captioning.encodings import decode

EXCERPT_CHARS = 200
NAME_WITH_NUMBER = re.compile(r"(?P<image>.+)#(?P<number>[0-9]+)", re.DOTALL)
MAX_CAPTION_NUMBER = 2**63 - 1  # what the table's int64 column holds
# The line ends of bytes.splitlines; str.splitlines also splits on \x0b, \x85, \u2028 and others.
LINE_BREAK = re.compile("\r\n|\r|\n")


@dataclass
class Record:
    """One input record (a line, item, row or annotation), parsed or with the reason it is skipped."""

    source: str
    text: object                  # the record as read; shown (cut to 200 chars) only if skipped
    image: str | None = None
    number: int | None = None     # None: numbered by order of appearance of its image
    raw: str = ""
    separator: str | None = None  # repair kind when the separator was not a TAB
    encoding: str | None = None   # the fallback encoding its bytes needed (None: UTF-8 or already text)
    problem: str | None = None
    caption: str = ""


def byte_lines(data: bytes) -> list[Record]:
    """Split bytes into lines and decode each one alone, so one odd byte only changes its own line.

    A line ends in LF, CRLF or a CR alone, in any mix, as the README promises and as split.py reads the
    split lists (bytes.splitlines). Splitting on LF alone, unless the file had no LF at all, made a
    classic Mac (CR) file with one LF, say at its end, a single line: one caption holding all the
    others, which were lost without a word. The final line end does not start another line.
    """
    lines = []
    for number, chunk in enumerate(data.splitlines(), start=1):
        text, encoding = decode(chunk)
        lines.append(Record(f"line {number}", text, encoding=encoding))
    return lines


def str_lines(text: str) -> list[Record]:
    """The same split for text that is already decoded (a pickled str)."""
    chunks = LINE_BREAK.split(text.removeprefix("\ufeff"))
    if chunks[-1] == "":
        chunks.pop()
    return [Record(f"line {n}", chunk) for n, chunk in enumerate(chunks, start=1)]


def caption_number(digits: str) -> int | None:
    """The number a `#<digits>` key spells, or None when the table cannot hold it (int() of more than
    4,300 digits would even raise)."""
    digits = digits.lstrip("0") or "0"
    if len(digits) > len(str(MAX_CAPTION_NUMBER)):
        return None
    number = int(digits)
    return number if number <= MAX_CAPTION_NUMBER else None


def number_too_large(digits: str) -> str:
    shown = digits if len(digits) <= 24 else f"{digits[:20]}... ({len(digits)} digits)"
    return f"caption number {shown} is larger than {MAX_CAPTION_NUMBER}, the most the table holds"


def as_text(value, what: str) -> tuple[str | None, str | None]:
    """(text, None), or (None, why not) for values that are neither str nor bytes."""
    if isinstance(value, str):
        return value, None
    if isinstance(value, (bytes, bytearray)):
        return decode(bytes(value))[0], None
    if value is None or type(value).__name__ == "NAType" or (isinstance(value, float) and math.isnan(value)):
        return None, f"{what} is missing ({value!r})"
    return None, f"{what} is not text ({type(value).__name__})"


def fallback_encoding(*values) -> str | None:
    """The fallback encoding the first bytes value among `values` that is not UTF-8 needed, if any."""
    encodings = (decode(bytes(value))[1] for value in values if isinstance(value, (bytes, bytearray)))
    return next(filter(None, encodings), None)


def pair_record(source: str, text, image, caption, number=None) -> Record:
    """An (image, caption) record; an image name ending in `#k` carries its caption number."""
    encoding = fallback_encoding(image, caption)
    image, problem = as_text(image, "image name")
    if problem is None:
        caption, problem = as_text(caption, "caption")
    if problem:
        return Record(source, text, problem=problem)
    image = image.strip()
    named = NAME_WITH_NUMBER.fullmatch(image)
    if named and number is None:
        image, number = named["image"], caption_number(named["number"])
        if number is None:
            return Record(source, text, problem=number_too_large(named["number"]))
    return Record(source, text, image=image, number=number, raw=caption.strip(), encoding=encoding)


class _BoundedRepr(reprlib.Repr):
    """repr() that stops early: a few levels, a few items per container, long ints and bytes cut.

    Why: a skipped pickle item can be hostile (100000 levels deep, a million items, a cycle, an int of
    a million digits); plain repr() would raise RecursionError or ValueError, or build a huge string.
    """

    def __init__(self):
        super().__init__()
        self.maxlevel = 3
        self.maxstring = self.maxother = EXCERPT_CHARS
        self.maxlist = self.maxtuple = self.maxset = self.maxfrozenset = self.maxdict = 8

    def repr_int(self, x, level):
        if x.bit_length() > 1024:  # str() of an int over 4300 digits raises ValueError
            return f"<int of {x.bit_length()} bits>"
        return super().repr_int(x, level)

    def repr_bytes(self, x, level):
        return repr(bytes(x[:self.maxstring])) + (self.fillvalue if len(x) > self.maxstring else "")

    repr_bytearray = repr_bytes


short_repr = _BoundedRepr().repr


def excerpt(text) -> str:
    """What the report shows of a skipped record: its text, or a bounded repr of a non-text item."""
    shown = (text if isinstance(text, str) else short_repr(text))[:EXCERPT_CHARS]
    return shown.encode("utf-8", "backslashreplace").decode("utf-8")  # a lone surrogate becomes \\udxxx
