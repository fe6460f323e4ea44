"""Flickr8k token text: one `name.jpg#k<separator>caption` per line, with the broken separators people
really have (see the package docstring for the rule), and the choice between it and Kaggle csv."""
from __future__ import annotations

import re

from captioning.captions.kaggle_csv import is_kaggle_header, kaggle_records
from captioning.captions.records import Record, caption_number, number_too_large

SEPARATOR_KINDS = ("literal_backslash_t", "bare_t", "spaces", "missing")

_DIGITS = re.compile(r"[0-9]+")
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


def text_records(lines: list[Record], token_format: str, kaggle_format: str) -> tuple[str, list[Record]]:
    """Kaggle csv when the first line is its header, else token lines."""
    if lines and is_kaggle_header(lines[0].text):
        return kaggle_format, kaggle_records(lines[1:])
    return token_format, [token_record(line) for line in lines]


def token_record(line: Record) -> Record:
    """Parse one `name.jpg#k<separator>caption` line (separator rule in the package docstring)."""
    text = line.text.removeprefix("\ufeff").strip()
    if not text:
        line.problem = "blank line"
    elif "\t" in text:
        _parse_tab_line(line, text)
    else:
        _parse_repaired_line(line, text)
    return line


def _parse_tab_line(line: Record, text: str) -> None:
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
    elif (parsed := caption_number(number)) is None:
        line.problem = number_too_large(number)
    else:
        line.image, line.number, line.raw = image.strip(), parsed, caption.strip()


def _parse_repaired_line(line: Record, text: str) -> None:
    """A line without a real TAB: accept the known broken separators, and remember which one."""
    match = _REPAIRED_LINE.fullmatch(text) or _KEY_ONLY.fullmatch(text)
    if match is None:
        line.problem = _why_no_key(text)
        return
    number = caption_number(match["number"])
    if number is None:
        line.problem = number_too_large(match["number"])
        return
    line.image, line.number = match["image"], number
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
