"""Property tests: any mix of good and broken lines parses to exactly the good rows, and counts add up."""
from __future__ import annotations

import csv
import io
import pickle
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from captioning.captions import load_captions
from captioning.errors import UserError
from captioning.text import clean_caption

EXISTING = ("a.jpg", "b.jpg", "c.jpg")
NAMES = (*EXISTING, "gone.jpg")  # gone.jpg has no file
# separator as written -> the repair kind it is counted as (None: a real TAB)
SEPARATORS = {"\t": None, "\\t": "literal_backslash_t", " ": "spaces", "   ": "spaces", "t": "bare_t", "": "missing"}
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# Starts with an upper-case letter, so every separator above (even the bare `t`) is unambiguous.
# Accented letters make the line invalid UTF-8 when it is written in cp1252: each one is then a byte
# 0xc0-0xff that a UTF-8 continuation byte (0x80-0xbf) never follows here.
captions = st.from_regex(r"[A-Z][a-zéèçñüà]{0,6}( [a-z0-9'éèçñüà]{1,6}){0,4}( \.)?", fullmatch=True)
encodings = st.sampled_from(["utf-8", "cp1252"])
names = st.sampled_from(NAMES)
numbers = st.integers(0, 40)

garbage = st.one_of(
    st.sampled_from(["", "   ", "\t", "  \t "]),                                            # blank
    st.from_regex(r"[a-z][a-z .]{0,20}", fullmatch=True),                                  # no key at all
    st.builds("{}\t{}".format, names, captions),                                           # no #number
    st.builds("{}#{}\t{}".format, names, st.from_regex(r"[a-z]{1,3}|-[0-9]", fullmatch=True), captions),
    st.builds("{}#{}".format, names, numbers),                                             # empty caption
    st.builds("{}#{}\t{}".format, names, numbers, st.sampled_from([".", " , ", "!?"])),   # no words
    st.builds("{}{}#{}\t{}".format, st.sampled_from(["../", "sub/", "/abs/", "..\\"]), names, numbers, captions),
).map(str.encode)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    for name in EXISTING:
        (folder / name).write_bytes(b"")
    return folder


@st.composite
def token_files(draw):
    """(lines as bytes, expected good rows {(image, number): raw caption}, expected repairs, n skipped)."""
    keys = draw(st.lists(st.tuples(names, numbers), unique=True, max_size=25))
    good = {}
    lines, repairs = [], Counter()
    for image, number in keys:
        caption, separator = draw(captions), draw(st.sampled_from(sorted(SEPARATORS)))
        good[(image, number)] = caption
        lines.append(f"{image}#{number}{separator}{caption}".encode(draw(encodings)))
        if SEPARATORS[separator]:
            repairs[SEPARATORS[separator]] += 1
    bad = draw(st.lists(garbage, max_size=15))
    lines = draw(st.permutations(lines + bad))
    # Repeats of good keys, after all the originals: the first one must win.
    repeats = draw(st.lists(st.sampled_from(keys), max_size=5)) if keys else []
    lines += [f"{image}#{number}\tA repeat .".encode() for image, number in repeats]
    return lines, good, repairs, len(bad) + len(repeats)


def not_utf8(line: bytes) -> bool:
    try:
        line.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def check(path, images, good: dict, n_lines: int, n_skipped: int):
    """Parse `path`; assert it gives exactly the good rows and consistent counts. Returns the report."""
    kept = {key: raw for key, raw in good.items() if key[0] in EXISTING}
    if not kept:
        with pytest.raises(UserError):
            load_captions(path, images, max_skipped_fraction=1.0)
        return None
    table, report = load_captions(path, images, max_skipped_fraction=1.0)
    assert list(zip(table["image"], table["caption_number"], table["raw_caption"], strict=True)) == \
        [(image, number, raw) for (image, number), raw in sorted(kept.items())]
    assert list(table["caption"]) == [clean_caption(raw) for _, raw in sorted(kept.items())]
    assert report["lines_read"] == n_lines
    assert report["skipped_count"] == n_skipped == len(report["skipped"])
    assert report["rows_parsed"] == len(good)
    assert report["lines_read"] == report["rows_parsed"] + report["skipped_count"]
    assert report["rows_parsed"] == report["rows_kept"] + report["missing_images"]["captions_excluded"]
    assert report["missing_images"]["captions_excluded"] == len(good) - len(kept)
    assert report["image_names"] == len({image for image, _ in good})
    return report


@SETTINGS
@given(token_files())
def test_good_and_broken_token_lines_parse_to_exactly_the_good_rows(tmp_path, images, sample):
    lines, good, repairs, n_skipped = sample
    path = tmp_path / "captions.txt"
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    report = check(path, images, good, len(lines), n_skipped)
    if report is not None:
        assert report["separator_repairs"] == {kind: repairs[kind] for kind in report["separator_repairs"]}
        # cp1252 lines are decoded by the fallback (their raw captions matched above) and listed
        cp1252 = [f"line {n}" for n, line in enumerate(lines, start=1) if not_utf8(line)]
        assert report["decoded_as_cp1252"] == {"count": len(cp1252), "lines": cp1252}
        assert report["decoded_as_latin1"]["count"] == 0


@SETTINGS
@given(token_files())
def test_a_pickled_list_of_the_same_lines_parses_the_same(tmp_path, images, sample):
    lines, good, _, n_skipped = sample
    path = tmp_path / "captions.pkl"
    path.write_bytes(pickle.dumps(lines))
    report = check(path, images, good, len(lines), n_skipped)
    if report is not None:
        assert report["decoded_as_cp1252"]["lines"] == [f"item {i}" for i, line in enumerate(lines) if not_utf8(line)]


# Any printable text without line breaks; the csv writer quotes commas and quotes.
csv_captions = st.text(st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp")), max_size=30)


@SETTINGS
@given(st.lists(st.tuples(names, csv_captions), max_size=30))
def test_kaggle_csv_round_trips_any_caption_text(tmp_path, images, rows):
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["image", "caption"])
    writer.writerows(rows)
    path = tmp_path / "captions.txt"
    path.write_text(buffer.getvalue(), encoding="utf-8")
    order, good = Counter(), {}
    for image, caption in rows:
        number = order[image]
        order[image] += 1
        if any(char.isalnum() for char in clean_caption(caption)):  # a letter or digit survives the cleaning
            good[(image, number)] = caption.strip()
    check(path, images, good, len(rows), len(rows) - len(good))
