"""Kaggle's Flickr8k captions.txt: csv with an `image,caption` header; captions numbered by order per image."""
from __future__ import annotations

import csv
import re

from captioning.captions.records import Record, excerpt, pair_record
from captioning.errors import UserError

# A line that starts like a row of its own: `name.jpg,` (the name perhaps quoted).
_ROW_START = re.compile(r'\s*"?[^",\s]+\.(?:jpe?g|png)"?\s*,', re.IGNORECASE)


def is_kaggle_header(line: str) -> bool:
    return line.replace('"', "").replace(" ", "").lower() == "image,caption"


def kaggle_records(lines: list[Record]) -> list[Record]:
    """Rows of a Kaggle captions.txt (header already removed), parsed by the csv module.

    A quoted caption may span lines: a row's source is its first line, and it counts as decoded with
    a fallback encoding when any of its lines was.
    """
    records: list[Record] = []
    row_lines: list[Record] = []

    def texts():
        for line in lines:
            row_lines.append(line)
            yield line.text + "\n"  # with its line end, so a quoted caption spanning lines keeps the break

    reader = csv.reader(texts())
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as err:
            raise UserError(f"broken csv near {row_lines[0].source if row_lines else 'the start'}: {err}. "
                            "Fix the quoting there.") from err
        _refuse_swallowed_rows(row_lines)
        record = _kaggle_row(row_lines[0].source, "\n".join(line.text for line in row_lines), row)
        record.encoding = next((line.encoding for line in row_lines if line.encoding), None)
        row_lines.clear()
        records.append(record)
    return records


def _refuse_swallowed_rows(row_lines: list[Record]) -> None:
    """A quoted caption may span lines, but not lines that are rows themselves: that is a stray quote,
    and reading on would fold every row up to the next quote into one caption, losing them unreported."""
    swallowed = next((line for line in row_lines[1:] if _ROW_START.match(line.text)), None)
    if swallowed is not None:
        raise UserError(f"a quote at {row_lines[0].source} opens a caption that runs on over {swallowed.source} "
                        f"({excerpt(swallowed.text)!r}), which looks like a row of its own. Remove the stray "
                        f"quote at {row_lines[0].source}, or close it on that line.")


def _kaggle_row(source: str, text: str, row: list[str]) -> Record:
    if not any(field.strip() for field in row):
        return Record(source, text, problem="blank line")
    if len(row) < 2:
        return Record(source, text, problem="no comma between image and caption")
    # An unquoted comma in the caption splits it into more fields; joining them restores the text.
    return pair_record(source, text, row[0].strip(), ",".join(row[1:]))
