"""The pre-scan of a pickle that `safe_pickle.loads` runs before unpickling anything: `check_nesting`.

It reads the opcodes without executing any, keeps beside pickle's own stack what each object would be, and
refuses a file that would nest, expand or hash beyond the bounds below, with a `UserError` naming the byte.

Nesting: the unpickler builds any depth without recursing, but what is done with the result later
does recurse: hashing a tuple nested a million deep (as a dict key, a 1 MB file) overflows the C
stack and kills the interpreter, and repr or comparison raise RecursionError. So `loads` first reads
the opcodes (`check_nesting` executes nothing), keeps the depth of every object beside pickle's
own stack, and refuses a file nesting deeper than `MAX_NESTING` before building anything. Captions
need 1-4 levels; a DataFrame pickle about 20. That pass steps over text by its length without
decoding it, since text is most of a captions file (it took 35 s for 2,000,000 records when it
decoded every str through `pickletools.genops`). `bench/bench_pickle.py` measures it against C `pickle.loads`:
1.6-11.5x its CPU time for 2,000,000 records (up to 10.6 s), and about as much memory as the records.

Expansion: a shallow pickle can still be a bomb. A tuple of two references to one tuple, 60 times over, is
a 270-byte file that nests 60 levels, but hashing it as a dict key (which unpickling does) visits 2**60
items. So the same pass also counts every object's items as if each reference were a copy, and refuses
one that would expand to more than `MAX_EXPANDED` (a captions file has 3 to 14 per caption). Hashing
the same key again and again is bounded too: the items of every dict key, set or frozenset item and call
argument are added up, and a file hashing more than `MAX_EXPANDED` in all is refused. A long int counts
one item per 64 bytes (`_number_size`): hashing or comparing it reads every digit, and it keeps no hash.

Shared hashes: keys of one hash are compared with one another as a dict or set is built, n of them
n * n / 2 times, and a file can choose the hash of numbers (-1 and -2 hash alike, and so does every
multiple of `sys.hash_info.modulus`). So the same pass keeps, for each object, a stand-in for its hash
and counts, per dict or set, the comparisons its keys would cost; a file costing more than
`MAX_COMPARED` is refused. Text hashes are randomized for each process, so captions' keys never count.
"""
from __future__ import annotations

import dataclasses
import gc
import io
import operator
import pickle
import pickletools

from captioning.errors import UserError

