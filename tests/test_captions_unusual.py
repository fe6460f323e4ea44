"""Captions files as people really have them: cp1252/latin-1 text, and hostile pickles and JSON.

Every input ends in a table or a one-line UserError: never a traceback, a RecursionError or a crash.
"""
from __future__ import annotations

import json
import os
import pickle
import struct
import sys
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
from helpers import user_error_in_child
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from captioning import pickle_scan, safe_pickle
from captioning.captions import load_captions
from captioning.captions.records import short_repr
from captioning.errors import UserError

LOAD_CAPTIONS = "from captioning.captions import load_captions"  # for user_error_in_child
EXISTING = ("a.jpg", "b.jpg")
GOOD = ["a.jpg#0\tA dog runs .", "a.jpg#1\tA brown dog .", "b.jpg#0\tA cat sleeps ."]
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    for name in EXISTING:
        (folder / name).write_bytes(b"")
    return folder


def parse(tmp_path: Path, images: Path, name: str, data: bytes, **options):
    path = tmp_path / name
    path.write_bytes(data)
    return load_captions(path, images, **options)


def captions_of(table) -> list[tuple]:
    return list(zip(table["image"], table["caption_number"], table["raw_caption"], strict=True))


# ----------------------------------------------------------------------------------------- encodings

def test_a_cp1252_line_is_decoded_and_listed_instead_of_skipped(tmp_path, images):
    lines = [GOOD[0].encode(), "b.jpg#1\tA café “sign” .".encode("cp1252"), "b.jpg#2\tA naïve cat .".encode()]
    table, report = parse(tmp_path, images, "captions.txt", b"\n".join(lines) + b"\n")
    assert report["skipped"] == []
    assert ("b.jpg", 1, "A café “sign” .") in captions_of(table)  # cp1252, not latin-1: the quotes survive
    assert ("b.jpg", 2, "A naïve cat .") in captions_of(table)    # UTF-8 stays UTF-8, and is not listed
    assert {"a café sign", "a naïve cat"} <= set(table["caption"])  # and the accented words survive cleaning
    assert report["decoded_as_cp1252"] == {"count": 1, "lines": ["line 2"]}
    assert report["decoded_as_latin1"] == {"count": 0, "lines": []}
    json.dumps(report)


@pytest.mark.parametrize("encoding,line_end", [("utf-16", "\r\n"), ("utf-16-be", "\n"), ("utf-8", "\r")])
def test_utf16_files_and_old_mac_line_ends_keep_every_caption(tmp_path, images, encoding, line_end):
    """Notepad's "Unicode" (UTF-16 with a byte-order mark) and classic Mac CR-only line ends."""
    data = (line_end.join(GOOD) + line_end).encode(encoding)
    if encoding == "utf-16-be":
        data = b"\xfe\xff" + data
    table, report = parse(tmp_path, images, "captions.txt", data)
    assert captions_of(table) == [("a.jpg", 0, "A dog runs ."), ("a.jpg", 1, "A brown dog ."),
                                  ("b.jpg", 0, "A cat sleeps .")]
    assert report["lines_read"] == 3 and report["skipped"] == []


MIXED_LINE_ENDS = {"CR lines, CRLF at the end": ("\r", "\r", "\r\n"), "CR lines, LF at the end": ("\r", "\r", "\n"),
                   "LF, CR, CRLF": ("\n", "\r", "\r\n"), "CR, LF, none": ("\r", "\n", "")}


@pytest.mark.parametrize("ends", MIXED_LINE_ENDS.values(), ids=MIXED_LINE_ENDS.keys())
@pytest.mark.parametrize("shape", ["text file", "pickled str", "pickled bytes"])
def test_line_ends_mixed_in_one_file_keep_every_caption(tmp_path, images, shape, ends):
    """A classic Mac (CR) file with one LF, say added at its end, was split on LF only: one line, one caption
    holding the other two, and nothing in the report. Any mix of LF, CRLF and CR ends a line each."""
    text = "".join(line + end for line, end in zip(GOOD, ends, strict=True))
    data = {"text file": text.encode(), "pickled str": pickle.dumps(text),
            "pickled bytes": pickle.dumps(text.encode())}[shape]
    table, report = parse(tmp_path, images, "captions.txt" if shape == "text file" else "c.pkl", data)
    assert captions_of(table) == [("a.jpg", 0, "A dog runs ."), ("a.jpg", 1, "A brown dog ."),
                                  ("b.jpg", 0, "A cat sleeps .")]
    assert report["lines_read"] == 3 and report["skipped"] == []
    # one item of a pickled list holding two lines joined by a CR is reported, as one joined by an LF is
    table, report = parse(tmp_path, images, "c.pkl", pickle.dumps([GOOD[0] + "\r" + GOOD[1], GOOD[2]]))
    assert len(table) == 1 and report["skipped"][0]["reason"].startswith("item holds several lines")


