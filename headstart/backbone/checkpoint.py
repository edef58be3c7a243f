"""Reads PyTorch's legacy (pre-1.6, non-zip) checkpoint format without importing torch.

A legacy `.pth` file is a sequence of pickles followed by raw tensor storages:
magic number, protocol version, system info, the state dict (whose tensors refer to storages by
persistent id), the list of storage keys, then for each key an int64 element count and the bytes.
Pickles can run arbitrary code, so the unpickler here resolves only the handful of globals a
state dict needs and refuses everything else.
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
from pathlib import Path

import numpy as np

from headstart.errors import HeadstartError
from headstart.infra.storage import file_sha256

LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C

STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class _StorageType:
    def __init__(self, name: str):
        self.dtype = np.dtype(STORAGE_DTYPES[name])


class _PendingStorage:
    """A storage whose bytes come after the pickles; filled in once they are read."""

    def __init__(self, dtype: np.dtype, size: int):
        self.dtype = dtype
        self.size = size
        self.array: np.ndarray | None = None


class _PendingTensor:
    def __init__(self, storage: _PendingStorage, offset: int, shape: tuple, stride: tuple):
        self.storage, self.offset, self.shape, self.stride = storage, offset, tuple(shape), tuple(stride)

    def materialize(self) -> np.ndarray:
        base = self.storage.array
        itemsize = base.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(
            base[self.offset :],
            shape=self.shape,
            strides=tuple(s * itemsize for s in self.stride),
        )
        return np.array(view, copy=True)


def _rebuild_tensor(storage, storage_offset, size, stride, *_unused):
    return _PendingTensor(storage, storage_offset, size, stride)


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, stream, storages: dict[str, _PendingStorage]):
        super().__init__(stream)
        self.storages = storages

    def find_class(self, module: str, name: str):
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _rebuild_tensor
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name)
        raise HeadstartError(
            f"checkpoint refers to {module}.{name}, which a weights file never needs; refusing to load it"
        )

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise HeadstartError(f"checkpoint has an unknown persistent id {pid!r}")
        _, storage_type, key, _location, size, *_view = pid
        if key not in self.storages:
            self.storages[key] = _PendingStorage(storage_type.dtype, size)
        return self.storages[key]


def read_legacy_checkpoint(path: Path, expected_sha256_prefix: str | None = None) -> dict[str, np.ndarray]:
    """Returns the state dict of a legacy PyTorch checkpoint as name → numpy array."""
    path = Path(path)
    if not path.is_file():
        raise HeadstartError(f"checkpoint not found: {path}")
    if expected_sha256_prefix is not None:
        actual = file_sha256(path)
        if not actual.startswith(expected_sha256_prefix):
            raise HeadstartError(
                f"checkpoint {path} has sha256 {actual[:16]}…, expected one starting with {expected_sha256_prefix}"
            )
    data = path.read_bytes()
    stream = io.BytesIO(data)
    storages: dict[str, _PendingStorage] = {}
    try:
        magic = _RestrictedUnpickler(stream, storages).load()
        if magic != LEGACY_MAGIC_NUMBER:
            raise HeadstartError(f"{path} is not a legacy PyTorch checkpoint")
        _RestrictedUnpickler(stream, storages).load()  # protocol version
        _RestrictedUnpickler(stream, storages).load()  # system info: endianness, type sizes
        state = _RestrictedUnpickler(stream, storages).load()
        keys = _RestrictedUnpickler(stream, storages).load()
        for key in keys:
            (count,) = struct.unpack("<q", stream.read(8))
            storage = storages[key]
            nbytes = count * storage.dtype.itemsize
            raw = stream.read(nbytes)
            if len(raw) != nbytes:
                raise HeadstartError(f"checkpoint {path} is truncated")
            storage.array = np.frombuffer(raw, dtype=storage.dtype)
    except (pickle.UnpicklingError, EOFError, struct.error, KeyError) as error:
        raise HeadstartError(f"checkpoint {path} is damaged: {error}") from None
    if not isinstance(state, dict):
        raise HeadstartError(f"checkpoint {path} does not hold a state dict")
    return {name: tensor.materialize() for name, tensor in state.items() if isinstance(tensor, _PendingTensor)}
