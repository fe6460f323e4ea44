"""Load a captions pickle without letting it run code.

Why: `pickle.load` imports and calls whatever global the file names (`os.system`,
`subprocess.Popen`, `builtins.exec`, any class with a custom `__reduce__`), so opening a downloaded
captions.pkl could run anything. `loads` uses a `pickle.Unpickler` whose `find_class` resolves a
global only if its exact `module.name` is on a list below; every other name raises `UserError`
naming it. The check happens before anything is imported, so a refused module is not even imported.

* Plain data (always allowed): str, bytes, int, float, bool, None, list, tuple and dict need no
  globals at all. Sets, frozensets and bytearrays need their builtin type, and protocols 0-2 write
  bytes as `_codecs.encode(text, "latin1")` (or `bytes()` when empty). Those two are wrapped, so they
  can only turn text into bytes, and the bytes these calls copy are counted (`MAX_BYTES_BUILT`).
* A pandas DataFrame (only with `allow_pandas=True`, i.e. `data.allow_pandas_pickle: true`): the
  exact classes and functions that the installed pandas 3.1 / numpy 2.4 / pyarrow 26 write when they
  pickle a DataFrame with str, int or object columns and the default RangeIndex, over protocols 0-5.
  They were found by recording every `find_class` request, and tests/test_safe_pickle.py records them
  again, so a pandas upgrade that needs a new name fails a test instead of failing in the pipeline.
  A few older spellings of the same objects (numpy 1.x `numpy.core...`, pandas < 3 `pandas.core...`)
  map to the very same objects, so pickles from older versions load too: tests/fixtures/old_pandas holds
  DataFrame pickles that pandas 1.5 and 2.3 (numpy 1 and 2) wrote, object, int and `dtype="string"` columns,
  protocols 2-5, and a test loads each to the records it was made from. Three are checked stand-ins:
  numpy's `_reconstruct` only starts the empty array numpy writes, `numpy.dtype` always makes a new
  dtype (whose state is checked after loading: `RestrictedUnpickler.restore_numpy_state`), and pyarrow's
  `_restore_array` rebuilds only a plain string column, validated (see each). The bounds below apply to
  DataFrame pickles too.

Known limit: pickle's BUILD opcode sets the state of the object below it. The scan refuses BUILD on
an allowed class itself (it would change `pandas.RangeIndex` for the whole process), and dtypes get
numpy's own state back, but BUILD on other instances the file creates (a DataFrame, an array) still
takes whatever state the file holds: data or other allowed objects only, so no code from the file
runs, yet a hostile pandas pickle can make objects that misbehave (a fuzzer found a DataFrame without
its data, which the captions reader reports as damaged). That is why pandas pickles
need an explicit opt-in and are meant for files you trust.

Python 2 pickles: their str are bytes, decoded as ASCII; a file with any other byte in one is read
again with those str left as bytes, which the captions readers decode like the lines of a text file.

Before any of this, `pickle_scan.check_nesting` reads the file's opcodes without running them and refuses one
that would nest too deep, expand to too many items or make dict keys collide: bounds the unpickler itself has
not (see that module).
"""
from __future__ import annotations

import _compat_pickle
import importlib
import io
import pickle
import reprlib

from captioning.errors import UserError, clipped
from captioning.pickle_scan import check_nesting