def test_bytes_cp1252_cannot_decode_fall_back_to_latin1(tmp_path, images):
    line = b"b.jpg#1\tA dog \x81 and a caf\xe9 ."  # 0x81 has no cp1252 character
    table, report = parse(tmp_path, images, "captions.txt", GOOD[0].encode() + b"\n" + line + b"\n")
    assert ("b.jpg", 1, "A dog \x81 and a café .") in captions_of(table)
    assert report["decoded_as_latin1"] == {"count": 1, "lines": ["line 2"]}
    assert report["decoded_as_cp1252"]["count"] == 0


def test_a_whole_cp1252_kaggle_file_keeps_every_caption(tmp_path, images):
    text = 'image,caption\na.jpg,A dog in a café .\na.jpg,"A long caption\nthat goes on, naïvely ."\nb.jpg,A cat .\n'
    table, report = parse(tmp_path, images, "captions.txt", text.encode("cp1252"))
    assert report["format"] == "kaggle_csv" and report["skipped"] == []
    assert captions_of(table) == [("a.jpg", 0, "A dog in a café ."),
                                  ("a.jpg", 1, "A long caption\nthat goes on, naïvely ."),
                                  ("b.jpg", 0, "A cat .")]
    # a row spanning lines is listed by its first line, even when only a later line needed the fallback
    assert report["decoded_as_cp1252"] == {"count": 2, "lines": ["line 2", "line 3"]}


@pytest.mark.parametrize("obj, source", [
    ([*GOOD, "b.jpg#1\tA café .".encode("cp1252")], "item 3"),
    ([*GOOD, ("b.jpg#1", "A café .".encode("cp1252"))], "item 3"),
    ({"a.jpg": ["A dog ."], "b.jpg": [b"A cat .", "A café .".encode("cp1252")]}, "key 'b.jpg' item 1"),
    (("\n".join(GOOD) + "\nb.jpg#1\tA café .\n").encode("cp1252"), "line 4"),
])
def test_pickled_bytes_use_the_same_fallback(tmp_path, images, obj, source):
    table, report = parse(tmp_path, images, "c.pkl", pickle.dumps(obj))
    assert ("b.jpg", 1, "A café .") in captions_of(table)
    assert report["decoded_as_cp1252"] == {"count": 1, "lines": [source]} and report["skipped"] == []


def python2_str(text: bytes, protocol: int) -> bytes:
    """A Python 2 str (bytes) as Python 2's pickle wrote it: STRING with escapes (protocol 0), else SHORT_BINSTRING."""
    if protocol == 0:
        return b"S'" + "".join(chr(b) if 32 <= b < 127 and b not in b"'\\" else f"\\x{b:02x}"
                               for b in text).encode() + b"'\n"
    return b"U" + bytes([len(text)]) + text


@pytest.mark.parametrize("protocol", [0, 2])
def test_a_python2_pickle_with_non_ascii_str_keeps_every_caption(tmp_path, images, protocol):
    """Python 2 pickled its str as bytes, which pickle decodes as ASCII: one accented caption made the whole
    file `not a readable pickle`. They are decoded as the lines of a text file are, fallbacks listed."""
    captions = ["A café .".encode(), "A naïve cat .".encode("cp1252"), b"A dog ."]
    data = (b"(dp0\n" if protocol == 0 else b"\x80\x02}q\x00(") + python2_str(b"a.jpg", protocol)
    data += b"(lp1\n" if protocol == 0 else b"]q\x01("
    data += b"".join(python2_str(caption, protocol) + (b"a" if protocol == 0 else b"") for caption in captions)
    data += b"s." if protocol == 0 else b"eu."
    table, report = parse(tmp_path, images, "c.pkl", data)
    assert captions_of(table) == [("a.jpg", 0, "A café ."), ("a.jpg", 1, "A naïve cat ."), ("a.jpg", 2, "A dog .")]
    assert report["skipped"] == [] and report["decoded_as_cp1252"]["count"] == 1
    ascii_only = b"S'" + b"\\n".join(line.encode() for line in GOOD) + b"'\n."  # str unchanged when all ASCII
    table, report = parse(tmp_path, images, "c.pkl", ascii_only)
    assert report["format"] == "pickle:str" and len(table) == 3


