"""Read a PyTorch checkpoint in the legacy (non-zip) format into NumPy arrays, without torch and
without letting the file run code.

Why not torch: it is a 700 MB+ dependency for reading one 18 MB file, and `torch.load` unpickles,
which can run anything the file names. The legacy format is five pickles and raw storage bytes:

  1. the magic number          2. the protocol version (1001)
  3. system info (endianness, C type sizes)
  4. the object (here a state dict: OrderedDict name -> tensor). A tensor is written as a call of
     `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks)`, and each
     storage as a persistent id `('storage', torch.<Type>Storage, key, location, numel, None)`
  5. the list of storage keys, in the order their data follows
  then, for each key, an 8-byte little-endian element count and the elements.

The unpickler below resolves only the exact names this format needs (OrderedDict, `_rebuild_tensor_v2`
and the storage types) to inert stand-ins that record what the file describes; every other global is
refused with `UserError` before anything is imported, as for captions pickles (safe_pickle.py).
Tensors are then cut out of the storages by their offset, shape and stride (this checkpoint stores its
convolution kernels in a transposed memory layout, so honouring strides is what makes it right).
"""
from __future__ import annotations

import collections
import io
import math
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from captioning.errors import UserError

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001
# torch.<name> -> element type, little-endian as the format stores it.
STORAGE_TYPES = {
    "FloatStorage": np.dtype("<f4"), "DoubleStorage": np.dtype("<f8"), "HalfStorage": np.dtype("<f2"),
    "LongStorage": np.dtype("<i8"), "IntStorage": np.dtype("<i4"), "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"), "ByteStorage": np.dtype("u1"), "BoolStorage": np.dtype("?"),
}


class _Inert:
    """pickle's BUILD opcode would write a file's values straight into an object's __dict__, frozen
    dataclass or not: a tensor's shape after its bounds were checked, or a storage type shared by every
    later load. The stand-ins refuse it."""

    def __setstate__(self, state):
        raise pickle.UnpicklingError("a checkpoint may not set attributes of its tensors or storage types")


@dataclass(frozen=True)
class _StorageType(_Inert):
    name: str


@dataclass(frozen=True)
class _StorageRef(_Inert):
    key: str
    dtype: np.dtype
    numel: int


@dataclass(frozen=True)
class _TensorRef(_Inert):
    storage: _StorageRef
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def _whole(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise pickle.UnpicklingError(f"{what} must be a non-negative whole number, got {value!r}")
    return value


def _ints(value, what: str) -> tuple[int, ...]:
    if not isinstance(value, tuple):
        raise pickle.UnpicklingError(f"{what} must be a tuple, got {type(value).__name__}")
    return tuple(_whole(v, what) for v in value)


def _rebuild_tensor(storage, offset, shape, stride, requires_grad=False, hooks=None, metadata=None):
    """Stand-in for torch._utils._rebuild_tensor_v2: records the view, builds nothing."""
    if not isinstance(storage, _StorageRef):
        raise pickle.UnpicklingError("a tensor must refer to a storage")
    if not isinstance(requires_grad, bool) or (hooks is not None and not isinstance(hooks, dict)) or hooks:
        raise pickle.UnpicklingError("tensor backward hooks are not allowed")
    if metadata is not None and not isinstance(metadata, dict):
        raise pickle.UnpicklingError("tensor metadata must be a dict")
    shape, stride = _ints(shape, "tensor size"), _ints(stride, "tensor stride")
    if len(shape) != len(stride):
        raise pickle.UnpicklingError(f"tensor size {shape} and stride {stride} differ in length")
    tensor = _TensorRef(storage, _whole(offset, "storage offset"), shape, stride)
    _check_bounds(tensor, storage.numel)
    return tensor


def _check_bounds(tensor: _TensorRef, numel: int) -> None:
    """Within its storage, and no more elements than the storage has: a zero or overlapping stride would
    let a few bytes of file describe gigabytes."""
    shape, stride = tensor.shape, tensor.stride
    last = tensor.offset + sum((n - 1) * s for n, s in zip(shape, stride, strict=True)) if all(shape) else -1
    if last >= numel:
        raise pickle.UnpicklingError(f"tensor of size {shape} runs past its storage of {numel} elements")
    if math.prod(shape) > numel - tensor.offset:
        raise pickle.UnpicklingError(f"tensor of size {shape} has more elements than its storage holds ({numel})")


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    **{("torch", name): _StorageType(name) for name in STORAGE_TYPES},
}


