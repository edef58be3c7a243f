import contextlib
import pickle
import struct
import sys
import types
from collections import OrderedDict

import numpy as np
import pytest
from conftest import RunsACommand

from headstart.backbone.checkpoint import LEGACY_MAGIC_NUMBER, read_legacy_checkpoint
from headstart.backbone.handles import CHECKPOINT_SHA256_PREFIX, bundled_checkpoint_path
from headstart.errors import HeadstartError


class _FakeStorageType:
    """Pickles as torch.FloatStorage without torch being installed."""


_FakeStorageType.__module__, _FakeStorageType.__qualname__ = "torch", "FloatStorage"


def _rebuild_tensor_v2(*args):
    raise AssertionError("only used for pickling")


_rebuild_tensor_v2.__module__, _rebuild_tensor_v2.__qualname__ = "torch._utils", "_rebuild_tensor_v2"


class _Tensor:
    def __init__(self, key, offset, shape, stride):
        self.key, self.offset, self.shape, self.stride = key, offset, shape, stride

    def __reduce__(self):
        return (_rebuild_tensor_v2, (_StorageRef(self.key), self.offset, self.shape, self.stride, False, OrderedDict()))


class _StorageRef:
    def __init__(self, key):
        self.key = key


class _LegacyPickler(pickle.Pickler):
    def __init__(self, file, sizes):
        super().__init__(file, protocol=2)
        self.sizes = sizes

    def persistent_id(self, obj):
        if isinstance(obj, _StorageRef):
            return ("storage", _FakeStorageType, obj.key, "cpu", self.sizes[obj.key], None)
        return None


@contextlib.contextmanager
def _stand_in_torch_modules():
    """The pickler checks that globals import; stand-in modules satisfy it without torch."""
    torch, utils = types.ModuleType("torch"), types.ModuleType("torch._utils")
    torch.FloatStorage, utils._rebuild_tensor_v2 = _FakeStorageType, _rebuild_tensor_v2
    saved = {name: sys.modules.get(name) for name in ("torch", "torch._utils")}
    sys.modules.update({"torch": torch, "torch._utils": utils})
    try:
        yield
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def write_legacy_checkpoint(path, storages: dict[str, np.ndarray], tensors: dict[str, _Tensor]):
    """Writes the legacy torch.save layout: five pickles, then each storage's count and bytes."""
    sizes = {key: array.size for key, array in storages.items()}
    with open(path, "wb") as handle, _stand_in_torch_modules():
        for header in (LEGACY_MAGIC_NUMBER, 1001, {"little_endian": True}):
            pickle.dump(header, handle, protocol=2)
        _LegacyPickler(handle, sizes).dump(OrderedDict(tensors))
        pickle.dump(list(storages), handle, protocol=2)
        for array in storages.values():
            handle.write(struct.pack("<q", array.size))
            handle.write(np.ascontiguousarray(array, np.float32).tobytes())


def test_reads_tensors_views_and_strides(tmp_path):
    storage = np.arange(12, dtype=np.float32)
    path = tmp_path / "small.pth"
    write_legacy_checkpoint(
        path,
        {"0": storage},
        {
            "matrix": _Tensor("0", 0, (3, 4), (4, 1)),
            "transposed": _Tensor("0", 0, (4, 3), (1, 4)),
            "tail": _Tensor("0", 8, (4,), (1,)),
        },
    )
    state = read_legacy_checkpoint(path)
    np.testing.assert_array_equal(state["matrix"], storage.reshape(3, 4))
    np.testing.assert_array_equal(state["transposed"], storage.reshape(3, 4).T)
    np.testing.assert_array_equal(state["tail"], [8, 9, 10, 11])


def test_refuses_code_in_the_pickle(tmp_path):
    marker = tmp_path / "the-command-ran"
    evil = RunsACommand(f"touch {marker}")

    path = tmp_path / "evil.pth"
    with open(path, "wb") as handle:
        for header in (LEGACY_MAGIC_NUMBER, 1001, {}):
            pickle.dump(header, handle, protocol=2)
        pickle.dump({"weight": evil}, handle, protocol=2)
    with pytest.raises(HeadstartError, match="refusing"):
        read_legacy_checkpoint(path)
    assert not marker.exists()


def test_truncated_file_is_a_clear_error(tmp_path):
    path = tmp_path / "cut.pth"
    write_legacy_checkpoint(path, {"0": np.ones(100, np.float32)}, {"w": _Tensor("0", 0, (100,), (1,))})
    path.write_bytes(path.read_bytes()[:-50])
    with pytest.raises(HeadstartError, match="truncated|damaged"):
        read_legacy_checkpoint(path)


def test_wrong_checksum_is_refused(tmp_path):
    path = tmp_path / "other.pth"
    write_legacy_checkpoint(path, {"0": np.ones(4, np.float32)}, {"w": _Tensor("0", 0, (4,), (1,))})
    with pytest.raises(HeadstartError, match="sha256"):
        read_legacy_checkpoint(path, CHECKPOINT_SHA256_PREFIX)


def test_bundled_checkpoint_is_torchvisions_mobilenet_v2():
    state = read_legacy_checkpoint(bundled_checkpoint_path(), CHECKPOINT_SHA256_PREFIX)
    assert state["features.0.0.weight"].shape == (32, 3, 3, 3)
    assert state["classifier.1.weight"].shape == (1000, 1280)
    assert sum(v.size for k, v in state.items() if not k.endswith("num_batches_tracked")) > 3_500_000