# ---------------------------------------------------------------------------------- hostile pickles

def deep_list_pickle(depth: int) -> bytes:
    """[[[...]]] `depth` deep, written opcode by opcode: pickle.dumps itself would recurse too deep."""
    return b"\x80\x02" + b"]" * depth + b"a" * (depth - 1) + b"."


def deep_tuple_key_pickle(depth: int) -> bytes:
    """{((((),),),): None}: hashing that key recurses in C; a million levels crash the interpreter."""
    return b"\x80\x02}" + b")" + b"\x85" * depth + b"Ns."


def test_a_pickle_nested_100000_deep_is_a_clear_error(tmp_path, images):
    with pytest.raises(UserError, match=r"nests containers more than 100 levels deep"):
        parse(tmp_path, images, "c.pkl", deep_list_pickle(100_000))


def test_a_million_deep_tuple_key_is_refused_before_it_can_crash(tmp_path, images):
    """In a child process, so that a regression shows as a failed test rather than a dead test run."""
    path = tmp_path / "c.pkl"
    path.write_bytes(deep_tuple_key_pickle(1_000_000))
    message = user_error_in_child(LOAD_CAPTIONS, "load_captions(sys.argv[1], sys.argv[2])", str(path), str(images))
    assert "nests containers more than 100 levels deep" in message


def linked_lists_pickle(depth: int) -> bytes:
    """[chain, *GOOD] where chain = [[[...]]] `depth` deep, linked through memo references after the lists
    are built, so the nesting check (which counts an object's depth when it is stored) sees only 2."""
    out = [b"\x80\x04]\x94"]                                           # the outer list, memo 0
    out += [b"]\x940"] * depth                                         # lists 1..depth: make, memoize, pop
    for i in range(1, depth):                                          # list i .append(list i+1)
        out.append(b"j" + struct.pack("<I", i) + b"j" + struct.pack("<I", i + 1) + b"a0")
    out.append(b"j" + struct.pack("<I", 1) + b"a")                     # outer.append(list 1)
    for line in GOOD:
        encoded = line.encode()
        out.append(b"X" + struct.pack("<I", len(encoded)) + encoded + b"a")
    return b"".join(out) + b"."


def test_a_deep_chain_the_nesting_check_cannot_see_is_a_skipped_item(tmp_path, images):
    table, report = parse(tmp_path, images, "c.pkl", linked_lists_pickle(100_000))
    assert captions_of(table) == [("a.jpg", 0, "A dog runs ."), ("a.jpg", 1, "A brown dog ."),
                                  ("b.jpg", 0, "A cat sleeps .")]
    assert [s["line"] for s in report["skipped"]] == ["item 0"]
    assert len(report["skipped"][0]["text"]) <= 200


def test_cycles_huge_ints_bytes_keys_and_none_values(tmp_path, images):
    cyclic: list = [*GOOD]
    cyclic.append(cyclic)
    cyclic.append(10 ** 20_000)  # str() of it raises ValueError: the excerpt must not call it
    table, report = parse(tmp_path, images, "c.pkl", pickle.dumps(cyclic))
    assert len(table) == 3 and [s["line"] for s in report["skipped"]] == ["item 3", "item 4"]
    assert report["skipped"][1]["text"].startswith("<int of ")
    hostile = {b"a.jpg": [b"A dog .", None], None: "A ghost .", "b.jpg": None, ("b.jpg", 0): "A tuple key ."}
    hostile["self"] = [hostile]
    table, report = parse(tmp_path, images, "c.pkl", pickle.dumps(hostile), max_skipped_fraction=1.0)
    assert captions_of(table) == [("a.jpg", 0, "A dog .")]
    assert report["skipped_count"] == 5 and json.dumps(report)


