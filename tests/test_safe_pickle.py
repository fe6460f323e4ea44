"""The restricted unpickler: plain data loads, DataFrames only on opt-in, code never runs."""
from __future__ import annotations

import builtins
import io
import os
import pickle
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from helpers import user_error_in_child

from captioning import pickle_scan, safe_pickle
from captioning.captions import load_captions
from captioning.errors import UserError
from captioning.tiny_project import PROJECT

PROTOCOLS = range(0, pickle.HIGHEST_PROTOCOL + 1)


# ------------------------------------------------------------------------------------------ plain data

PLAIN_VALUES = [
    "x.jpg#0\tA dog .\nx.jpg#1\tA cat .\n",
    b"x.jpg#0\tA dog .\n",
    b"",
    ["x.jpg#0\tA dog .", b"x.jpg#1\tA cat ."],
    ("x.jpg#0\tA dog .",),
    [("x.jpg", "A dog ."), ["y.jpg", b"A cat ."]],
    {"x.jpg": ["A dog .", "A cat ."], "y.jpg#0": "A bird ."},
    {"nested": [{"a": (1, 2.5, True, None)}, {1, 2}, frozenset({"z"}), bytearray(b"ab")]},
]


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("value", PLAIN_VALUES, ids=lambda v: type(v).__name__)
def test_plain_data_round_trips_in_every_protocol(value, protocol):
    assert safe_pickle.loads(pickle.dumps(value, protocol=protocol)) == value


# ------------------------------------------------------------------------------------------- attacks

