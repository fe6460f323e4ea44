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
_GET = {"GET", "BINGET", "LONG_BINGET"}
_PUT = {"PUT", "BINPUT", "LONG_BINPUT"}


_SMALL_TUPLES = {"TUPLE1": 1, "TUPLE2": 2, "TUPLE3": 3}
_KEY = operator.itemgetter(2)  # a node's key (see `_new_node`)


def _opcode_table() -> list:
    """opcode byte -> (opcode, what the scan does with it, the width of its argument or the items it takes)
    for the 256 byte values; None if unknown. The width is looked up once here, not for every opcode."""
    table: list = [None] * 256
    for op in pickletools.opcodes:
        name = op.name
        kind = ("text" if name in _TEXT_WIDTH else "line" if name in _TEXT_LINE else "skip" if name in _SKIP
                else "get" if name in _GET else "put" if name in _PUT
                else "empty" if name in _EMPTY else name if name in ("MARK", "MEMOIZE")
                else "small tuple" if name in _SMALL_TUPLES
                else "in place" if name in _IN_PLACE else "other")
        width = {**_TEXT_WIDTH, **_SKIP, **_MEMO_INDEX, **_SMALL_TUPLES}.get(name, 0)  # 0: a PUT/GET in decimal
        table[ord(op.code)] = op, kind, width
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


def _scan(data: bytes, source: str, limit: int) -> None:
    """`check_nesting` itself. It makes millions of small lists and tuples, and the garbage collector walked
    all of them again and again (a third of the time); they hold no cycles, so it is off meanwhile."""
    stream = io.BytesIO(data)
    stack: list = []
    marks: list = []
    # index -> node (None: nothing stored there), an array as the unpickler's own: a dict of 6 million int keys
    # was a third of the scan's memory for 2,000,000 records. MEMOIZE stores at `stored`, the count of
    # indexes that hold a node, as the unpickler does.
    memo: list = []
    stored = 0
    budgets = [0, 0]  # items hashed, keys compared
    position = 0
    end_of_data = len(data)
    while position < end_of_data:
        op, kind, width = _OPCODES[data[position]] or _unknown_opcode(data, position)
        at = position
        position += 1
        if kind == "text":  # the most common opcode by far: its raw bytes stand for its node (see `_pop`)
            start = position + width
            if start > end_of_data:  # the file ends inside the length
                break
            position = start + (data[position] if width == 1 else int.from_bytes(data[position:start], "little"))
            stack.append(data[start:position])
            continue
        if kind == "MEMOIZE":
            if stored == len(memo):  # no gaps, as every file pickle.dumps writes
                memo.append(stack[-1])
                stored += 1
            else:
                stored += _store(memo, stored, stack[-1])
            continue
        if kind == "get" or kind == "put":
            if position + width > end_of_data:  # the file ends inside the index
                break
            if width:  # BINPUT/BINGET, LONG_BINPUT/LONG_BINGET: the index in `width` bytes
                index = data[position] if width == 1 else int.from_bytes(data[position:position + width], "little")
                position += width
            else:  # protocol 0: the index in decimal, up to a newline
                start, position = position, data.index(b"\n", position) + 1
                index = int(data[start:position])
            if kind == "get":
                node = memo[index] if index < len(memo) else None
                if node is None:
                    raise pickle.UnpicklingError(f"memo index {index:,} at byte {at} holds nothing")
                stack.append(node)
            elif index > end_of_data:  # the unpickler's memo is an array: index 2**31 allocated 32 GB of it
                raise pickle.UnpicklingError(f"memo index {index:,} at byte {at} is larger than the file")
            elif index == len(memo):
                memo.append(stack[-1])
                stored += 1
            else:
                stored += _store(memo, index, stack[-1])
            continue
        if kind == "MARK":
            marks.append(len(stack))
            continue
        if kind == "small tuple" and (keys := _text_keys(stack, marks, width)) is not None:
            # (image, caption) pairs: a tuple of text is one level deep, hashes as its texts, costs nothing
            # to hash and cannot pass a bound (what `_new_node` gives it, without its general bookkeeping)
            node = [1, 1 + width, hash(keys), False, 0, None]
            stack[-width:] = [node]
            if limit < 1:
                _refuse(node, budgets[0], limit, source, at)
            continue
        if kind == "empty":
            stack.append([1, 1, None, False, 0, None])
        elif kind == "line":
            end = data.index(b"\n", position)
            stack.append(data[position:end])
            position = end + 1
        elif kind == "skip":
            position += width
        else:
            stream.seek(position)
            arg = op.arg.reader(stream) if op.arg else None
            position = stream.tell()
            node = _step(op, kind, arg, stack, marks, memo, budgets)
            if node is None:
                continue
            if node[0] > limit or node[1] > MAX_EXPANDED or max(budgets) > MAX_EXPANDED or budgets[1] > MAX_COMPARED:
                _refuse(node, budgets[0], limit, source, at)
            if op.name == "STOP":
                return
    raise pickle.UnpicklingError("the pickle ends before its STOP opcode")


def _store(memo: list, index: int, node) -> int:
    """Store `node` at `index` of the memo, which grows to hold it (the index is at most the file's length);
    return 1 if that index held nothing before, else 0."""
    if index >= len(memo):
        memo.extend([None] * (index + 1 - len(memo)))
    empty = memo[index] is None
    memo[index] = node
    return int(empty)


def _text_keys(stack: list, marks: list, count: int) -> tuple | None:
    """The keys of the top `count` items of the stack if they are all text (raw bytes, see `_pop`) above the
    last MARK, else None (and `_step` says what is wrong, as the unpickler would)."""
    start = len(stack) - count
    if start < (marks[-1] if marks else 0) or start < 0:
        return None
    keys = tuple(stack[start:])
    return keys if _only_text(keys) else None


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


def _step(op, kind: str, arg, stack: list, marks: list, memo: list, budgets: list):
    """Apply an opcode other than text, MARK and memo references; return the node it builds or fills
    (None if there is nothing to check) and add what it hashes and compares to `budgets`."""
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
    if kind == "in place":
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
