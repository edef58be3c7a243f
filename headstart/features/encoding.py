"""How feature vectors are stored in Arrow and Parquet: one fixed-size binary value per image.

Each value holds the image's float32s, little-endian. Parquet would store a list<float32> with a
repetition level per float, which it must decode and rebuild for every value on each read and
write. Shards written before, as lists, are still read.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

# Features are dense floats: dictionary encoding and compression gain nothing on them, and every
# read would pay for undoing them.
# Page checksums let a reader tell a damaged cache file from a good one (see FeatureCache.read_shard).
FEATURES_PARQUET_OPTIONS = {"use_dictionary": False, "compression": "none", "write_page_checksum": True}


def features_column(features: np.ndarray, dtype: str = "<f4") -> pa.Array:
    """A [n, dim] float matrix as an Arrow column of n fixed-size binary values of `dtype`."""
    features = np.ascontiguousarray(features.reshape(len(features), -1), dtype)
    width = features.shape[1] * features.itemsize
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), len(features), [None, pa.py_buffer(features)])


def features_matrix(table: pa.Table) -> np.ndarray:
    """The table's `features` column as a [n, dim] float32 matrix (zero-copy where it can be)."""
    return column_matrix(table.column("features").combine_chunks())


def column_matrix(column: pa.Array, dtype: str = "<f4") -> np.ndarray:
    if pa.types.is_fixed_size_binary(column.type):
        width, itemsize = column.type.byte_width, np.dtype(dtype).itemsize
        data = np.frombuffer(
            column.buffers()[1], dtype, count=len(column) * width // itemsize, offset=column.offset * width
        )
        return data.reshape(len(column), width // itemsize)
    # A cache shard written before features were binary: list<float32>.
    return column.values.to_numpy(zero_copy_only=False).reshape(len(column), column.type.list_size)


def as_binary_column(column: pa.Array) -> pa.Array:
    """A features column in the current layout, converted where it was written as lists."""
    return column if pa.types.is_fixed_size_binary(column.type) else features_column(column_matrix(column))