class Payload:
    """An object whose unpickling calls `func(*args)`: the classic pickle attack."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


class PlainObject:
    """A custom class without __reduce__: unpickling it needs its class, which is refused."""


def attacks(marker):
    """(id, payload object, the global(s) the refusal may name). Each would create `marker`."""
    path = str(marker)
    return [
        ("os.system", Payload(os.system, f"touch {path}"), f"{os.system.__module__}.system"),
        ("subprocess.Popen", Payload(subprocess.Popen, ["touch", path]), "subprocess.Popen"),
        ("subprocess.call", Payload(subprocess.call, ["touch", path]), "subprocess.call"),
        ("exec", Payload(builtins.exec, f"open({path!r}, 'w').close()"), "builtins.exec"),
        ("eval", Payload(builtins.eval, f"open({path!r}, 'w').close()"), "builtins.eval"),
        ("__import__", Payload(builtins.__import__, "os"), "builtins.__import__"),
        ("getattr", Payload(builtins.getattr, "text", "upper"), "builtins.getattr"),
        ("open", Payload(open, path, "w"), f"{open.__module__}.open"),
        # protocols 0-1 ask for copyreg._reconstructor first, which only the pandas opt-in allows
        ("custom class", PlainObject(), ("PlainObject", "copyreg._reconstructor")),
    ]


ATTACK_IDS = [entry[0] for entry in attacks("x")]
WRAPPERS = {
    "bare": lambda payload: payload,
    "in list": lambda payload: ["x.jpg#0\tA dog .", payload],
    "in dict": lambda payload: {"x.jpg": ["A dog .", {"deeper": (payload,)}]},
}


def test_the_payloads_really_would_run_under_plain_pickle(tmp_path):
    """Control: without the restricted unpickler these payloads do create the file."""
    marker = tmp_path / "control"
    pickle.loads(pickle.dumps(Payload(builtins.exec, f"open({str(marker)!r}, 'w').close()")))
    assert marker.exists()


@pytest.mark.parametrize("allow_pandas", [False, True])
@pytest.mark.parametrize("wrapper", WRAPPERS)
@pytest.mark.parametrize("attack", ATTACK_IDS)
@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_code_in_a_pickle_never_runs(tmp_path, attack, wrapper, protocol, allow_pandas):
    marker = tmp_path / "pwned"
    _, payload, name = next(entry for entry in attacks(marker) if entry[0] == attack)
    data = pickle.dumps(WRAPPERS[wrapper](payload), protocol=protocol)
    with pytest.raises(UserError) as caught:
        safe_pickle.loads(data, allow_pandas=allow_pandas, source="evil.pkl")
    message = str(caught.value)
    assert not marker.exists()
    assert any(n in message for n in ((name,) if isinstance(name, str) else name)), message
    assert "evil.pkl" in message and "can run code" in message


@pytest.mark.parametrize("data, name", [
    (b"cos\nsystem\n(S'echo hi'\ntR.", "os.system"),
    (b"cposix\nsystem\n(S'echo hi'\ntR.", "posix.system"),
    (b"c__builtin__\neval\n(S'1+1'\ntR.", "builtins.eval"),
    (b"ccommands\ncall\n(S'ls'\ntR.", "subprocess.call"),
    (b"\x80\x04\x95\x00\x00\x00\x00\x00\x00\x00\x00\x8c\x02os\x8c\x06system\x93\x8c\x02hi\x85R.", "os.system"),
])
def test_hand_written_payloads_are_refused_by_name(data, name):
    with pytest.raises(UserError, match=name.replace(".", r"\.")):
        safe_pickle.loads(data)


def test_a_refused_module_is_not_even_imported():
    sys.modules.pop("this", None)  # `import this` prints the Zen of Python: a visible side effect
    with pytest.raises(UserError, match=r"this\.s"):
        safe_pickle.loads(b"cthis\ns\n.")
    assert "this" not in sys.modules


@pytest.mark.parametrize("data", [
    b"c_codecs\nencode\n(Vabc\nVrot13\ntR.",          # _codecs.encode with another codec
    b"c_codecs\nencode\n(I1\nVlatin1\ntR.",           # ... or on something that is not text
    b"c__builtin__\nbytes\n(I100000000000\ntR.",      # bytes(n): a memory bomb
    b"c__builtin__\nbytearray\n(I100000000000\ntR.",
])
def test_allowed_helpers_only_build_plain_bytes(data):
    with pytest.raises(UserError, match="not a readable pickle"):
        safe_pickle.loads(data)


@pytest.mark.parametrize("data", [b"", b"not a pickle at all", b"\x80\x05garbage", b"(lp0\nP1\na."])
def test_damaged_or_foreign_bytes_are_a_user_error(data):
    with pytest.raises(UserError, match="not a readable pickle"):
        safe_pickle.loads(data, source="bad.pkl")


# ----------------------------------------------------------------------------------------- DataFrames

FRAMES = {
    "str": pd.DataFrame({"image": ["a.jpg", "b.jpg"], "caption": ["A dog .", "A cat ."]}),
    "int": pd.DataFrame({"image": ["a.jpg", "b.jpg"], "caption_number": [0, 1], "caption": ["x", "y"]}),
    "object": pd.DataFrame({"image": ["a.jpg"], "caption": ["x"]}).astype(object),
    "python str": pd.DataFrame({"image": ["a.jpg"], "caption": ["x"]}).astype("string[python]"),
    "empty": pd.DataFrame({"image": [], "caption": []}),
}


class RecordingUnpickler(pickle.Unpickler):
    def __init__(self, file, seen):
        super().__init__(file)
        self.seen = seen

    def find_class(self, module, name):
        self.seen.add(safe_pickle.python3_name(module, name))
        return super().find_class(module, name)


def test_the_pandas_allow_list_covers_what_installed_pandas_writes():
    """Re-record the globals a DataFrame pickle asks for; a pandas upgrade that adds one fails here."""
    seen: set = set()
    for frame in FRAMES.values():
        for protocol in PROTOCOLS:
            RecordingUnpickler(io.BytesIO(pickle.dumps(frame, protocol=protocol)), seen).load()
    allowed = set(safe_pickle._PLAIN) | set(safe_pickle._PANDAS)
    assert seen <= allowed, sorted(seen - allowed)


def test_older_spellings_resolve_to_the_same_objects():
    resolve = safe_pickle._resolve
    pandas_names = safe_pickle._PANDAS
    assert resolve(pandas_names[("numpy.core.multiarray", "_reconstruct")]) is resolve(
        pandas_names[("numpy._core.multiarray", "_reconstruct")])
    assert resolve(pandas_names[("pandas.core.frame", "DataFrame")]) is pd.DataFrame
    assert resolve(pandas_names[("pandas.core.indexes.range", "RangeIndex")]) is pd.RangeIndex


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("name", FRAMES)
def test_a_dataframe_loads_only_with_the_opt_in(name, protocol):
    frame = FRAMES[name]
    data = pickle.dumps(frame, protocol=protocol)
    with pytest.raises(UserError) as caught:
        safe_pickle.loads(data, source="frame.pkl")
    assert "data.allow_pandas_pickle: true" in str(caught.value)
    assert "token text file" in str(caught.value)
    loaded = safe_pickle.loads(data, allow_pandas=True)
    pd.testing.assert_frame_equal(loaded, frame)


@pytest.mark.parametrize("data, name", [
    (b"cpandas\nread_pickle\n(Vx.pkl\ntR.", "pandas.read_pickle"),
    (b"cnumpy\nload\n(Vx.npy\ntR.", "numpy.load"),
    (b"cpandas.io.pickle\nread_pickle\n(Vx.pkl\ntR.", "pandas.io.pickle.read_pickle"),
])
def test_the_opt_in_allows_only_the_dataframe_classes(data, name):
    with pytest.raises(UserError) as caught:
        safe_pickle.loads(data, allow_pandas=True)
    assert name in str(caught.value)
    assert "allow_pandas_pickle: true" not in str(caught.value)  # already on: no advice to turn it on


@pytest.mark.parametrize("allow_pandas", [False, True])
def test_a_refused_name_of_any_length_gives_a_short_error(allow_pandas):
    """The refusal quoted the file's module and name whole: a 1 MB name made a 1 MB error line."""
    data = b"\x80\x04\x8c\x06pandas\x94\x8c\x08" + (200_000).to_bytes(8, "little") + b"x" * 200_000 + b"\x93."
    data = data.replace(b"\x8c\x08", b"\x8d", 1)  # BINUNICODE8: a 200,000-character name
    with pytest.raises(UserError, match=r"refused to load `pandas\.xxx.*\[200007 characters\]") as caught:
        safe_pickle.loads(data, allow_pandas=allow_pandas)
    assert len(str(caught.value)) < 1_000