class _CheckpointUnpickler(pickle.Unpickler):
    def __init__(self, file, source: str):
        super().__init__(file)
        self.source = source
        self.storages: dict[str, _StorageRef] = {}

    def find_class(self, module, name):
        if (module, name) not in _ALLOWED:
            raise UserError(f"{self.source}: refused to load `{module}.{name}` from the checkpoint: only the "
                            "names a PyTorch tensor checkpoint needs are accepted, since a pickle can run code.")
        return _ALLOWED[(module, name)]

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r:.80}")
        _, kind, key, location, numel, view = pid
        if not isinstance(kind, _StorageType) or not isinstance(key, str) or not isinstance(location, str) \
                or view is not None:
            raise pickle.UnpicklingError(f"malformed storage reference {pid!r:.80}")
        ref = _StorageRef(key, STORAGE_TYPES[kind.name], _whole(numel, "storage size"))
        if self.storages.setdefault(key, ref) != ref:
            raise pickle.UnpicklingError(f"storage {key} is described twice with different types or sizes")
        return ref


def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """{name: array} of a legacy-format PyTorch state dict, every tensor checked against its storage."""
    path = Path(path)
    try:
        return _read(io.BytesIO(path.read_bytes()), str(path))
    except UserError:
        raise
    except FileNotFoundError:
        raise UserError(f"{path}: checkpoint file not found.") from None
    except Exception as err:  # a damaged file can fail in many ways; none of them is a bug here
        raise UserError(f"{path}: not a readable legacy PyTorch checkpoint ({type(err).__name__}: {err}).") from None


def _read(stream: io.BytesIO, source: str) -> dict[str, np.ndarray]:
    """The five pickles and the storages, in the order the format writes them (see the module docstring)."""
    _check_header(stream, source)
    unpickler = _CheckpointUnpickler(stream, source)
    state = unpickler.load()
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, _TensorRef)
                                              for k, v in state.items()):
        raise UserError(f"{source}: the checkpoint does not hold a state dict of named tensors.")
    data = _read_storages(stream, source, unpickler.storages)
    if stream.read(1):
        raise UserError(f"{source}: unexpected bytes after the last storage.")
    return {name: _view(data[t.storage.key], t) for name, t in state.items()}


def _check_header(stream: io.BytesIO, source: str) -> None:
    """The magic number, the protocol version and the system info: only what this reader understands."""
    def header():
        return _CheckpointUnpickler(stream, source).load()

    if header() != MAGIC_NUMBER:
        raise UserError(f"{source}: not a legacy PyTorch checkpoint (wrong magic number); a zip-format "
                        "checkpoint (torch >= 1.6 default) is not supported.")
    if header() != PROTOCOL_VERSION:
        raise UserError(f"{source}: unsupported checkpoint protocol version.")
    info = header()
    if not isinstance(info, dict) or info.get("little_endian") is not True:
        raise UserError(f"{source}: only little-endian checkpoints are supported.")


def _read_storages(stream: io.BytesIO, source: str, storages: dict[str, _StorageRef]) -> dict[str, np.ndarray]:
    """{key: elements} of each storage the tensors use, read in the order of the file's storage list."""
    keys = _CheckpointUnpickler(stream, source).load()
    if not isinstance(keys, list) or sorted(keys) != sorted(storages) or len(set(keys)) != len(keys):
        raise UserError(f"{source}: the checkpoint's storage list does not match the storages its tensors use.")
    return {key: _read_storage(stream, source, key, storages[key]) for key in keys}


def _read_storage(stream: io.BytesIO, source: str, key: str, ref: _StorageRef) -> np.ndarray:
    """One storage: an 8-byte element count, which must be the declared one, then the elements."""
    (count,) = struct.unpack("<q", stream.read(8))
    if count != ref.numel:
        raise UserError(f"{source}: storage {key} holds {count} elements where {ref.numel} were declared.")
    raw = stream.read(count * ref.dtype.itemsize)
    if len(raw) != count * ref.dtype.itemsize:
        raise UserError(f"{source}: the file ends inside storage {key} (truncated download?).")
    return np.frombuffer(raw, dtype=ref.dtype)


def _view(storage: np.ndarray, tensor: _TensorRef) -> np.ndarray:
    """The tensor's elements as a C-ordered array (strides are in elements in the format)."""
    _check_bounds(tensor, len(storage))  # again, against the bytes actually read
    item = storage.itemsize
    view = np.lib.stride_tricks.as_strided(storage[tensor.offset:], shape=tensor.shape,
                                           strides=tuple(s * item for s in tensor.stride), writeable=False)
    return np.array(view, dtype=storage.dtype.newbyteorder("="))