MAX_NESTING = 100
# 2,000,000 caption records (the records' own limit) need up to 28 million: protocols 0-2 write each bytes
# value as a call, _codecs.encode(text, 'latin1'), of 4-5 items, so 2,000,000 {image, caption} dicts of
# bytes count 14 items each (tests/test_captions_unusual.py measures every shape). 20 million refused them.
MAX_EXPANDED = 50_000_000
# Keys that share one hash value are compared with one another when a dict or set is built, so n of them
# cost n * n / 2 comparisons: -1 and -2 hash alike, and so do all multiples of `sys.hash_info.modulus`.
# 20,000 such keys (a 0.4 MB file) took 4 s here, 230,000 (2.6 MB) about 9 minutes. Each comparison
# counts the size of the key compared. At the bound, 6,324 int keys of one hash (19,993,326 comparisons, an
# 80 kB file) loaded in 0.23 s of CPU and 16 MB (`bench/bench_pickle.py`, `limits`). The hash of text is randomized
# for each process, so a file cannot choose collisions of text: captions' keys never count.
MAX_COMPARED = 20_000_000
# Hashing or comparing 64 bytes of an int costs about what one small key does (20-60 ns here), so a long int
# counts as one item per 64 bytes in every bound: captions hold no such numbers.
_INT_BYTES_PER_ITEM = 64
_SETS_ITEMS = {"SETITEM": 2, "SETITEMS": 2, "ADDITEMS": 1}   # in place; every 2nd / every item is hashed
_IN_PLACE = {"APPEND", "APPENDS", "BUILD", *_SETS_ITEMS}       # fill the object below
_TUPLES = {"TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "EMPTY_TUPLE"}
_EMPTY = {"EMPTY_LIST", "EMPTY_DICT", "EMPTY_SET"}
# Opcodes whose new object hashes every item it is built from: a frozenset, and calls (REDUCE and the
# like), which may be `set(...)` or `frozenset(...)` of their argument.
_CALLS = {"REDUCE", "NEWOBJ", "NEWOBJ_EX", "OBJ", "INST"}
_GLOBALS = {"GLOBAL", "STACK_GLOBAL", "EXT1", "EXT2", "EXT4"}
_NUMBERS = {"INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "FLOAT", "BINFLOAT"}
_CONSTANTS = {"NONE": None, "NEWTRUE": True, "NEWFALSE": False}
# How the scan reads the argument of the opcodes that make up most of a pickle: text, memo and MARK.
_TEXT_WIDTH = {"SHORT_BINUNICODE": 1, "SHORT_BINBYTES": 1, "SHORT_BINSTRING": 1, "BINUNICODE": 4, "BINBYTES": 4,
               "BINSTRING": 4, "BINUNICODE8": 8, "BINBYTES8": 8, "BYTEARRAY8": 8}  # bytes of the length
_TEXT_LINE = {"STRING", "UNICODE"}  # protocol 0: text up to a newline (newlines in it are escaped)
_SKIP = {"PROTO": 1, "FRAME": 8}
_MEMO_INDEX = {"BINGET": 1, "BINPUT": 1, "LONG_BINGET": 4, "LONG_BINPUT": 4}  # bytes of the index
_SMALL_TUPLES = {"TUPLE1": 1, "TUPLE2": 2, "TUPLE3": 3}
_KEY = operator.itemgetter(2)  # a node's key (see `_new_node`)


# What the scan does with each opcode: "text", "MEMOIZE", "put" and "get" are read in `_scan`'s loop itself (they
# are most of a pickle's opcodes), every other kind by its step in `_STEPS` ("other": `_apply`).
_KINDS = {**dict.fromkeys(_TEXT_WIDTH, "text"), "MEMOIZE": "MEMOIZE", **dict.fromkeys(("BINPUT", "LONG_BINPUT"), "put"),
          **dict.fromkeys(("BINGET", "LONG_BINGET"), "get"), "MARK": "MARK",
          "PUT": "decimal put", "GET": "decimal get",  # protocol 0: the index in decimal, up to a newline
          **dict.fromkeys(_TEXT_LINE, "line"), **dict.fromkeys(_SKIP, "skip"), **dict.fromkeys(_EMPTY, "empty"),
          **dict.fromkeys(_SMALL_TUPLES, "small tuple")}


def _opcode_table() -> list:
    """opcode byte -> (opcode, its kind (`_KINDS`), the bytes of its fixed-width argument: a text's length
    or a memo index, else 0) for the 256 byte values; None if unknown. Looked up once here, not for every opcode."""
    table: list = [None] * 256
    for op in pickletools.opcodes:
        table[ord(op.code)] = op, _KINDS.get(op.name, "other"), {**_TEXT_WIDTH, **_SKIP, **_MEMO_INDEX}.get(op.name, 0)
    return table


_OPCODES = _opcode_table()


def _count_keys(node: list, keys) -> int:
    """Record `keys` as added to the container `node` and return the comparisons that adding them costs:
    each key is compared with every earlier key of the same hash. Only keys whose hash the file can choose
    count (see `_new_node`)."""
    work = 0
    for key in keys:
        if key[3]:
            counts = node[5]
            if counts is None:
                counts = node[5] = {}
            seen = counts.get(key[2], 0)
            counts[key[2]] = seen + 1
            work += seen * key[1]
    node[4] += work
    return work


def _new_node(name: str, items: list, arg=None) -> list:
    """The node of an object built from `items` (in file order) or from the opcode's `arg` alone: a tuple,
    list, dict, frozenset, global or a call's result.

    A node is [depth, size, key, chosen, work, counts]: the object's nesting depth and expanded size (see
    `check_nesting`); `key`, a stand-in for its hash, equal for objects of equal hash (an int or bytes), or
    a tuple naming a class of objects that may share a hash, or None if it is unhashable; `chosen`,
    whether the file can choose that hash (numbers, or anything built from one; the hash of text is
    randomized for each process); `work`, the comparisons that hashing its items into a set would cost;
    `counts`, how often each chosen key was added so far, for a container that grows.
    """
    if name in _GLOBALS:  # a class or function itself: see `_step` on BUILD
        spelled = arg.replace(" ", ".") if isinstance(arg, str) else ".".join(
            item[2].decode("utf-8", "replace") if isinstance(item[2], bytes) else str(item[2]) for item in items)
        return [0, 1, ("global", spelled), False, 0, None]
    if not items:
        return [1 if name in _TUPLES else 0, 1, hash(() if name in _TUPLES else arg), False, 0, None]
    depths, sizes, keys, chosen, works, _ = zip(*items, strict=True)
    node = [max(depths) + 1, 1 + sum(sizes), None, any(chosen), 0, None]
    if name in _TUPLES:
        if None not in keys:  # a tuple's hash is made of its items' hashes: exact, unless an item's is a class
            node[2] = ("tuple",) if any(isinstance(key, tuple) for key in keys) else hash(keys)
        node[4] = _count_keys(node, items) + sum(works)  # what set(tuple) would cost
    elif name == "LIST":
        _count_keys(node, items)
    elif name == "FROZENSET":  # a frozenset's hash mixes its items' hashes in ways a file can aim at
        node[2] = ("frozenset",) if node[3] else hash(frozenset(keys))
    elif name in _CALLS:  # a call of the same function on equal arguments
        node[2] = ("call", keys[0]) if node[3] or None in keys else hash(keys)
    return node


def check_nesting(data: bytes, source: str = "pickle", limit: int = MAX_NESTING) -> None:
    """Raise `UserError` if the objects `data` would build nest deeper than `limit`, expand to more
    than `MAX_EXPANDED` items, make unpickling hash more than `MAX_EXPANDED` items in all, or compare
    more than `MAX_COMPARED` keys that share a hash (see the docstring).

    One pass over the opcodes (read, never executed) keeps a node (see `_new_node`) for each object
    beside pickle's own stack, and the stack positions of MARKs beside it, as the unpickler does. A
    scalar has depth 0 and size 1, a container one more than its deepest item and one more than its
    items' sizes. The memo holds the very node of the object it stores, so a dict stored empty and then
    filled by SETITEM after SETITEM grows there too. A container that grows after it was put inside
    another one still counts small in that one (a cycle is not infinitely deep or large here), but only
    lists, dicts and sets can grow, and they cannot be hashed; the captions readers bound the records
    they walk.

    Hashing costs the expanded size of what is hashed (a tuple does not cache its hash), so a dict
    key, a set item, a frozenset item or the argument of a call (`frozenset(list)`) each add theirs to
    one budget: many separate SETITEMs of a key just under the size limit hashed it each time.

    Text is by far the most of a captions pickle, so its opcodes are read here by position, without
    decoding (its raw bytes stand for its hash); the rarer opcodes are read by pickletools' readers.
    """
    collecting = gc.isenabled()
    gc.disable()  # see `_scan`
    try:
        _scan(data, source, limit)
    finally:
        if collecting:
            gc.enable()


@dataclasses.dataclass(slots=True)
class _Scan:
    """What the scan keeps as it reads: nodes beside pickle's own stack, the stack positions of its MARKs, and
    the memo: index -> node (None: nothing stored there), an array as the unpickler's own (a dict of 6 million
    int keys was a third of the scan's memory for 2,000,000 records)."""

    data: bytes
    source: str
    limit: int
    stream: io.BytesIO  # `data`, for pickletools' readers of the rarer opcodes' arguments
    stack: list = dataclasses.field(default_factory=list)
    marks: list = dataclasses.field(default_factory=list)
    memo: list = dataclasses.field(default_factory=list)
    holes: int = 0  # memo indexes that hold nothing: MEMOIZE stores at len(memo) - holes, as the unpickler does
    budgets: list = dataclasses.field(default_factory=lambda: [0, 0])  # items hashed, keys compared


def _scan(data: bytes, source: str, limit: int) -> None:
    """`check_nesting` itself. It makes millions of small lists and tuples, and the garbage collector walked
    all of them again and again (a third of the time); they hold no cycles, so it is off meanwhile.

    Text and memo references, most of a pickle's opcodes, are read here inline; every other kind of
    opcode by its step in `_STEPS`. A step for every opcode made the scan of the benchmark's captions shapes
    (`bench/bench_pickle.py`) take 1.5-1.9x as long."""
    scan = _Scan(data, source, limit, io.BytesIO(data))
    stack, memo = scan.stack, scan.memo
    position = 0
    end_of_data = len(data)
    while position < end_of_data:
        op, kind, width = _OPCODES[data[position]] or _unknown_opcode(data, position)
        at = position
        position += 1
        argument_end = position + width  # the end of a text's length or a memo index (width 0: no such argument)
        if argument_end > end_of_data:  # the file ends inside it
            break
        # Each inline kind ends in `continue`: as an if/elif chain that fell through to the loop's end, the scan of
        # 200,000 texts (protocol 2) took a third longer (0.20 s, not 0.15 s, on Python 3.11).
        if kind == "text":  # the most common opcode by far: its raw bytes stand for its node (see `_pop`)
            position = argument_end + (data[position] if width == 1 else
                                       int.from_bytes(data[position:argument_end], "little"))
            stack.append(data[argument_end:position])
            continue
        if kind == "MEMOIZE" and not scan.holes:  # the next index, as in every file pickle.dumps writes
            memo.append(stack[-1])
            continue
        if kind == "put":  # BINPUT, LONG_BINPUT
            index = data[position] if width == 1 else int.from_bytes(data[position:argument_end], "little")
            position = argument_end
            if index == len(memo) <= end_of_data:  # the next index, as in every file pickle.dumps writes
                memo.append(stack[-1])
            else:
                _store(scan, index, at)
            continue
        if kind == "get":
            index = data[position] if width == 1 else int.from_bytes(data[position:argument_end], "little")
            position = argument_end
            node = memo[index] if index < len(memo) else None
            if node is None:
                raise _nothing_stored(index, at)
            stack.append(node)
            continue
        position = _STEPS[kind](scan, op, position)
        if position is None:  # STOP
            return
    raise pickle.UnpicklingError("the pickle ends before its STOP opcode")


def _store(scan: _Scan, index: int, at: int) -> None:
    """Store the node on top of the stack at `index` of the memo (PUT, or MEMOIZE after a gap), which grows to
    hold it."""
    if index > len(scan.data):  # the unpickler's memo is an array: index 2**31 allocated 32 GB of it
        raise pickle.UnpicklingError(f"memo index {index:,} at byte {at} is larger than the file")
    node = scan.stack[-1]
    memo = scan.memo
    if index >= len(memo):
        scan.holes += index + 1 - len(memo)
        memo.extend([None] * (index + 1 - len(memo)))
    scan.holes -= memo[index] is None
    memo[index] = node


def _memoize(scan: _Scan, op, position: int) -> int:
    """MEMOIZE once the memo has holes (see `_Scan`): it stores at the count of indexes that hold a node."""
    _store(scan, len(scan.memo) - scan.holes, position - 1)
    return position


def _mark(scan: _Scan, op, position: int) -> int:
    scan.marks.append(len(scan.stack))
    return position


def _decimal_index(data: bytes, position: int) -> tuple[int, int]:
    """Protocol 0's memo index, in decimal up to a newline, and the position after it."""
    end = data.index(b"\n", position) + 1
    return int(data[position:end]), end


def _decimal_put(scan: _Scan, op, position: int) -> int:
    index, end = _decimal_index(scan.data, position)
    _store(scan, index, position - 1)
    return end


def _decimal_get(scan: _Scan, op, position: int) -> int:
    index, end = _decimal_index(scan.data, position)
    node = scan.memo[index] if index < len(scan.memo) else None
    if node is None:
        raise _nothing_stored(index, position - 1)
    scan.stack.append(node)
    return end


def _nothing_stored(index: int, at: int) -> pickle.UnpicklingError:
    return pickle.UnpicklingError(f"memo index {index:,} at byte {at} holds nothing")


def _text_line(scan: _Scan, op, position: int) -> int:
    """Protocol 0's STRING and UNICODE: text up to a newline, kept as its raw bytes as all text is."""
    end = scan.data.index(b"\n", position)
    scan.stack.append(scan.data[position:end])
    return end + 1


def _skip(scan: _Scan, op, position: int) -> int:
    """PROTO and FRAME: their argument says nothing about the objects."""
    return position + _SKIP[op.name]


def _empty(scan: _Scan, op, position: int) -> int:
    """EMPTY_LIST, EMPTY_DICT, EMPTY_SET: a container of depth 1 (the items it is filled with come later)."""
    scan.stack.append([1, 1, None, False, 0, None])
    return position


def _small_tuple(scan: _Scan, op, position: int) -> int | None:
    """TUPLE1-3. (image, caption) pairs are tuples of text: one level deep, they hash as their texts, cost
    nothing to hash and cannot pass a bound but the nesting limit 0, so they get here what `_new_node` would give
    them, without its general bookkeeping. Any other goes to `_apply` (which says what is wrong, as the
    unpickler would, if the stack holds too few items above the last MARK)."""
    stack = scan.stack
    count = _SMALL_TUPLES[op.name]
    start = len(stack) - count
    if start < (scan.marks[-1] if scan.marks else 0) or start < 0:
        return _apply(scan, op, position)
    keys = tuple(stack[start:])
    if not _only_text(keys):
        return _apply(scan, op, position)
    node = [1, 1 + count, hash(keys), False, 0, None]
    stack[start:] = [node]
    if scan.limit < 1:
        _refuse(node, scan.budgets[0], scan.limit, scan.source, position - 1)
    return position


def _apply(scan: _Scan, op, position: int) -> int | None:
    """Any other opcode: read its argument, apply it (`_step`) and check the node it builds or fills against
    the bounds. The position after it, or None after STOP."""
    at = position - 1
    arg = None
    if op.arg:  # most of these (SETITEMS, APPENDS, ...) have none: no seek and tell for them
        scan.stream.seek(position)
        arg = op.arg.reader(scan.stream)
        position = scan.stream.tell()
    node = _step(scan, op, arg)
    if node is None:
        return position
    hashed, compared = scan.budgets
    if node[0] > scan.limit or max(node[1], hashed, compared) > MAX_EXPANDED or compared > MAX_COMPARED:
        _refuse(node, hashed, scan.limit, scan.source, at)
    return None if op.name == "STOP" else position


_STEPS = {"MEMOIZE": _memoize, "MARK": _mark, "decimal put": _decimal_put, "decimal get": _decimal_get,
          "line": _text_line, "skip": _skip, "empty": _empty, "small tuple": _small_tuple, "other": _apply}


def _only_text(keys) -> bool:
    """Whether `keys` are all raw bytes, which only text nodes have as their key (C loops, not Python's)."""
    return {*map(type, keys)} <= {bytes}


def _pop(stack: list, marks: list, before: list) -> list:
    """Pop what an opcode consumes (`before`, as pickletools lists it), in the order it was pushed, as nodes.

    Text stays on the stack and in the memo as its raw bytes alone, and becomes its node, (0, 1, raw bytes,
    False, 0, None), only here: a tuple for each of the 4 million texts of 2,000,000 pairs was 350 MB."""
    if pickletools.markobject in before:
        start = marks.pop() - before.index(pickletools.markobject)  # APPENDS & co. fill the object below the MARK
    else:
        start = len(stack) - len(before)
    if start < (marks[-1] if marks else 0) or start < 0:  # as the unpickler, which then fails
        raise pickle.UnpicklingError("the pickle takes more from its stack than there is")
    popped = [(0, 1, item, False, 0, None) if type(item) is bytes else item for item in stack[start:]]
    del stack[start:]
    return popped


def _step(scan: _Scan, op, arg):
    """Apply an opcode other than text, MARK and memo references; return the node it builds or fills
    (None if there is nothing to check) and add what it hashes and compares to the scan's budgets."""
    stack, marks, budgets = scan.stack, scan.marks, scan.budgets
    name = op.name
    if name in _NUMBERS or name in _CONSTANTS:
        value = _CONSTANTS.get(name, arg)
        stack.append((0, _number_size(value), hash(value), True, 0, None))  # numbers: the file picks their hash
        return None
    if name == "POP" and marks and marks[-1] == len(stack):  # nothing above the last MARK: POP drops the MARK
        marks.pop()
        return None
    popped = _pop(stack, marks, op.stack_before)
    if name in ("POP", "POP_MARK"):
        return None
    if name in _IN_PLACE:
        node, *items = popped
        _fill(name, node, items, budgets)
    elif name in ("DUP", "READONLY_BUFFER", "STOP"):
        node = popped[0]
    else:
        node = _new_node(name, popped, arg)
        if name in _CALLS or name == "FROZENSET":
            budgets[0] += node[1] - 1
            budgets[1] += sum(item[4] for item in popped) if name in _CALLS else _count_keys(node, popped)
        elif name == "DICT":  # MARK key value key value ... DICT hashes its keys
            keys = popped[0::2]
            budgets[0] += sum(key[1] for key in keys)
            budgets[1] += _count_keys(node, keys)
    stack.extend([node] * len(op.stack_after))
    return node


def _fill(name: str, node: list, items: list, budgets: list) -> None:
    """Add `items` to the container `node` in place (APPEND(S), SETITEM(S), ADDITEMS, BUILD) and what that
    hashes and compares to `budgets`."""
    if name == "BUILD" and isinstance(node[2], tuple) and node[2][0] == "global":
        # BUILD sets attributes on the object below it; on a class itself (`pandas.RangeIndex`) they
        # would change that class for the whole process. Pickles BUILD only the objects they create.
        raise pickle.UnpicklingError(f"the pickle sets attributes on `{node[2][1]}` itself")
    if _only_text(map(_KEY, items)):
        # Text only (most fills of a captions file): each item is 0 deep and 1 item, and costs no comparison,
        # since the hash of text is randomized: the general case below gives the same, more slowly.
        node[0] = max(node[0], 1 if items else 0)
        node[1] += len(items)
        budgets[0] += len(items[::_SETS_ITEMS[name]]) if name in _SETS_ITEMS else 0  # the keys
        return
    depths, sizes, *_ = zip(*items, strict=True)
    node[0] = max(node[0], max(depths) + 1)
    node[1] += sum(sizes)
    if name in _SETS_ITEMS:
        keys = items[::_SETS_ITEMS[name]]
        budgets[0] += sum(key[1] for key in keys)
        budgets[1] += _count_keys(node, keys)
    elif name != "BUILD":  # APPEND(S) hash nothing, but `set(the list)` would hash its items
        _count_keys(node, items)


def _number_size(value) -> int:
    """The items a number counts as: one, or one per `_INT_BYTES_PER_ITEM` bytes of a long int. Hashing or
    comparing an int reads all its digits, and an int does not keep its hash: one 1 MB int as the key of
    10,000 new dicts (a 1 MB file) took 5 s of hashing while it counted as 10,000 items, so 15 million of
    them (10 MB) would have taken 2 hours within MAX_EXPANDED."""
    return 1 + value.bit_length() // (8 * _INT_BYTES_PER_ITEM) if type(value) is int else 1


def _unknown_opcode(data: bytes, position: int):
    code = data[position:position + 1]
    raise ValueError(f"opcode {code!r} unknown at byte {position}" if code else "pickle ends before STOP")


def _refuse(node, hashed: int, limit: int, source: str, position: int):
    """Raise the `UserError` for the first bound of `check_nesting` that `node` or the budgets pass."""
    if node[0] > limit:
        raise UserError(f"{source}: the pickle nests containers more than {limit} levels deep (at byte "
                        f"{position}); captions need at most 4. Re-save them as plain data, for example "
                        "a dict image -> list of captions.")
    if node[1] > MAX_EXPANDED or hashed > MAX_EXPANDED:
        what = "one object would expand to" if node[1] > MAX_EXPANDED else "loading it would hash"
        raise UserError(f"{source}: the pickle repeats references so that {what} more "
                        f"than {MAX_EXPANDED:,} items (at byte {position}). Re-save the captions as plain "
                        "data, for example a dict image -> list of captions.")
    raise UserError(f"{source}: the pickle's dict keys or set items share hash values so that building them "
                    f"would compare more than {MAX_COMPARED:,} pairs of keys (at byte {position}); numbers "
                    "such as -1 and -2 hash alike. Re-save the captions as plain data with text keys, for "
                    "example a dict image -> list of captions.")