def _text_to_bytes(text, encoding):
    """Stand-in for `_codecs.encode`: protocols 0-2 store bytes as latin-1 text. Nothing else."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode is only allowed to turn text into latin-1 bytes")
    return text.encode("latin-1")


def _checked(kind):
    """Stand-in for `bytes`/`bytearray` that refuses `kind(n)`: a huge n would eat all memory."""

    def build(*args):
        if args and isinstance(args[0], int):
            raise pickle.UnpicklingError(f"{kind.__name__}(<int>) is not allowed in a pickle")
        return kind(*args)

    return build


def _empty_array(subtype, shape, dtype):
    """Stand-in for numpy's `_reconstruct`: numpy pickles every array as an empty one, `(0,)`, that BUILD
    then fills from the file's bytes. Any other shape made numpy allocate it here: `(10**9,)` objects
    in a 100-byte file are 8 GB, filled with None."""
    if shape != (0,):
        raise pickle.UnpicklingError(f"an array pickle starts from shape (0,), not {reprlib.repr(shape)}")
    return _resolve("numpy._core.multiarray:_reconstruct")(subtype, shape, dtype)


def _own_dtype(spec, align=False, copy=False):
    """Stand-in for `numpy.dtype` that always makes a new dtype: with copy=False, `numpy.dtype("i8")` is the
    one int64 dtype that all of numpy shares, and the BUILD that follows in a dtype pickle would rewrite
    its state for the whole process (numpy writes copy=True; a changed byte made it False)."""
    return _resolve("numpy:dtype")(spec, align, True)


def _checked_arrow_array(data):
    """Stand-in for pyarrow's `_restore_array((type, length, null_count, offset, buffers, children,
    dictionary))`, which trusts all of it: a string offset past the end of its data made reading the
    column read outside memory, and odd buffers crashed `_restore_array` itself (segmentation faults,
    found by fuzzing DataFrame pickles). Only the plain string column a DataFrame pickle holds is rebuilt,
    through pyarrow's public `Array.from_buffers`, and validated in full before anything reads it."""
    arrow = importlib.import_module("pyarrow")
    kind, length, null_count, offset, buffers, children, dictionary = data
    sizes = (length, null_count + 1, offset)  # null_count -1: not counted yet
    if not (isinstance(kind, arrow.DataType) and kind in (arrow.string(), arrow.large_string())
            and all(type(size) is int and size >= 0 for size in sizes) and type(buffers) is list
            and len(buffers) == kind.num_buffers and all(b is None or isinstance(b, arrow.Buffer) for b in buffers)
            and children == [] and dictionary is None):
        raise pickle.UnpicklingError("an arrow array in the pickle is not a plain string column")
    array = arrow.Array.from_buffers(kind, length, buffers, null_count, offset)
    array.validate(full=True)
    return array


# (module, name) as Python 3 spells it -> the object the unpickler may use for it.
_PLAIN = {
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "bytearray"): _checked(bytearray),
    ("builtins", "bytes"): _checked(bytes),
    ("_codecs", "encode"): _text_to_bytes,
}

# (module, name) -> "importable.module:attribute", resolved only when the pickle asks for it.
_PANDAS = {
    ("builtins", "slice"): "builtins:slice",
    ("builtins", "object"): "builtins:object",             # protocols 0-1: copyreg._reconstructor(cls, object, None)
    ("copyreg", "_reconstructor"): "copyreg:_reconstructor",
    ("numpy", "dtype"): _own_dtype,
    ("numpy", "ndarray"): "numpy:ndarray",
    ("numpy._core.multiarray", "_reconstruct"): _empty_array,
    ("numpy._core.numeric", "_frombuffer"): "numpy._core.numeric:_frombuffer",  # protocol 5 int arrays
    ("pandas", "DataFrame"): "pandas:DataFrame",
    ("pandas", "Index"): "pandas:Index",
    ("pandas", "RangeIndex"): "pandas:RangeIndex",
    ("pandas", "StringDtype"): "pandas:StringDtype",
    ("pandas", "NA"): "pandas:NA",                          # python-backed string columns
    ("pandas.arrays", "ArrowStringArray"): "pandas.arrays:ArrowStringArray",
    ("pandas.arrays", "StringArray"): "pandas.arrays:StringArray",
    ("pandas._libs.arrays", "__pyx_unpickle_NDArrayBacked"): "pandas._libs.arrays:__pyx_unpickle_NDArrayBacked",
    ("pandas._libs.internals", "_unpickle_block"): "pandas._libs.internals:_unpickle_block",
    ("pandas.core.indexes.base", "_new_Index"): "pandas.core.indexes.base:_new_Index",
    ("pandas.core.internals.managers", "BlockManager"): "pandas.core.internals.managers:BlockManager",
    ("pyarrow.lib", "_restore_array"): _checked_arrow_array,
    ("pyarrow.lib", "py_buffer"): "pyarrow.lib:py_buffer",
    ("pyarrow.lib", "type_for_alias"): "pyarrow.lib:type_for_alias",
    # Older spellings of the same objects (numpy 1.x, pandas < 3); they resolve to the names above.
    ("numpy.core.multiarray", "_reconstruct"): _empty_array,
    ("numpy.core.numeric", "_frombuffer"): "numpy._core.numeric:_frombuffer",
    ("pandas.core.frame", "DataFrame"): "pandas:DataFrame",
    ("pandas.core.indexes.base", "Index"): "pandas:Index",
    ("pandas.core.indexes.range", "RangeIndex"): "pandas:RangeIndex",
    ("pandas.core.arrays.string_", "StringArray"): "pandas.arrays:StringArray",  # pandas < 3, dtype="string"
    ("pandas.core.arrays.string_", "StringDtype"): "pandas:StringDtype",
    ("pandas._libs.missing", "NA"): "pandas:NA",
}

_PANDAS_MODULES = ("pandas", "numpy", "pyarrow")


def python3_name(module: str, name: str) -> tuple[str, str]:
    """Map a protocol 0-2 (Python 2) spelling such as `__builtin__.set` to its Python 3 name."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


def _resolve(target):
    if not isinstance(target, str):
        return target
    module, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module), attribute)


def _is_pandas_name(key: tuple[str, str]) -> bool:
    return key in _PANDAS or key[0].split(".")[0] in _PANDAS_MODULES


def _refusal(source: str, asked: tuple[str, str], key: tuple[str, str], allow_pandas: bool) -> UserError:
    # The names come from the file: a 1 MB one made a 1 MB error line, so they are clipped.
    shown = f"`{clipped('.'.join(key))}`"
    if asked != key:
        shown += f" (written as `{clipped('.'.join(asked))}`)"
    message = (f"{source}: refused to load {shown} from the pickle. Pickles can run code when "
               "they are loaded, so only plain data (str, bytes, numbers, list, tuple, dict, set) is accepted")
    if _is_pandas_name(key) and not allow_pandas:
        message += (f". `{clipped('.'.join(key))}` belongs to a pandas DataFrame pickle: if you trust this file, "
                    "set `data.allow_pandas_pickle: true` in params.yaml; otherwise convert it to a "
                    "Flickr8k token text file (`name.jpg#0<TAB>caption` lines)")
    elif allow_pandas:
        message += (", plus the few classes a plain DataFrame with str/int/object columns needs. "
                    "Convert the captions to a Flickr8k token text file (`name.jpg#0<TAB>caption` lines)")
    else:
        message += (". Re-save the captions as plain data (for example a dict image -> list of captions) "
                    "or as a Flickr8k token text file (`name.jpg#0<TAB>caption` lines)")
    return UserError(message + ".")


