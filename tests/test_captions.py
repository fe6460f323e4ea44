"""Reading every captions format into one table, and the report of what was skipped and why."""
from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from captioning.captions import load_captions
from captioning.errors import UserError
from captioning.text import clean_caption

IMAGES = ("a.jpg", "b.jpg", "c.jpg")
GOOD = ["a.jpg#0\tA dog runs .", "a.jpg#1\tA brown dog .", "b.jpg#0\tA cat sleeps .", "c.jpg#0\tTwo birds ."]
GOOD_ROWS = [("a.jpg", 0, "A dog runs ."), ("a.jpg", 1, "A brown dog ."),
             ("b.jpg", 0, "A cat sleeps ."), ("c.jpg", 0, "Two birds .")]
REPORT_KEYS = ["source", "format", "lines_read", "rows_parsed", "skipped_count", "skipped", "image_names",
               "images_found", "rows_kept", "missing_images", "images_without_captions", "separator_repairs",
               "decoded_as_cp1252", "decoded_as_latin1"]
NO_REPAIRS = {"literal_backslash_t": 0, "bare_t": 0, "spaces": 0, "missing": 0}


@pytest.fixture
def images(tmp_path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    for name in IMAGES:
        (folder / name).write_bytes(b"never opened")
    return folder


def write(folder: Path, name: str, content) -> Path:
    path = folder / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


def token_file(folder: Path, lines, name: str = "captions.token.txt") -> Path:
    body = b"".join((line if isinstance(line, bytes) else line.encode("utf-8")) + b"\n" for line in lines)
    return write(folder, name, body)


def rows(table: pd.DataFrame) -> list[tuple]:
    return list(zip(table["image"], table["caption_number"], table["raw_caption"], strict=True))


def assert_counts_add_up(report: dict) -> None:
    assert report["lines_read"] == report["rows_parsed"] + report["skipped_count"]
    assert report["skipped_count"] == len(report["skipped"])
    assert report["rows_parsed"] == report["rows_kept"] + report["missing_images"]["captions_excluded"]


# ------------------------------------------------------------------------------------------ token text

def test_token_file_gives_the_table_and_the_whole_report(tmp_path, images):
    path = token_file(tmp_path, [*GOOD, "zzz.jpg#0\tA ghost .", "zzz.jpg#1\tAnother ghost ."])
    (images / "lonely.png").write_bytes(b"")
    table, report = load_captions(path, images)
    assert list(table.columns) == ["image", "caption_number", "raw_caption", "caption", "source"]
    assert rows(table) == GOOD_ROWS
    assert list(table["caption"]) == [clean_caption(raw) for _, _, raw in GOOD_ROWS]
    assert list(table["source"]) == ["line 1", "line 2", "line 3", "line 4"]
    assert report == {
        "source": str(path), "format": "token_txt", "lines_read": 6, "rows_parsed": 6,
        "skipped_count": 0, "skipped": [], "image_names": 4, "images_found": 3, "rows_kept": 4,
        "missing_images": {"count": 1, "captions_excluded": 2, "images": {"zzz.jpg": ["line 5", "line 6"]},
                           "near_matches": {}},
        "images_without_captions": {"count": 1, "images": ["lonely.png"]},
        "separator_repairs": NO_REPAIRS,
        "decoded_as_cp1252": {"count": 0, "lines": []}, "decoded_as_latin1": {"count": 0, "lines": []},
    }
    assert list(report) == REPORT_KEYS
    json.dumps(report)


def test_rows_are_sorted_by_image_then_number(tmp_path, images):
    table, _ = load_captions(token_file(tmp_path, GOOD[::-1]), images)
    assert rows(table) == GOOD_ROWS
    assert table["caption_number"].dtype == "int64"


@pytest.mark.parametrize("line, kind, image, number, raw", [
    ("b.jpg#1\tA cat .", None, "b.jpg", 1, "A cat ."),
    ("b.jpg#1\\tA cat .", "literal_backslash_t", "b.jpg", 1, "A cat ."),
    ("b.jpg#1 A cat .", "spaces", "b.jpg", 1, "A cat ."),
    ("b.jpg#1    A cat .", "spaces", "b.jpg", 1, "A cat ."),
    ("b.jpg#1tA cat .", "bare_t", "b.jpg", 1, "A cat ."),
    ("b.jpg#1A cat .", "missing", "b.jpg", 1, "A cat ."),
    ("b.jpg#12A cat .", "missing", "b.jpg", 12, "A cat ."),
    ("b.jpg#1the cat .", "missing", "b.jpg", 1, "the cat ."),   # a bare `t` counts only before upper case
    ("319847657_2c40e14113.jpg#0tA girl in a purple shirt hold a pillow .", "bare_t",
     "319847657_2c40e14113.jpg", 0, "A girl in a purple shirt hold a pillow ."),
])
def test_each_separator_is_accepted_and_counted(tmp_path, images, line, kind, image, number, raw):
    (images / "319847657_2c40e14113.jpg").write_bytes(b"")
    table, report = load_captions(token_file(tmp_path, [*GOOD, line]), images)
    assert report["skipped"] == []
    assert (image, number, raw) in rows(table)
    assert report["separator_repairs"] == {**NO_REPAIRS, **({kind: 1} if kind else {})}


NOT_ALLOWED = "; only plain file names inside the images folder are allowed"


@pytest.mark.parametrize("bad, reason, text", [
    (b"", "blank line", ""),
    (b"  \t  ", "blank line", "  \t  "),
    (b"just some words", "no TAB and no 'name.jpg#<number>' key at the start of the line", "just some words"),
    (b"a.jpg\tA dog .", "key 'a.jpg' before the TAB has no '#<number>' caption number", "a.jpg\tA dog ."),
    (b"a.jpg#x\tA dog .", "caption number 'x' is not a non-negative integer", "a.jpg#x\tA dog ."),
    (b"a.jpg#-1\tA dog .", "caption number '-1' is not a non-negative integer", "a.jpg#-1\tA dog ."),
    (b"a.jpg#1.5 A dog .", "caption number '1.5' is not a non-negative integer", "a.jpg#1.5 A dog ."),
    (b"a.jpg#5-A dog .", "caption number '5-A' is not a non-negative integer", "a.jpg#5-A dog ."),
    ("a.jpg#5\u00a0A dog .".encode(), "no TAB or other known separator after 'a.jpg#5'", "a.jpg#5\u00a0A dog ."),
    (b"a.jpg#\tA dog .", "no caption number after '#'", "a.jpg#\tA dog ."),
    (b"#3\tA dog .", "empty image name before '#'", "#3\tA dog ."),
    (b"a.jpg#7\t", "empty caption", "a.jpg#7\t"),
    (b"a.jpg#7", "empty caption", "a.jpg#7"),
    (b"a.jpg#7\t . , !", "caption has no letters or digits", "a.jpg#7\t . , !"),
    (b"a.jpg#7\t''", "caption has no letters or digits", "a.jpg#7\t''"),  # cleaning keeps apostrophes
    ("a.jpg#7\t\u2019 \u0301 .".encode(), "caption has no letters or digits", "a.jpg#7\t\u2019 \u0301 ."),  # and marks
    (b"a.jpg#0\tAnother dog .", "duplicate caption a.jpg#0: the first one, at line 1, is kept",
     "a.jpg#0\tAnother dog ."),
    (b"../secret.jpg#0\tA key .", "image name '../secret.jpg' contains '..'" + NOT_ALLOWED, "../secret.jpg#0\tA key ."),
    (b"images/a.jpg#5\tA dog .", "image name 'images/a.jpg' contains '/'" + NOT_ALLOWED, "images/a.jpg#5\tA dog ."),
    (b"..\\a.jpg#5\tA dog .", "image name '..\\\\a.jpg' contains '..'" + NOT_ALLOWED, "..\\a.jpg#5\tA dog ."),
    (b"a\\b.jpg#5\tA dog .", "image name 'a\\\\b.jpg' contains '\\\\'" + NOT_ALLOWED, "a\\b.jpg#5\tA dog ."),
    (b"/etc/passwd#5\tA dog .", "image name '/etc/passwd' is an absolute path" + NOT_ALLOWED, "/etc/passwd#5\tA dog ."),
    (b"C:a.jpg#5\tA dog .", "image name 'C:a.jpg' starts with a drive (C:)" + NOT_ALLOWED, "C:a.jpg#5\tA dog ."),
    (b"a\x01.jpg#5\tA dog .", "image name 'a\\x01.jpg' contains a control character", "a\x01.jpg#5\tA dog ."),
])
def test_each_bad_line_is_one_exact_skip_and_every_good_line_is_kept(tmp_path, images, bad, reason, text):
    (tmp_path / "secret.jpg").write_bytes(b"outside the images folder")
    lines = [*GOOD[:2], bad, *GOOD[2:]]
    table, report = load_captions(token_file(tmp_path, lines), images)
    assert report["skipped"] == [{"line": "line 3", "reason": reason, "text": text}]
    assert rows(table) == GOOD_ROWS
    assert report["lines_read"] == 5 and report["rows_parsed"] == 4
    assert_counts_add_up(report)


def test_skipped_text_is_cut_to_200_characters(tmp_path, images):
    long_line = "x" * 500
    _, report = load_captions(token_file(tmp_path, [*GOOD, long_line]), images)
    assert report["skipped"][0]["text"] == "x" * 200


def test_crlf_line_endings_are_handled_silently(tmp_path, images):
    path = write(tmp_path, "crlf.txt", "\r\n".join(GOOD) + "\r\n")
    table, report = load_captions(path, images)
    assert rows(table) == GOOD_ROWS and report["skipped"] == [] and report["lines_read"] == 4


def test_a_utf8_bom_is_handled_silently(tmp_path, images):
    path = write(tmp_path, "bom.txt", b"\xef\xbb\xbf" + "\n".join(GOOD).encode() + b"\n")
    table, report = load_captions(path, images)
    assert rows(table) == GOOD_ROWS and report["skipped"] == []


@pytest.mark.parametrize("ending, lines_read, skipped", [("", 4, 0), ("\n", 4, 0), ("\n\n", 5, 1)])
def test_only_the_final_newline_does_not_make_a_line(tmp_path, images, ending, lines_read, skipped):
    path = write(tmp_path, "c.txt", "\n".join(GOOD) + ending)
    _, report = load_captions(path, images)
    assert (report["lines_read"], report["skipped_count"]) == (lines_read, skipped)


def test_the_lines_of_a_real_line_number_are_reported_for_missing_images(tmp_path, images):
    path = token_file(tmp_path, ["q.jpg#0\tA q .", *GOOD, "q.jpg#1\tAnother q ."])
    _, report = load_captions(path, images)
    assert report["missing_images"] == {"count": 1, "captions_excluded": 2, "images": {"q.jpg": ["line 1", "line 6"]},
                                        "near_matches": {}}
    assert_counts_add_up(report)


def test_images_without_captions_lists_only_image_files(tmp_path, images):
    for name in ("B.JPG", "d.jpeg", "e.PNG", "notes.txt"):
        (images / name).write_bytes(b"")
    (images / "folder.jpg").mkdir()
    _, report = load_captions(token_file(tmp_path, GOOD[:1]), images)
    assert report["images_without_captions"] == {"count": 5, "images": ["B.JPG", "b.jpg", "c.jpg", "d.jpeg", "e.PNG"]}


def test_names_that_differ_from_a_file_only_in_case_or_unicode_form_are_reported_with_the_file(tmp_path, images):
    """A camera's IMG_1.JPG named img_1.jpg in the captions, or a name typed composed (NFC) beside a file copied
    from a Mac in decomposed form (NFD), looked like any missing photo: the report listed the name alone, and
    the folder seemed to hold it. The report now pairs each with its file; nothing is matched silently."""
    (images / "IMG_1.JPG").write_bytes(b"")
    (images / "cafe\u0301.jpg").write_bytes(b"")  # "café" decomposed, as macOS's HFS+ stores it
    lines = [*GOOD, "img_1.jpg#0\tA camera photo .", "caf\u00e9.jpg#0\tA cafe ."]
    table, report = load_captions(token_file(tmp_path, lines), images)
    assert report["missing_images"]["near_matches"] == {"caf\u00e9.jpg": "cafe\u0301.jpg", "img_1.jpg": "IMG_1.JPG"}
    assert report["missing_images"]["count"] == 2 and set(table["image"]) == set(IMAGES)


def test_when_no_name_has_a_file_because_of_case_the_error_says_so(tmp_path):
    """All of a camera's IMG_n.JPG named img_n.jpg: the error said to point data.images at the folder holding
    the photos, which it already did."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("IMG_1.JPG", "IMG_2.JPG"):
        (folder / name).write_bytes(b"")
    path = token_file(tmp_path, ["img_1.jpg#0\tA dog .", "img_2.jpg#0\tA cat ."])
    with pytest.raises(UserError) as caught:
        load_captions(path, folder)
    text = str(caught.value)
    assert "upper/lower case" in text and "'img_1.jpg'" in text and "'IMG_1.JPG'" in text and "rename" in text


def test_images_without_captions_lists_every_format_extraction_reads(tmp_path, images):
    """Only .jpg/.jpeg/.png were listed: a WebP, TIFF, BMP or GIF photo that extraction reads when a caption
    names it, or an iPhone's HEIC, was left out of the report without a word when none did; so was a camera's
    HEIF (.HIF, as Canon and Sony save them), which extraction reads like an iPhone's."""
    others = ["f.webp", "g.TIF", "h.tiff", "i.bmp", "j.gif", "k.avif", "IMG_1.HEIC", "IMG_2.heif", "C0001.HIF"]
    for name in others:
        (images / name).write_bytes(b"")
    _, report = load_captions(token_file(tmp_path, GOOD[:1]), images)
    assert set(others) <= set(report["images_without_captions"]["images"])


def test_nothing_outside_the_images_folder_is_used(tmp_path, images):
    (tmp_path / "secret.jpg").write_bytes(b"")
    lines = [*GOOD, "../secret.jpg#0\tA secret .", f"{tmp_path / 'secret.jpg'}#0\tA secret ."]
    table, report = load_captions(token_file(tmp_path, lines), images)
    assert "secret" not in " ".join(table["image"])
    assert [s["line"] for s in report["skipped"]] == ["line 5", "line 6"]
    assert report["missing_images"]["count"] == 0


# ------------------------------------------------------------------------------------------ Kaggle csv

KAGGLE = ('image,caption\n'
          'a.jpg,A dog runs .\n'
          'a.jpg,"A dog, brown ."\n'
          'b.jpg,"He said ""hi"" ."\n'
          'c.jpg,A bird, flying .\n')


def test_kaggle_csv_numbers_captions_by_order_per_image(tmp_path, images):
    table, report = load_captions(write(tmp_path, "captions.txt", KAGGLE), images)
    assert report["format"] == "kaggle_csv"
    assert rows(table) == [("a.jpg", 0, "A dog runs ."), ("a.jpg", 1, "A dog, brown ."),
                           ("b.jpg", 0, 'He said "hi" .'), ("c.jpg", 0, "A bird, flying .")]
    assert list(table["source"]) == ["line 2", "line 3", "line 4", "line 5"]
    assert report["lines_read"] == 4 and report["skipped"] == []


def test_kaggle_csv_with_bom_and_crlf(tmp_path, images):
    path = write(tmp_path, "captions.txt", b"\xef\xbb\xbf" + KAGGLE.replace("\n", "\r\n").encode())
    table, report = load_captions(path, images)
    assert report["format"] == "kaggle_csv" and report["skipped"] == [] and len(table) == 4


@pytest.mark.parametrize("bad, reason", [
    (b"a.jpg", "no comma between image and caption"),
    (b"", "blank line"),
    (b"a.jpg,", "empty caption"),
    (b"../a.jpg,A dog .", "image name '../a.jpg' contains '..'" + NOT_ALLOWED),
])
def test_kaggle_csv_bad_rows_are_skipped_exactly(tmp_path, images, bad, reason):
    lines = KAGGLE.encode().split(b"\n")
    path = write(tmp_path, "captions.txt", b"\n".join([*lines[:3], bad, *lines[3:]]))
    table, report = load_captions(path, images)
    assert report["skipped"] == [{"line": "line 4", "reason": reason,
                                  "text": bad.decode("utf-8", "backslashreplace")}]
    assert len(table) == 4 and report["lines_read"] == 5


# ------------------------------------------------------------------------------------------ COCO json

COCO = {
    "images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}],
    "annotations": [
        {"id": 10, "image_id": 1, "caption": "A dog runs ."},
        {"id": 11, "image_id": 2, "caption": "A cat sleeps ."},
        {"id": 12, "image_id": 1, "caption": "A brown dog ."},
        {"id": 13, "image_id": 9, "caption": "Nobody ."},
        {"id": 14, "image_id": 1},
    ],
}


@pytest.mark.parametrize("name", ["captions_train.json", "annotations.dat"])
def test_coco_json_by_extension_or_content(tmp_path, images, name):
    table, report = load_captions(write(tmp_path, name, json.dumps(COCO)), images)
    assert report["format"] == "coco_json"
    assert rows(table) == [("a.jpg", 0, "A dog runs ."), ("a.jpg", 1, "A brown dog ."), ("b.jpg", 0, "A cat sleeps .")]
    assert list(table["source"]) == ["annotation 0", "annotation 2", "annotation 1"]
    assert [(s["line"], s["reason"]) for s in report["skipped"]] == [
        ("annotation 3", "image_id 9 is not in the 'images' list"),
        ("annotation 4", "annotation has no 'image_id' or no 'caption'"),
    ]
    assert report["lines_read"] == 5
    assert_counts_add_up(report)


@pytest.mark.parametrize("content, message", [("{not json", "not valid JSON"), ('{"images": []}', "not COCO captions")])
def test_broken_json_is_a_user_error(tmp_path, images, content, message):
    with pytest.raises(UserError, match=message):
        load_captions(write(tmp_path, "c.json", content), images)


# --------------------------------------------------------------------------------------------- pickles

def _dataframe():
    return pd.DataFrame({"image": [r[0] for r in GOOD_ROWS], "caption": [r[2] for r in GOOD_ROWS]})


SHAPES = {  # name -> (object to pickle, format, sources of the 4 rows in table order)
    "str": ("\n".join(GOOD) + "\n", "pickle:str", ["line 1", "line 2", "line 3", "line 4"]),
    "bytes": (("\n".join(GOOD) + "\n").encode(), "pickle:bytes", ["line 1", "line 2", "line 3", "line 4"]),
    "kaggle text in a str": ("image,caption\n" + "".join(f"{i},{c}\n" for i, _, c in GOOD_ROWS), "pickle:str",
                             ["line 2", "line 3", "line 4", "line 5"]),
    "list of str lines": (list(GOOD), "pickle:list", ["item 0", "item 1", "item 2", "item 3"]),
    "list of bytes lines": ([line.encode() + b"\r\n" for line in GOOD], "pickle:list",
                            ["item 0", "item 1", "item 2", "item 3"]),
    "tuple of lines": (tuple(GOOD), "pickle:list", ["item 0", "item 1", "item 2", "item 3"]),
    "list of (name#k, caption)": ([tuple(line.split("\t")) for line in GOOD], "pickle:list",
                                  ["item 0", "item 1", "item 2", "item 3"]),
    "list of (image, caption)": ([(i, c) for i, _, c in GOOD_ROWS], "pickle:list",
                                 ["item 0", "item 1", "item 2", "item 3"]),
    "list of {image, caption}": ([{"Image": i, "caption": c} for i, _, c in GOOD_ROWS], "pickle:list",
                                 ["item 0", "item 1", "item 2", "item 3"]),
    "dict image -> captions": ({"a.jpg": ["A dog runs .", "A brown dog ."], "b.jpg": ["A cat sleeps ."],
                                "c.jpg": ("Two birds .",)}, "pickle:dict",
                               ["key 'a.jpg' item 0", "key 'a.jpg' item 1", "key 'b.jpg' item 0",
                                "key 'c.jpg' item 0"]),
    "dict name#k -> caption": (dict(line.split("\t") for line in GOOD), "pickle:dict",
                               ["key 'a.jpg#0'", "key 'a.jpg#1'", "key 'b.jpg#0'", "key 'c.jpg#0'"]),
    "dataframe": (_dataframe(), "pickle:dataframe", ["row 0", "row 1", "row 2", "row 3"]),
    "list of (image, [captions])": ([("a.jpg", ["A dog runs .", "A brown dog ."]), ["b.jpg", ("A cat sleeps .",)],
                                     (b"c.jpg", [b"Two birds ."])], "pickle:list",
                                    ["item 0 caption 0", "item 0 caption 1", "item 1 caption 0", "item 2 caption 0"]),
    "list of {image, captions: [...]}": ([{"image": "a.jpg", "captions": ["A dog runs .", "A brown dog ."]},
                                          {"image": "b.jpg", "captions": ["A cat sleeps ."]},
                                          {"image": "c.jpg", "captions": ["Two birds ."]}], "pickle:list",
                                         ["item 0 caption 0", "item 0 caption 1", "item 1 caption 0",
                                          "item 2 caption 0"]),
    # a set has no order: its items are numbered in sorted order (GOOD is sorted)
    "set of lines": (set(GOOD), "pickle:set", ["item 0", "item 1", "item 2", "item 3"]),
    "frozenset of bytes lines": (frozenset(line.encode() for line in GOOD), "pickle:set",
                                 ["item 0", "item 1", "item 2", "item 3"]),
}


@pytest.mark.parametrize("protocol", [0, pickle.HIGHEST_PROTOCOL])
@pytest.mark.parametrize("shape", SHAPES)
def test_every_pickle_shape_gives_the_same_table(tmp_path, images, shape, protocol):
    obj, fmt, sources = SHAPES[shape]
    path = write(tmp_path, "captions.pkl", pickle.dumps(obj, protocol=protocol))
    table, report = load_captions(path, images, allow_pandas_pickle=(fmt == "pickle:dataframe"))
    assert report["format"] == fmt
    assert rows(table) == GOOD_ROWS
    assert list(table["source"]) == sources
    assert report["skipped"] == [] and report["lines_read"] == 4


def test_a_pickle_is_recognised_by_its_first_bytes(tmp_path, images):
    _, report = load_captions(write(tmp_path, "captions.dat", pickle.dumps(GOOD, protocol=4)), images)
    assert report["format"] == "pickle:list"


def test_a_dataframe_pickle_needs_the_opt_in(tmp_path, images):
    path = write(tmp_path, "captions.pkl", pickle.dumps(_dataframe()))
    with pytest.raises(UserError, match=r"data\.allow_pandas_pickle: true"):
        load_captions(path, images)


def test_a_dataframe_caption_number_column_is_used(tmp_path, images):
    frame = _dataframe().assign(caption_number=[3, 1, 0, 0])
    table, _ = load_captions(write(tmp_path, "c.pkl", pickle.dumps(frame)), images, allow_pandas_pickle=True)
    assert rows(table)[:2] == [("a.jpg", 1, "A brown dog ."), ("a.jpg", 3, "A dog runs .")]


def test_a_dataframe_without_caption_columns_is_a_user_error(tmp_path, images):
    frame = pd.DataFrame({"photo": ["a.jpg"], "words": ["A dog ."]})
    with pytest.raises(UserError, match="needs an image column"):
        load_captions(write(tmp_path, "c.pkl", pickle.dumps(frame)), images, allow_pandas_pickle=True)


@pytest.mark.parametrize("obj, source, reason", [
    ([*GOOD, 42], "item 4",
     "item is neither a caption line, an (image, caption) pair nor an {image, caption} dict (int)"),
    ([*GOOD, "a.jpg#5\tone\na.jpg#6\ttwo"], "item 4", "item holds several lines; expected one caption line per item"),
    ([*GOOD, ("a.jpg", None)], "item 4", "caption is missing (None)"),
    ([*GOOD, ("a.jpg", 3.5)], "item 4", "caption is not text (float)"),
    ([*GOOD, {"image": "a.jpg"}], "item 4", "item is a dict without an image and a caption key"),
    ([*GOOD, "a.jpg#0\tAgain ."], "item 4", "duplicate caption a.jpg#0: the first one, at item 0, is kept"),
    ({**dict(line.split("\t") for line in GOOD), "a.jpg": "No number ."}, "key 'a.jpg'",  # numbered 0 by order
     "duplicate caption a.jpg#0: the first one, at key 'a.jpg#0', is kept"),
    ({**dict(line.split("\t") for line in GOOD), "a.jpg#x": "Bad number ."}, "key 'a.jpg#x'",
     "caption number 'x' is not a non-negative integer"),
    ({**dict(line.split("\t") for line in GOOD), "a.jpg#5": 7}, "key 'a.jpg#5'",
     "value is neither a caption nor a list of captions (int)"),
    ({**dict(line.split("\t") for line in GOOD), "d.jpg": ["A d .", None]}, "key 'd.jpg' item 1",
     "caption is missing (None)"),
])
def test_bad_pickle_items_are_skipped_exactly(tmp_path, images, obj, source, reason):
    table, report = load_captions(write(tmp_path, "c.pkl", pickle.dumps(obj)), images)
    assert [(s["line"], s["reason"]) for s in report["skipped"]] == [(source, reason)]
    assert rows(table) == GOOD_ROWS
    assert_counts_add_up(report)


def test_a_dict_image_to_one_caption_string_is_read(tmp_path, images):
    obj = {"b.jpg": "A cat sleeps .", b"c.jpg": b"Two birds .", "a.jpg#1": "A brown dog ."}
    table, report = load_captions(write(tmp_path, "c.pkl", pickle.dumps(obj)), images)
    assert report["format"] == "pickle:dict" and report["skipped"] == []
    # a plain name is numbered by order of appearance; a `#k` key keeps its number
    assert rows(table) == [("a.jpg", 1, "A brown dog ."), ("b.jpg", 0, "A cat sleeps ."), ("c.jpg", 0, "Two birds .")]
    assert list(table["source"]) == ["key 'a.jpg#1'", "key 'b.jpg'", "key b'c.jpg'"]


def test_a_set_of_lines_with_other_items_is_an_unknown_format(tmp_path, images):
    with pytest.raises(UserError, match=r"unknown captions format: the pickle holds a set with int, tuple items"):
        load_captions(write(tmp_path, "c.pkl", pickle.dumps({*GOOD, 3, ("a.jpg", "A dog .")})), images)


@pytest.mark.parametrize("dtype", [str, object])
def test_a_missing_caption_in_a_dataframe_is_skipped(tmp_path, images, dtype):
    extra = pd.DataFrame({"image": ["a.jpg"], "caption": [float("nan")]})
    frame = pd.concat([_dataframe(), extra], ignore_index=True).astype(dtype)
    path = write(tmp_path, "c.pkl", pickle.dumps(frame))
    table, report = load_captions(path, images, allow_pandas_pickle=True)
    assert [(s["line"], s["reason"]) for s in report["skipped"]] == [("row 4", "caption is missing (nan)")]
    assert rows(table) == GOOD_ROWS


@pytest.mark.parametrize("obj", [42, None, {1, 2}])
def test_a_pickle_of_something_else_is_an_unknown_format(tmp_path, images, obj):
    with pytest.raises(UserError, match="unknown captions format"):
        load_captions(write(tmp_path, "c.pkl", pickle.dumps(obj)), images)


class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return exec, (f"open({self.path!r}, 'w').close()",)


def test_an_evil_pickle_is_refused_before_anything_runs(tmp_path, images):
    marker = tmp_path / "pwned"
    path = write(tmp_path, "c.pkl", pickle.dumps([*GOOD, _Evil(str(marker))]))
    with pytest.raises(UserError, match=r"builtins\.exec.*can run code"):
        load_captions(path, images, allow_pandas_pickle=True)
    assert not marker.exists()


# -------------------------------------------------------------------------------------------- failures

def test_a_missing_captions_file_names_the_file_and_the_param(tmp_path, images):
    with pytest.raises(UserError, match=r"captions file not found: .*nope\.txt.*data\.captions"):
        load_captions(tmp_path / "nope.txt", images)


def test_a_folder_is_not_a_captions_file(tmp_path, images):
    with pytest.raises(UserError, match="captions file not found"):
        load_captions(tmp_path, images)


def test_a_missing_images_folder_names_the_param(tmp_path):
    with pytest.raises(UserError, match=r"images folder not found: .*data\.images"):
        load_captions(token_file(tmp_path, GOOD), tmp_path / "no_images")


def test_an_empty_file_has_no_rows(tmp_path, images):
    with pytest.raises(UserError, match="no caption records"):
        load_captions(write(tmp_path, "empty.txt", b""), images)


def test_a_binary_file_is_an_unknown_format(tmp_path, images):
    with pytest.raises(UserError, match="unknown captions format"):
        load_captions(write(tmp_path, "photo.jpg", b"\xff\xd8\xff\xe0\x00\x10JFIF\x00"), images)


def test_too_many_bad_lines_fail_with_the_first_reasons(tmp_path, images):
    path = token_file(tmp_path, [*GOOD[:2], "junk one", "junk two", "junk three"])
    with pytest.raises(UserError, match=r"3 of 5 caption records are malformed.*max_skipped_fraction = 0\.5"
                                        r".*line 3: no TAB"):
        load_captions(path, images)
    _, report = load_captions(path, images, max_skipped_fraction=0.6)  # 3/5 is not more than 0.6
    assert report["skipped_count"] == 3 and report["rows_kept"] == 2


def test_all_lines_broken_but_allowed_still_means_no_rows(tmp_path, images):
    with pytest.raises(UserError, match="no usable caption"):
        load_captions(token_file(tmp_path, ["junk"]), images, max_skipped_fraction=1.0)


def test_no_image_file_for_any_caption_is_a_user_error(tmp_path, images):
    path = token_file(tmp_path, ["x.jpg#0\tA x .", "y.jpg#0\tA y ."])
    with pytest.raises(UserError, match=r"none of its 2 image names has a file in .*data\.images"):
        load_captions(path, images)


def test_parsing_does_not_import_tensorflow():
    code = ("import sys, captioning.captions, captioning.safe_pickle; "
            "sys.exit(1 if 'tensorflow' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1]).returncode == 0