def test_caption_numbers_too_large_for_the_table_are_skipped_records(tmp_path, images):
    huge = "9" * 5000  # int() of it raises ValueError; 20 nines overflow the int64 column
    lines = [*GOOD, f"b.jpg#{'9' * 20}\tA cat .", f"b.jpg#{huge}\tA cat .", f"b.jpg#{huge} A cat ."]
    table, report = parse(tmp_path, images, "captions.txt", "\n".join(lines).encode())
    assert len(table) == 3 and [s["line"] for s in report["skipped"]] == ["line 4", "line 5", "line 6"]
    assert all("larger than 9223372036854775807" in s["reason"] for s in report["skipped"])
    assert "(5000 digits)" in report["skipped"][1]["reason"] and json.dumps(report)
    pickled = {"a.jpg": ["A dog ."], f"b.jpg#{huge}": "A cat ."}
    table, report = parse(tmp_path, images, "c.pkl", pickle.dumps(pickled), max_skipped_fraction=1.0)
    assert len(table) == 1 and [s["line"] for s in report["skipped"]] == [f"key {short_repr(f'b.jpg#{huge}')}"]
    assert "larger than" in report["skipped"][0]["reason"]
    frame = pd.DataFrame({"image": ["a.jpg", "b.jpg"], "caption": ["A dog .", "A cat ."],
                          "caption_number": pd.Series([0, 10 ** 30], dtype=object)})
    table, report = parse(tmp_path, images, "c.pkl", pickle.dumps(frame), allow_pandas_pickle=True)
    assert len(table) == 1 and [s["line"] for s in report["skipped"]] == ["row 1"]
    assert "larger than" in report["skipped"][0]["reason"]


def test_a_memo_fan_out_bomb_is_refused_before_building_records(tmp_path, images):
    shared = [f"A caption {i} ." for i in range(1000)]
    bomb = {f"{i}.jpg": shared for i in range(3000)}  # 3 million captions in a small file
    data = pickle.dumps(bomb, protocol=4)
    assert len(data) < 100_000
    with pytest.raises(UserError, match=r"3,000,000 caption records, more than the 2,000,000"):
        parse(tmp_path, images, "c.pkl", data)


def test_one_long_caption_referenced_over_and_over_is_refused_before_building_records(tmp_path, images):
    """A 1 MB caption under 2,000 names is a 1 MB file whose records hold 2 billion characters: each record
    copied and cleaned its caption, so the stage ran out of memory. In a child process limited to 3 GB, so a
    regression fails this test with a MemoryError instead of taking the machine's memory."""
    caption = "A dog runs . " * 80_000
    path = tmp_path / "c.pkl"
    path.write_bytes(pickle.dumps({f"{i}.jpg": caption for i in range(2_000)}, protocol=4))
    assert path.stat().st_size < 2 * len(caption)
    message = user_error_in_child(LOAD_CAPTIONS, "load_captions(sys.argv[1], sys.argv[2])", str(path), str(images),
                                  memory_gb=3)
    assert "characters of text, more than the 500,000,000" in message