# The allowed names that copy what they are given into new bytes. Protocols 0-2 write every bytes value as
# such a call, and memo references let a file pass one large text to it again and again: 5,000 calls on
# one 1 MB str are a 1 MB file that asked for 5 GB. What they build is counted against MAX_BYTES_BUILT:
# 2,000,000 captions of 250 characters (the captions readers' text bound) are 500 MB, and a DataFrame
# pickle at protocols 0-2 copies its text twice (text -> bytes -> bytearray). At the bound, one 1 MB text
# copied 1,000 times loaded in 0.66 s of CPU but the process peaked at 969 MB (`bench/bench_pickle.py`,
# `limits`): this is above all a memory bound.
_COPIES = {("builtins", "bytearray"), ("builtins", "bytes"), ("_codecs", "encode")}
MAX_BYTES_BUILT = 1_000_000_000
_TAMPERED: list = []  # numpy objects whose state could not be restored: never freed (see restore_numpy_state)


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that hands out only allow-listed globals and refuses every other one."""

    def __init__(self, file, *, allow_pandas: bool = False, source: str = "pickle", encoding: str = "ASCII"):
        super().__init__(file, encoding=encoding)  # what Python 2 str (bytes) become: see `loads`
        self._allowed = {**_PLAIN, **(_PANDAS if allow_pandas else {})}
        self._allow_pandas = allow_pandas
        self._source = source
        self._bytes_built = 0
        self._numpy_made: list = []  # the dtypes and arrays numpy made for the file: see `restore_numpy_state`

    def find_class(self, module, name):
        key = python3_name(module, name)
        if key not in self._allowed:
            raise _refusal(self._source, (module, name), key, self._allow_pandas)
        found = _resolve(self._allowed[key])
        if found is _own_dtype or found is _empty_array:
            return self._kept(found)
        return self._metered(found) if key in _COPIES else found

    def _kept(self, make):
        """`make`, keeping what it makes alive (and so never freed while the file is read) until checked."""

        def kept(*args):
            made = make(*args)
            self._numpy_made.append(made)
            return made

        return kept

    def restore_numpy_state(self) -> bool:
        """Give every dtype the file made (or set on an array it made) numpy's own state back, and say whether
        one had another. BUILD may set any state on them: an int64 dtype marked as holding object references
        made numpy fail, then crash, when an array of it was freed. One that cannot be restored is kept
        alive for good (never freed, it cannot crash)."""
        dtype_class = _resolve("numpy:dtype") if self._numpy_made else None
        changed = False
        for made in self._numpy_made:
            dtype = made if isinstance(made, dtype_class) else made.dtype
            try:
                own = dtype_class(dtype.str).__reduce__()[2]
                if dtype.__reduce__()[2] != own:
                    dtype.__setstate__(own)
                    changed = True
            except Exception:
                _TAMPERED.append(made)
                changed = True
        self._numpy_made.clear()
        return changed

    def _metered(self, build):
        """`build`, counting the bytes it is asked to copy (before it copies them) against MAX_BYTES_BUILT."""

        def metered(*args):
            self._bytes_built += len(args[0]) if args and hasattr(args[0], "__len__") else 0
            if self._bytes_built > MAX_BYTES_BUILT:
                raise UserError(f"{self._source}: the pickle copies its text into more than {MAX_BYTES_BUILT:,} "
                                "bytes (it refers to the same text over and over). Check how it was made, or "
                                "re-save the captions as a Flickr8k token text file.")
            return build(*args)

        return metered

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent ids are not allowed")


def _load(data: bytes, allow_pandas: bool, source: str, encoding: str) -> object:
    """One `RestrictedUnpickler` run; numpy's state is checked before the unpickler lets go of anything."""
    unpickler = RestrictedUnpickler(io.BytesIO(data), allow_pandas=allow_pandas, source=source, encoding=encoding)
    try:
        loaded = unpickler.load()
    finally:
        tampered = unpickler.restore_numpy_state()
    if tampered:
        raise UserError(f"{source}: the pickle gives a numpy dtype a state numpy never writes. Re-create it, or "
                        "use a Flickr8k token text file instead.")
    return loaded


def loads(data: bytes, *, allow_pandas: bool = False, source: str = "pickle") -> object:
    """Unpickle `data` with `RestrictedUnpickler`; any failure becomes a `UserError` naming `source`."""
    try:
        check_nesting(data, source)
        try:
            return _load(data, allow_pandas, source, "ASCII")
        except UnicodeDecodeError:
            # A Python 2 pickle stores its str as bytes, which pickle decodes as ASCII by default, so one
            # "café" refused the whole file. Read them as bytes instead: the captions readers decode bytes
            # as they decode text files (UTF-8, else cp1252, else latin-1) and list the fallbacks. ASCII-only
            # files never get here and keep their str.
            return _load(data, allow_pandas, source, "bytes")
    except UserError:
        raise
    except Exception as err:  # a damaged file can fail in many ways; none of them is a bug here
        raise UserError(f"{source}: not a readable pickle ({type(err).__name__}: {err}). "
                        "Re-create it, or use a Flickr8k token text file instead.") from err