# ------------------------------------------------------------------------------------------ work bounds

MODULUS = sys.hash_info.modulus  # k * MODULUS hashes to 0 for every k; -1 and -2 both hash to -2


def _number(value) -> bytes:
    return pickle.dumps(value, protocol=2)[2:-1]  # the opcode of one number, no frame


def _text(value: str) -> bytes:
    return b"X" + len(value.encode()).to_bytes(4, "little") + value.encode()


SHARED_HASH_KEYS = {
    "k * modulus": lambda k: _number(k * MODULUS),
    "-1 and -2 alike": lambda k: _number(-(k // 2 * MODULUS) - 1 - k % 2),
    "(number, text) tuple": lambda k: _number(k * MODULUS) + _text("a.jpg") + b"\x86",
}
CONTAINERS = {  # a pickle (protocol 2) whose container hashes all of `keys`
    "dict by SETITEMS": lambda keys: b"}(" + b"".join(key + b"N" for key in keys) + b"u",
    "dict by DICT": lambda keys: b"(" + b"".join(key + b"N" for key in keys) + b"d",
    "set by ADDITEMS": lambda keys: b"\x8f(" + b"".join(keys) + b"\x90",
    "frozenset opcode": lambda keys: b"(" + b"".join(keys) + b"\x91",
    "set(list) call": lambda keys: b"c__builtin__\nset\n(" + b"".join(keys) + b"l\x85R",
}


def shared_hash_pickle(container: str, key: str, n: int, distinct: bool = False) -> bytes:
    """`n` keys in one container; all share one hash unless `distinct` (then k stands for k * modulus)."""
    make = SHARED_HASH_KEYS[key]
    keys = [make(k) if not distinct else make(k).replace(_number(k * MODULUS), _number(k)) for k in range(1, n + 1)]
    return b"\x80\x02" + CONTAINERS[container](keys) + b"."


@pytest.mark.parametrize("container", CONTAINERS)
@pytest.mark.parametrize("key", SHARED_HASH_KEYS)
def test_keys_that_share_a_hash_are_refused_before_they_are_compared(container, key):
    """n keys of one hash cost n * n / 2 comparisons to put in a dict or set: 12,000 of them (about 0.2 MB)
    took 1-2 s here and 230,000 (2.6 MB) about 9 minutes. They are refused in a fraction of that."""
    data = shared_hash_pickle(container, key, 12_000)
    with pytest.raises(UserError, match="share hash values"):
        safe_pickle.loads(data, source="keys.pkl")
    if key != "-1 and -2 alike":  # the same number of keys of different hashes is plain data
        assert len(safe_pickle.loads(shared_hash_pickle(container, key, 12_000, distinct=True))) == 12_000


def test_a_few_keys_that_share_a_hash_still_load():
    assert len(safe_pickle.loads(shared_hash_pickle("dict by SETITEMS", "k * modulus", 500))) == 500


def test_the_scan_reads_text_without_decoding_it(monkeypatch):
    """Decoding every str, and reading every memo index through pickletools, made the scan before unpickling
    take ten times as long as unpickling (35 s for 2,000,000 records). Text is now stepped over by its length
    and memo indexes read in place: counted, not timed."""
    import pickletools
    calls = []
    for op in pickletools.opcodes:
        if op.arg is not None:
            monkeypatch.setattr(op.arg, "reader", lambda stream, read=op.arg.reader: calls.append(1) or read(stream))
    records = [{"image": f"{i}.jpg", "caption": f"A dog runs {i} ."} for i in range(2_000)]
    for protocol in PROTOCOLS:
        calls.clear()
        pickle_scan.check_nesting(pickle.dumps(records, protocol=protocol))
        assert len(calls) < len(records) // 10, protocol  # a few numbers and memo indexes, not one per str


def test_one_text_copied_into_bytes_over_and_over_is_refused(monkeypatch):
    """Protocols 0-2 write bytes as `_codecs.encode(text, 'latin1')` (and bytearray as `bytearray(bytes)`): calls
    that copy their argument. One 1 MB str passed to them 5,000 times through memo references is a 1 MB file
    that asked for 5 GB. Shown here with the bound lowered to 10 MB and a 100 kB text."""
    monkeypatch.setattr(safe_pickle, "MAX_BYTES_BUILT", 10_000_000, raising=False)
    encode = b"c_codecs\nencode\nh\x01h\x02\x86R"  # _codecs.encode(memo 1, memo 2)
    for call in (encode, b"c__builtin__\nbytearray\nh\x03\x85R"):  # ... or bytearray(memo 3)
        times = 150  # 15 MB in all
        data = (b"\x80\x02](" + _text("x" * 100_000) + b"q\x01" + _text("latin1") + b"q\x02" + encode
                + b"q\x03000" + call * times + b"e.")  # memo 3 = the text as bytes; nothing left on the stack
        with pytest.raises(UserError, match="copies its text into more than 10,000,000 bytes"):
            safe_pickle.loads(data, source="copies.pkl")
        assert len(safe_pickle.loads(data.replace(call * times, call * 50))) == 50  # 5 MB: within the bound


# ------------------------------------------------------------------- DataFrame pickles: bounds of their own

def test_an_array_pickle_that_asks_for_a_huge_empty_array_is_refused():
    """numpy writes an array as `_reconstruct(ndarray, (0,), ...)` and fills it by BUILD. A file asking for
    (10**9,) objects made numpy allocate 8 GB, filled with None (10**7 here: 80 MB on the old code)."""
    call = pickle.dumps((10 ** 7,), protocol=2)[2:-1] + b"U\x01O\x87R."
    data = b"\x80\x02cnumpy._core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + call
    with pytest.raises(UserError, match=r"starts from shape \(0,\), not \(10000000,\)"):
        safe_pickle.loads(data, allow_pandas=True, source="frame.pkl")
    empty = data.replace(pickle.dumps((10 ** 7,), protocol=2)[2:-1], pickle.dumps((0,), protocol=2)[2:-1])
    assert safe_pickle.loads(empty, allow_pandas=True).shape == (0,)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_a_string_column_whose_offsets_point_outside_its_data_is_refused(tmp_path, protocol):
    """pyarrow rebuilds a string column from the offsets in the file without checking them: an offset
    past the end of the data killed the process (segmentation fault) when the captions were read. In a
    child process, so that a regression fails this test instead of killing pytest."""
    frame = pd.DataFrame({"image": ["a.jpg", "b.jpg"], "caption": ["hello", "world"]})
    data = pickle.dumps(frame, protocol=protocol)
    # protocol 2 writes the offsets' bytes as latin-1 text (in UTF-8), protocols 3+ as they are
    written = (lambda raw: raw.decode("latin-1").encode()) if protocol == 2 else (lambda raw: raw)
    good, bad = (written(np.array(offsets, dtype=np.int64).tobytes()) for offsets in ([0, 5, 10], [0, 5, 1 << 40]))
    assert good in data
    path = tmp_path / "frame.pkl"
    path.write_bytes(data.replace(good, bad))
    message = user_error_in_child("from captioning import safe_pickle", "frame = safe_pickle.loads(open(sys.argv[1], "
                                  "'rb').read(), allow_pandas=True); print(frame['caption'].tolist())", str(path))
    assert "not a readable pickle" in message and "offset" in message.lower(), message


@pytest.mark.parametrize("data", [b"\x80\x02]r\x00\x00\x00\x20.", b"(lp536870912\n."], ids=["LONG_BINPUT", "PUT"])
def test_a_memo_index_past_the_file_is_refused_before_the_unpickler_allocates_it(data):
    """The unpickler keeps its memo in an array as long as the largest index: a 10-byte file storing one
    list at index 2**29 made it allocate and clear 8 GB (a fuzzed DataFrame pickle got the process
    killed for memory). In a child process limited to 2 GB, so that a regression fails here instead."""
    message = user_error_in_child("from captioning import safe_pickle", "safe_pickle.loads(bytes.fromhex(sys.argv[1]))",
                                  data.hex(), memory_gb=2)
    assert "memo index 536,870,912 at byte" in message and "is larger than the file" in message


@pytest.mark.parametrize("protocol", [0, 4])
def test_a_pickle_cannot_set_attributes_on_an_allowed_class_itself(protocol):
    """BUILD on `pandas.RangeIndex` (the class, not an instance) set `RangeIndex.attack_marker` for the whole
    process: a file could change the classes pandas itself uses."""
    cls = b"cpandas\nRangeIndex\n" if protocol == 0 else b"\x80\x04\x8c\x06pandas\x8c\nRangeIndex\x93"
    data = cls + b"(N}Vattack_marker\nI1\nstb."
    with pytest.raises(UserError, match="sets attributes on `pandas.RangeIndex` itself"):
        safe_pickle.loads(data, allow_pandas=True)
    assert not hasattr(pd.RangeIndex, "attack_marker")


def test_a_dtype_pickle_gets_its_own_dtype_never_the_one_numpy_shares():
    """`numpy.dtype("i8", False, False)` is numpy's one int64 dtype; the BUILD after it rewrote that dtype's
    state for the whole process (fuzzing one byte of a DataFrame pickle, True -> False, broke int64 arrays)."""
    data = b"\x80\x02cnumpy\ndtype\nU\x02i8\x89\x89\x87R(K\x03U\x01<NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb."
    loaded = safe_pickle.loads(data, allow_pandas=True)
    assert loaded == np.dtype("i8") and loaded is not np.dtype("i8")


def test_a_dtype_state_numpy_never_writes_is_refused(tmp_path):
    """BUILD gives the int64 dtype of a DataFrame column whatever state the file holds: flags marking it as
    holding object references made numpy fail (`get_clear_loop` not set) and then crash when the column was
    freed (found by fuzzing DataFrame pickles). In a child process, so that a regression cannot kill pytest."""
    frame = pd.DataFrame({"image": ["a.jpg", "b.jpg"], "caption": ["A dog .", "A cat ."], "caption_number": [0, 1]})
    data = pickle.dumps(frame, protocol=4)
    state = b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00t"  # int64's (..., None, None, None, -1, -1, flags 0)
    assert data.count(state) == 1
    path = tmp_path / "frame.pkl"
    path.write_bytes(data.replace(state, state.replace(b"K\x00t", b"K\x01t")))
    message = user_error_in_child("from captioning import safe_pickle", "safe_pickle.loads(open(sys.argv[1], 'rb')"
                                  ".read(), allow_pandas=True); import gc; gc.collect()", str(path))
    assert "gives a numpy dtype a state numpy never writes" in message, message


def test_only_a_plain_arrow_string_column_is_rebuilt():
    """pyarrow's `_restore_array` trusts its whole argument, and fuzzed DataFrame pickles crashed inside it
    (segmentation fault); the stand-in rebuilds only what a DataFrame's string column holds."""
    import pyarrow as pa
    column = pa.array(["A dog .", "A cat ."], type=pa.large_string())
    kind, length, null_count, offset, buffers, children, dictionary = column.__reduce__()[1][0]
    assert safe_pickle._checked_arrow_array((kind, length, null_count, offset, buffers, [], None)).equals(column)
    for odd in [(kind, length, null_count, offset, buffers[1:], [], None),          # a buffer missing
                (pa.int64(), length, null_count, offset, buffers[:2], [], None),   # not text
                (kind, -1, null_count, offset, buffers, [], None),                 # a negative length
                (kind, length, null_count, offset, buffers, [column], None)]:      # children
        with pytest.raises(pickle.UnpicklingError, match="not a plain string column"):
            safe_pickle._checked_arrow_array(odd)


# ------------------------------------------------------------------- DataFrame pickles of older pandas

OLD_PANDAS = PROJECT / "tests" / "fixtures" / "old_pandas"  # made by make_fixtures.py there, which says how


@pytest.mark.parametrize("path", sorted(OLD_PANDAS.glob("*.pkl")), ids=lambda path: path.stem)
def test_dataframe_pickles_of_older_pandas_load_to_the_same_records(tmp_path, path):
    """pandas < 3 and numpy 1.x spell their classes otherwise (`pandas.core.frame.DataFrame`, `numpy.core...`,
    and for `dtype="string"` columns `pandas.core.arrays.string_.StringArray` and `pandas._libs.missing.NA`,
    which were refused). Each file holds ROWS (object, int or string columns) at protocols 2-5."""
    from fixtures.old_pandas.make_fixtures import ROWS

    images = tmp_path / "images"
    images.mkdir()
    for image in {row[0] for row in ROWS}:
        (images / image).write_bytes(b"")
    with pytest.raises(UserError, match="data.allow_pandas_pickle: true"):
        load_captions(path, images)
    table, report = load_captions(path, images, allow_pandas_pickle=True)
    assert report["skipped_count"] == 0
    read = list(zip(table["image"], table["caption_number"], table["raw_caption"], strict=True))
    assert read == sorted(ROWS)