@pytest.mark.parametrize("shape", ["lines", "pairs", "image_captions", "dict_items", "dict_lists", "dict_one", "set"])
def test_the_text_of_every_pickle_shape_is_measured(tmp_path, images, monkeypatch, shape):
    """Each shape's records are measured by their image names and captions, and a file under the limit loads."""
    from captioning.captions import pickles
    caption = "A dog runs " + "far " * 50
    shapes = {
        "lines": [f"a.jpg#{i}\t{caption}{i}" for i in range(20)],
        "pairs": [("a.jpg", f"{caption}{i}") for i in range(20)],
        "image_captions": [("a.jpg", [f"{caption}{i}" for i in range(20)])],
        "dict_items": [{"image": "a.jpg", "caption": f"{caption}{i}"} for i in range(20)],
        "dict_lists": {"a.jpg": [f"{caption}{i}" for i in range(20)]},
        "dict_one": {f"a.jpg#{i}": f"{caption}{i}".encode() for i in range(20)},
        "set": {f"a.jpg#{i}\t{caption}{i}" for i in range(20)},
    }
    data = pickle.dumps(shapes[shape])
    monkeypatch.setattr(pickles, "MAX_TEXT_CHARS", 2 * 20 * len(caption))  # twice the captions: names fit too
    table, _ = parse(tmp_path, images, "c.pkl", data)
    assert len(table) == 20
    monkeypatch.setattr(pickles, "MAX_TEXT_CHARS", 20 * len(caption) // 2)  # half the captions' text alone
    with pytest.raises(UserError, match="characters of text, more than the"):
        parse(tmp_path, images, "c.pkl", data)


def test_a_dataframe_pickle_has_the_same_record_and_text_bounds(tmp_path, images, monkeypatch):
    """An object column can hold one long caption under many rows (one object, many references), as a dict
    can: DataFrame pickles (`data.allow_pandas_pickle: true`) were not measured at all."""
    from captioning.captions import pickles
    caption = "A dog runs " + "far " * 50
    frame = pd.DataFrame({"image": ["a.jpg"] * 20, "caption": [caption] * 20}).astype(object)
    data = pickle.dumps(frame, protocol=4)
    monkeypatch.setattr(pickles, "MAX_TEXT_CHARS", 2 * 20 * len(caption))
    assert len(parse(tmp_path, images, "c.pkl", data, allow_pandas_pickle=True)[0]) == 20
    monkeypatch.setattr(pickles, "MAX_TEXT_CHARS", 20 * len(caption) // 2)
    with pytest.raises(UserError, match="characters of text, more than the"):
        parse(tmp_path, images, "c.pkl", data, allow_pandas_pickle=True)
    monkeypatch.setattr(pickles, "MAX_RECORDS", 19)
    with pytest.raises(UserError, match="20 caption records, more than the 19"):
        parse(tmp_path, images, "c.pkl", data, allow_pandas_pickle=True)


def test_one_dict_item_referenced_over_and_over_is_read_once(tmp_path, images, monkeypatch):
    """A list referring K times to one {image, caption} dict of K keys: its keys were searched once per
    reference, K * K key reads (15 minutes for a 0.5 MB file of K = 40,000). Counted here, not timed."""
    from captioning.captions import pickles
    size = 2_000
    item = {f"extra {i}": i for i in range(size)} | {"image": "a.jpg", "caption": "A dog runs ."}
    read = []
    find_column = pickles._find_column
    monkeypatch.setattr(pickles, "_find_column", lambda columns, names: read.append(len(columns))
                        or find_column(columns, names))
    table, report = parse(tmp_path, images, "c.pkl", pickle.dumps([item] * size, protocol=4))
    assert len(table) == size and report["skipped_count"] == 0
    assert list(table["caption_number"]) == list(range(size))
    assert sum(read) < 10 * len(item)  # the dict's keys are read a few times in all, not once per reference


def every_shape(n: int, text) -> dict:
    """`n` caption records in each documented pickle shape, no object shared, names and captions made by `text`."""
    return {
        "dict of lists": {text(f"{i}.jpg"): [text(f"A dog {i} {k} .") for k in range(5)] for i in range(n // 5)},
        "dict name#k -> caption": {text(f"{i // 5}.jpg#{i % 5}"): text(f"A dog {i} .") for i in range(n)},
        "list of lines": [text(f"{i // 5}.jpg#{i % 5}\tA dog {i} .") for i in range(n)],
        "list of pairs": [(text(f"{i // 5}.jpg"), text(f"A dog {i} .")) for i in range(n)],
        "list of (image, captions)": [(text(f"{i}.jpg"), [text(f"A dog {i} {k} .") for k in range(5)])
                                      for i in range(n // 5)],
        "list of dicts": [{"image": text(f"{i // 5}.jpg"), "caption": text(f"A dog {i} .")} for i in range(n)],
        "list of dicts with captions": [{"image": text(f"{i}.jpg"), "captions": [text(f"A dog {i} {k} .")
                                                                                for k in range(5)]}
                                        for i in range(n // 5)],
        "set of lines": {text(f"{i // 5}.jpg#{i % 5}\tA dog {i} .") for i in range(n)},
    }


@pytest.mark.parametrize("text", [str, str.encode], ids=["str", "bytes"])
def test_the_expansion_bound_leaves_room_for_the_most_records_of_every_shape(monkeypatch, text):
    """MAX_RECORDS records of any shape, at any protocol, must pass the expansion and hashing bounds: measured on
    1,000 records against the same share of the bound. At 20 million, 2,000,000 bytes pairs or {image, caption}
    dicts pickled at protocols 0-2 (each bytes a call of 4-5 items) were refused as repeated references."""
    from captioning.captions.pickles import MAX_RECORDS
    n = 1_000
    monkeypatch.setattr(pickle_scan, "MAX_EXPANDED", pickle_scan.MAX_EXPANDED * n // MAX_RECORDS)
    for shape, obj in every_shape(n, text).items():
        for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
            pickle_scan.check_nesting(pickle.dumps(obj, protocol=protocol), f"{shape}, protocol {protocol}")


def doubling_tuple_key_pickle(levels: int) -> bytes:
    """{t: ["A dog ."]} where t = (u, u), u = (v, v), ... `levels` times: a few hundred bytes and only
    `levels` deep, but hashing the key visits 2**levels items. Written as the list [t, [...]] turned into
    a dict by its opcodes, because building the dict here would hash the key too."""
    key = "x"
    for _ in range(levels):
        key = (key, key)
    data = pickle.dumps([key, ["A dog ."]], protocol=2)
    assert data[2:3] == b"]" and data[-2:] == b"e."  # EMPTY_LIST ... APPENDS STOP
    return data[:2] + b"}" + data[3:-2] + b"u."      # EMPTY_DICT ... SETITEMS STOP


def test_a_hash_bomb_key_is_refused_before_it_is_hashed(tmp_path, images):
    """In a child process with a time limit, so that a regression fails the test instead of hanging it."""
    path = tmp_path / "c.pkl"
    path.write_bytes(doubling_tuple_key_pickle(60))
    assert path.stat().st_size < 1000
    message = user_error_in_child(LOAD_CAPTIONS, "load_captions(sys.argv[1], sys.argv[2])", str(path), str(images))
    assert "would expand to more than 50,000,000 items" in message
    # the same shape, small enough to hash, still loads: the bound is on expansion, not on sharing
    small = "x"
    for _ in range(3):
        small = (small, small)
    assert safe_pickle.loads(doubling_tuple_key_pickle(3)) == {small: ["A dog ."]}


def _unicode(text: str) -> bytes:
    return b"\x8c" + bytes([len(text)]) + text.encode()  # SHORT_BINUNICODE


def _get(index: int) -> bytes:
    return b"j" + struct.pack("<I", index)  # LONG_BINGET


def hash_again_pickle(step, times: int, levels: int = 22) -> bytes:
    """`times` opcode sequences `step(key)`, each hashing a new key (i, t) once: t nests `levels` pairs of one
    tuple, so it is built once but expands to 2**(levels + 1) items, a sixth of the size limit for 22 levels."""
    out = [b"\x80\x04}\x940", _unicode("x"), b"\x94"]      # memo 0: a dict (popped); memo 1: "x"
    for level in range(1, levels + 1):                     # memo level + 1 = (memo level, memo level)
        out += [_get(level), _get(level), b"\x86\x940"]
    key = _get(levels + 1) + b"\x86"                         # (i, t): TUPLE2 of what `step` pushed and t
    out += [step(_unicode(str(i)) + key) for i in range(times)]
    return b"".join(out) + b"]."                            # the result: an empty list


HASHING_STEPS = {
    "setitem into one memoized dict": lambda key: _get(0) + key + _unicode("A dog .") + b"s0",
    "setitem into a new dict each time": lambda key: b"}" + key + _unicode("A dog .") + b"s0",
    "dict opcode each time": lambda key: b"(" + key + _unicode("A dog .") + b"d0",
    "additems into a new set each time": lambda key: b"\x8f(" + key + b"\x900",
    "frozenset opcode each time": lambda key: b"(" + key + b"\x910",
    "frozenset((key,)) call each time": lambda key: _unicode("builtins") + _unicode("frozenset") + b"\x93" + key
    + b"\x85\x85R0",
}


@pytest.mark.parametrize("step", HASHING_STEPS.values(), ids=HASHING_STEPS.keys())
def test_hashing_one_big_key_again_and_again_is_refused(step):
    """Each key is just under the size limit, but a hash of it visits all its items (a tuple does not cache
    its hash): 40,000 such steps are a 1 MB file that kept the unpickler hashing for hours. The dict filled
    key by key had counted as the empty dict the memo stored, and separate dicts, sets and calls were never
    added up."""
    assert safe_pickle.loads(hash_again_pickle(step, 5)) == []  # five times is within the bound
    with pytest.raises(UserError, match=r"would (expand to|hash) more than 50,000,000 items"):
        safe_pickle.loads(hash_again_pickle(step, 30))


def long_int_key_pickle(key_bytes: int, dicts: int = 0, shared_hash_keys: int = 0) -> bytes:
    """A memoized int of `key_bytes` bytes as the key of `dicts` new dicts, and/or a dict of `shared_hash_keys`
    ints of that length that all hash to 0 and share their top digits (so comparing two reads them all)."""
    modulus = sys.hash_info.modulus
    base = modulus << (8 * key_bytes)
    data = b"\x80\x02" + pickle.dumps(base, protocol=2)[2:-1] + b"q\x010" + b"}h\x01Ns0" * dicts
    keys = (pickle.dumps(base + k * modulus, protocol=2)[2:-1] + b"N" for k in range(1, shared_hash_keys + 1))
    return data + b"}(" + b"".join(keys) + b"u."


@pytest.mark.parametrize("shape", [dict(dicts=40_000), dict(shared_hash_keys=1_000)], ids=["hashed", "compared"])
def test_long_int_keys_count_their_length_in_the_hashing_bounds(shape):
    """An int does not keep its hash, and hashing or comparing one reads every digit, but a long int counted as
    one item: one 1 MB int as the key of 10,000 new dicts (a 1 MB file) took 5 s, 15 million of them would
    have taken hours, and 6,300 keys of 4 kB sharing one hash (25 MB) took 18 s within MAX_COMPARED. Shown
    here with 100 kB and 4 kB ints; half as many still load."""
    with pytest.raises(UserError, match="would (compare|hash) more than"):
        safe_pickle.loads(long_int_key_pickle(100_000 if "dicts" in shape else 4_000, **shape))
    half = {name: count // 2 for name, count in shape.items()}
    assert len(safe_pickle.loads(long_int_key_pickle(100_000 if "dicts" in shape else 4_000, **half))) <= 500


def test_a_list_filled_after_it_was_stored_is_measured_when_a_frozenset_hashes_it():
    """frozenset(L) hashes every item of L. L stored empty in the memo and filled through memo references
    had counted as the empty list, so 30 big keys in it were hashed unchecked."""
    def frozenset_of_list(times: int) -> bytes:
        levels = 22
        data = hash_again_pickle(lambda key: b"", 0, levels)[:-2] + b"]\x940"  # memo levels + 2: L (popped)
        data += b"".join(_get(levels + 2) + _unicode(str(i)) + _get(levels + 1) + b"\x86a0" for i in range(times))
        return data + _unicode("builtins") + _unicode("frozenset") + b"\x93" + _get(levels + 2) + b"\x85R."

    assert len(safe_pickle.loads(frozenset_of_list(5))) == 5
    with pytest.raises(UserError, match=r"would (expand to|hash) more than 50,000,000 items"):
        safe_pickle.loads(frozenset_of_list(30))


def test_coco_with_a_huge_number_or_one_id_for_two_images_is_a_clear_error(tmp_path, images):
    huge = ('{"images": [{"id": ' + "9" * 5000 + ', "file_name": "a.jpg"}], "annotations": []}').encode()
    with pytest.raises(UserError, match="cannot read the JSON"):
        parse(tmp_path, images, "c.json", huge)
    twice = {"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 1, "file_name": "b.jpg"}],
             "annotations": [{"image_id": 1, "caption": "A dog ."}]}
    with pytest.raises(UserError, match="gives id 1 to both 'a.jpg' and 'b.jpg'"):
        parse(tmp_path, images, "c.json", json.dumps(twice).encode())


def test_a_stray_quote_in_kaggle_csv_stops_before_it_swallows_rows(tmp_path, images):
    text = 'image,caption\na.jpg,"A dog runs .\nb.jpg,A cat sleeps .\nb.jpg,"A cat ."\n'
    with pytest.raises(UserError, match=r"quote at line 2 opens a caption that runs on over line 3 "
                                        r"\('b.jpg,A cat sleeps .'\)"):
        parse(tmp_path, images, "captions.txt", text.encode())


def test_a_photo_name_that_is_not_utf8_is_reported_escaped(tmp_path):
    """A Windows zip unpacked on Linux: the name's bytes are cp1252, so Python holds surrogates."""
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(b"")
    (folder / os.fsdecode(b"caf\xe9.jpg")).write_bytes(b"")
    table, report = parse(tmp_path, folder, "captions.txt", GOOD[0].encode())
    assert len(table) == 1 and report["images_without_captions"]["images"] == ["caf\\xe9.jpg"]
    json.dumps(report, ensure_ascii=False).encode("utf-8")  # what files.write_json does: no surrogates left


def test_deeply_nested_json_is_a_clear_error(tmp_path, images):
    with pytest.raises(UserError, match="nests arrays or objects too deep"):
        parse(tmp_path, images, "c.json", b'{"images": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    nested = {"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"image_id": 1, "caption": "A dog ."}],
              "extra": json.loads("[" * 500 + "]" * 500)}
    with pytest.raises(UserError, match="more than 100 levels deep"):
        parse(tmp_path, images, "c.json", json.dumps(nested).encode())


# ------------------------------------------------------------------------- any structure, generated

text = st.text(st.characters(blacklist_categories=()), max_size=12)  # lone surrogates included
leaves = (st.none() | st.booleans() | st.integers() | st.floats() | text | st.binary(max_size=12)
          | st.sampled_from([*EXISTING, "../x.jpg", *GOOD, GOOD[0].encode(), "image", "captions"]))
hashables = st.recursive(leaves, lambda inner: st.tuples(inner, inner) | st.frozensets(inner, max_size=3),
                         max_leaves=8)
structures = st.recursive(
    leaves,
    lambda inner: (st.lists(inner, max_size=5) | st.tuples(inner, inner) | st.dictionaries(hashables, inner, max_size=4)
                   | st.sets(hashables, max_size=4) | st.frozensets(hashables, max_size=3)),
    max_leaves=30,
)


# Good lines among generated items too, so that many examples parse into a table rather than an error.
mixed = st.lists(st.sampled_from(GOOD) | structures, min_size=1, max_size=8)


def test_any_pickled_structure_gives_a_table_or_a_user_error(tmp_path, images):
    """Every example ends in one of the two; and enough of them end in a table for its checks to run. Without
    the count, a parser that turned every pickle into a UserError (good lines dropped, not parsed) passed."""
    outcomes = Counter()

    @SETTINGS
    @given(obj=structures | mixed, protocol=st.sampled_from([0, 2, pickle.HIGHEST_PROTOCOL]))
    def table_or_user_error(obj, protocol):
        path = tmp_path / "c.pkl"
        path.write_bytes(pickle.dumps(obj, protocol=protocol))
        try:
            table, report = load_captions(path, images, max_skipped_fraction=1.0)
        except UserError as err:
            assert str(err).strip(), "a UserError must say what is wrong"
            outcomes["user error"] += 1
            return
        assert report["rows_kept"] == len(table) > 0
        assert report["lines_read"] == report["rows_parsed"] + report["skipped_count"]
        assert set(table["image"]) <= set(EXISTING)
        # everything must be storable: the stage writes the report as UTF-8 JSON and the table as parquet
        json.dumps(report, ensure_ascii=False).encode("utf-8")
        "".join(table["image"].tolist() + table["raw_caption"].tolist()).encode("utf-8")
        outcomes["table"] += 1

    table_or_user_error()
    # Lists holding a line of GOOD mostly end in a table (max_skipped_fraction=1.0): a third to a half of the
    # examples in runs here, so a tenth is a wide margin.
    assert outcomes["table"] >= sum(outcomes.values()) / 10, outcomes


def test_a_dataframe_without_caption_column_is_a_clear_error_whatever_its_column_names(tmp_path, images):
    """The error listed the columns with str(), which raises ValueError for an int of more than 4,300 digits: a
    traceback instead of the message. Now a bounded repr, as for skipped records."""
    frame = pd.DataFrame({"image": ["a.jpg"], "x": ["A dog ."]})
    frame.columns = pd.Index(["image", 10 ** 5000], dtype=object)
    data = pickle.dumps(frame, protocol=4)
    with pytest.raises(UserError, match=r"needs an image column .* it has \['image', <int of \d+ bits>\]"):
        parse(tmp_path, images, "c.pkl", data, allow_pandas_pickle=True)


def test_a_dataframe_caption_number_of_any_size_or_sign_is_a_skipped_record(tmp_path, images):
    """A negative caption number of more than 4,300 digits was shown with repr(), which raises ValueError for
    it: a traceback from parse_pickle instead of a skipped record."""
    numbers = [0, 1, 2, 3, -10 ** 5000, 10 ** 5000, 2.5]
    frame = pd.DataFrame({"image": ["a.jpg"] * 7, "caption_number": pd.Series(numbers, dtype=object),
                          "caption": [f"A dog {i} ." for i in range(7)]})
    table, report = parse(tmp_path, images, "c.pkl", pickle.dumps(frame, protocol=4), allow_pandas_pickle=True)
    assert list(table["caption_number"]) == [0, 1, 2, 3] and report["skipped_count"] == 3
    reasons = [skipped["reason"] for skipped in report["skipped"]]
    assert reasons[0].startswith("caption number <int of") and "is not a non-negative integer" in reasons[0]
    assert "larger than" in reasons[1] and "2.5 is not a non-negative integer" in reasons[2], reasons


def test_a_dataframe_pickle_without_its_data_is_a_clear_error(tmp_path, images):
    """A DataFrame whose pickled state lacks `_mgr` (one changed byte) loads half-built: reading its columns
    raised AttributeError, a traceback, out of the parse stage."""
    data = pickle.dumps(pd.DataFrame({"image": ["a.jpg"], "caption": ["A dog ."]}), protocol=4)
    assert data.count(b"\x04_mgr") == 1
    with pytest.raises(UserError, match=r"the pickled DataFrame is damaged \(AttributeError"):
        parse(tmp_path, images, "c.pkl", data.replace(b"\x04_mgr", b"\x04_mgX"), allow_pandas_pickle=True)
