"""Load a captions pickle without letting it run code.

Why: `pickle.load` imports and calls whatever global the file names (`os.system`,
`subprocess.Popen`, `builtins.exec`, any class with a custom `__reduce__`), so opening a downloaded
captions.pkl could run anything. `loads` uses a `pickle.Unpickler` whose `find_class` resolves a
global only if its exact `module.name` is on a list below; every other name raises `UserError`
naming it. The check happens before anything is imported, so a refused module is not even imported.

* Plain data (always allowed): str, bytes, int, float, bool, None, list, tuple and dict need no
  globals at all. Sets, frozensets and bytearrays need their builtin type, and protocols 0-2 write
  bytes as `_codecs.encode(text, "latin1")` (or `bytes()` when empty). Those two are wrapped, so they
  can only turn text into bytes.
* A pandas DataFrame (only with `allow_pandas=True`, i.e. `data.allow_pandas_pickle: true`): the
  exact classes and functions that the installed pandas 3.1 / numpy 2.4 / pyarrow 26 write when they
  pickle a DataFrame with str, int or object columns and the default RangeIndex, over protocols 0-5.
  They were found by recording every `find_class` request, and tests/test_safe_pickle.py records them
  again, so a pandas upgrade that needs a new name fails a test instead of failing in the pipeline.
  A few older spellings of the same objects (numpy 1.x `numpy.core...`, pandas < 3 `pandas.core...`)
  map to the very same objects, so pickles from older versions load too.

Known limit: pickle's BUILD opcode can set attributes on an allowed class (for example
`pandas.DataFrame`). It can only set them to data or to other allowed objects, so no code from the
file runs, but a hostile pandas pickle could still leave pandas in a broken state in this process.
That is why pandas pickles need an explicit opt-in and are meant for files you trust.

Python 2 pickles: their str are bytes, decoded as ASCII; a file with any other byte in one is read
again with those str left as bytes, which the captions readers decode like the lines of a text file.

Nesting: the unpickler builds any depth without recursing, but what is done with the result later
does recurse: hashing a tuple nested a million deep (as a dict key, a 1 MB file) overflows the C
stack and kills the interpreter, and repr or comparison raise RecursionError. So `loads` first reads
the opcodes (`pickletools.genops` executes nothing), keeps the depth of every object beside pickle's
own stack, and refuses a file nesting deeper than `MAX_NESTING` before building anything. Captions
need 1-4 levels; a DataFrame pickle about 20.

Expansion: a shallow pickle can still be a bomb. A tuple of two references to one tuple, 60 times over, is
a 270-byte file that nests 60 levels, but hashing it as a dict key (which unpickling does) visits 2**60
items. So the same pass also counts every object's items as if each reference were a copy, and refuses
one that would expand to more than `MAX_EXPANDED` (a captions file has 3 to 14 per caption). Hashing
the same key again and again is bounded too: the items of every dict key, set or frozenset item and call
argument are added up, and a file hashing more than `MAX_EXPANDED` in all is refused.
"""
from __future__ import annotations

import _compat_pickle
import importlib
import io
import pickle
import pickletools

from captioning.errors import UserError


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
    ("numpy", "dtype"): "numpy:dtype",
    ("numpy", "ndarray"): "numpy:ndarray",
    ("numpy._core.multiarray", "_reconstruct"): "numpy._core.multiarray:_reconstruct",
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
    ("pyarrow.lib", "_restore_array"): "pyarrow.lib:_restore_array",
    ("pyarrow.lib", "py_buffer"): "pyarrow.lib:py_buffer",
    ("pyarrow.lib", "type_for_alias"): "pyarrow.lib:type_for_alias",
    # Older spellings of the same objects (numpy 1.x, pandas < 3); they resolve to the names above.
    ("numpy.core.multiarray", "_reconstruct"): "numpy._core.multiarray:_reconstruct",
    ("numpy.core.numeric", "_frombuffer"): "numpy._core.numeric:_frombuffer",
    ("pandas.core.frame", "DataFrame"): "pandas:DataFrame",
    ("pandas.core.indexes.base", "Index"): "pandas:Index",
    ("pandas.core.indexes.range", "RangeIndex"): "pandas:RangeIndex",
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
    shown = f"`{'.'.join(key)}`"
    if asked != key:
        shown += f" (written as `{'.'.join(asked)}`)"
    message = (f"{source}: refused to load {shown} from the pickle. Pickles can run code when "
               "they are loaded, so only plain data (str, bytes, numbers, list, tuple, dict, set) is accepted")
    if _is_pandas_name(key) and not allow_pandas:
        message += (f". `{key[0]}.{key[1]}` belongs to a pandas DataFrame pickle: if you trust this file, "
                    "set `data.allow_pandas_pickle: true` in params.yaml; otherwise convert it to a "
                    "Flickr8k token text file (`name.jpg#0<TAB>caption` lines)")
    elif allow_pandas:
        message += (", plus the few classes a plain DataFrame with str/int/object columns needs. "
                    "Convert the captions to a Flickr8k token text file (`name.jpg#0<TAB>caption` lines)")
    else:
        message += (". Re-save the captions as plain data (for example a dict image -> list of captions) "
                    "or as a Flickr8k token text file (`name.jpg#0<TAB>caption` lines)")
    return UserError(message + ".")


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that hands out only allow-listed globals and refuses every other one."""

    def __init__(self, file, *, allow_pandas: bool = False, source: str = "pickle", encoding: str = "ASCII"):
        super().__init__(file, encoding=encoding)  # what Python 2 str (bytes) become: see `loads`
        self._allowed = {**_PLAIN, **(_PANDAS if allow_pandas else {})}
        self._allow_pandas = allow_pandas
        self._source = source

    def find_class(self, module, name):
        key = python3_name(module, name)
        if key not in self._allowed:
            raise _refusal(self._source, (module, name), key, self._allow_pandas)
        return _resolve(self._allowed[key])

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent ids are not allowed")


MAX_NESTING = 100
# 2,000,000 caption records (the records' own limit) need up to 28 million: protocols 0-2 write each bytes
# value as a call, _codecs.encode(text, 'latin1'), of 4-5 items, so 2,000,000 {image, caption} dicts of
# bytes count 14 items each (tests/test_captions_unusual.py measures every shape). 20 million refused them.
MAX_EXPANDED = 50_000_000
_MARK = object()                    # stands for pickle's MARK on the stack of depths
_IN_PLACE = {"APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS", "BUILD"}  # fill the object below
_SAME_OBJECT = {"MEMOIZE", "DUP", "READONLY_BUFFER", "STOP"}
_EMPTY = {"EMPTY_LIST", "EMPTY_DICT", "EMPTY_SET", "EMPTY_TUPLE"}
_PUT = {"PUT", "BINPUT", "LONG_BINPUT"}
_GET = {"GET", "BINGET", "LONG_BINGET"}
# Opcodes whose new object hashes every item it is built from: a frozenset, and calls (REDUCE and the
# like), which may be `set(...)` or `frozenset(...)` of their argument.
_HASHES_ALL = {"FROZENSET", "REDUCE", "NEWOBJ", "NEWOBJ_EX", "OBJ", "INST"}


def _pop_arguments(stack: list, before: list) -> list:
    """Pop what an opcode consumes (`before`, as pickletools lists it), top of the stack first."""
    if pickletools.markobject not in before:
        return [stack.pop() for _ in before]
    popped = []
    while stack[-1] is not _MARK:
        popped.append(stack.pop())
    stack.pop()
    return popped + [stack.pop() for _ in before[:before.index(pickletools.markobject)]]


def _genops(data: bytes):
    """`pickletools.genops`, except that a STRING argument (a Python 2 str, protocols 0-1) is not decoded:
    genops decodes it as ASCII and stopped at the first "café" the unpickler reads (see `loads`).
    Nothing here uses the value of that argument."""
    stream = io.BytesIO(data)
    while True:
        position = stream.tell()
        code = stream.read(1)
        op = pickletools.code2op.get(code.decode("latin-1"))
        if op is None:
            raise ValueError(f"opcode {code!r} unknown at byte {position}" if code else "pickle ends before STOP")
        if op.arg is None:
            arg = None
        elif op.name == "STRING":
            arg = pickletools.read_stringnl(stream, decode=False)
        else:
            arg = op.arg.reader(stream)
        yield op, arg, position
        if op.name == "STOP":
            return


def check_nesting(data: bytes, source: str = "pickle", limit: int = MAX_NESTING) -> None:
    """Raise `UserError` if the objects `data` would build nest deeper than `limit`, expand to more
    than `MAX_EXPANDED` items, or make unpickling hash more than `MAX_EXPANDED` items in all (see the
    docstring).

    Each object is tracked as a node [depth, expanded size]. A scalar has depth 0 and size 1, a
    container one more than its deepest item and one more than its items' sizes. The memo holds the
    very node of the object it stores, so a dict stored empty and then filled by SETITEM after SETITEM
    grows there too. A container that grows after it was put inside another one still counts small in
    that one (a cycle is not infinitely deep or large here), but only lists, dicts and sets can grow,
    and they cannot be hashed; the captions readers bound the records they walk.

    Hashing costs the expanded size of what is hashed (a tuple does not cache its hash), so a dict
    key, a set item, a frozenset item or the argument of a call (`frozenset(list)`) each add theirs to
    one budget: many separate SETITEMs of a key just under the size limit hashed it each time.
    """
    stack: list = []
    memo: dict = {}
    hashed = 0
    for op, arg, position in _genops(data):
        popped = _pop_arguments(stack, op.stack_before)
        if op.name in _IN_PLACE:
            node, *items = popped[::-1]
            node[0] = max([node[0], *(item[0] + 1 for item in items)])
            node[1] += sum(item[1] for item in items)
            hashed += sum(item[1] for item in _hashed_items(op.name, items))
        elif op.name in _SAME_OBJECT:
            node = popped[0]
        elif op.name in _EMPTY:
            node = [1, 1]
        elif op.name in _GET:
            node = memo[arg]
        else:  # builds a new object from what it popped (a tuple, a call's result) or from nothing
            node = [max(item[0] for item in popped) + 1 if popped else 0, 1 + sum(item[1] for item in popped)]
            if op.name in _HASHES_ALL:
                hashed += node[1] - 1
            elif op.name == "DICT":  # MARK key value key value ... DICT hashes its keys
                hashed += sum(item[1] for item in popped[::-1][0::2])
        depth, size = node
        if depth > limit:
            raise UserError(f"{source}: the pickle nests containers more than {limit} levels deep (at byte "
                            f"{position}); captions need at most 4. Re-save them as plain data, for example "
                            "a dict image -> list of captions.")
        if size > MAX_EXPANDED or hashed > MAX_EXPANDED:
            what = "one object would expand to" if size > MAX_EXPANDED else "loading it would hash"
            raise UserError(f"{source}: the pickle repeats references so that {what} more "
                            f"than {MAX_EXPANDED:,} items (at byte {position}). Re-save the captions as plain "
                            "data, for example a dict image -> list of captions.")
        if op.name == "MEMOIZE":
            memo[len(memo)] = node
        elif op.name in _PUT:
            memo[arg] = stack[-1]
        stack.extend(_MARK if item is pickletools.markobject else node for item in op.stack_after)


def _hashed_items(name: str, items: list) -> list:
    """What an in-place opcode hashes among the items it adds: a dict's keys, a set's items."""
    return items[0::2] if name in ("SETITEM", "SETITEMS") else items if name == "ADDITEMS" else []


def loads(data: bytes, *, allow_pandas: bool = False, source: str = "pickle") -> object:
    """Unpickle `data` with `RestrictedUnpickler`; any failure becomes a `UserError` naming `source`."""
    try:
        check_nesting(data, source)
        try:
            return RestrictedUnpickler(io.BytesIO(data), allow_pandas=allow_pandas, source=source).load()
        except UnicodeDecodeError:
            # A Python 2 pickle stores its str as bytes, which pickle decodes as ASCII by default, so one
            # "café" refused the whole file. Read them as bytes instead: the captions readers decode bytes
            # as they decode text files (UTF-8, else cp1252, else latin-1) and list the fallbacks. ASCII-only
            # files never get here and keep their str.
            return RestrictedUnpickler(io.BytesIO(data), allow_pandas=allow_pandas, source=source,
                                       encoding="bytes").load()
    except UserError:
        raise
    except Exception as err:  # a damaged file can fail in many ways; none of them is a bug here
        raise UserError(f"{source}: not a readable pickle ({type(err).__name__}: {err}). "
                        "Re-create it, or use a Flickr8k token text file instead.") from err
