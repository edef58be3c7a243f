"""Small features files written by hand, laid out as headstart.features.dataset writes them: the
manifest's columns and a fixed-size binary `features` column, one row group per split (train,
validation, test), each sorted by content hash. What the gate and the drift note read, without a
backbone, a cache or a training run."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from headstart.data.manifest import SPLITS
from headstart.features.dataset import FeatureSet
from headstart.features.encoding import FEATURES_PARQUET_OPTIONS, features_column


def sha(name: str) -> str:
    """A content hash standing for an image called `name`."""
    return hashlib.sha256(name.encode()).hexdigest()


def write_feature_set(
    path: Path, rows: list[tuple[str, str, int, list[float]]], class_names: list[str] | tuple[str, ...]
) -> FeatureSet:
    """A features file of `rows`, each (content hash, split, label, features)."""
    writer = None
    try:
        for split in SPLITS:
            chosen = sorted((row for row in rows if row[1] == split), key=lambda row: row[0])
            if not chosen:
                continue
            hashes, _, labels, features = zip(*chosen)
            group = pa.table(
                {
                    "path": [f"/images/{class_names[label]}/{sha256[:8]}.png" for sha256, label in zip(hashes, labels)],
                    "label": pa.array(labels, pa.int32()),
                    "class_name": [class_names[label] for label in labels],
                    "sha256": list(hashes),
                    "split": [split] * len(chosen),
                    "features": features_column(np.asarray(features, np.float32)),
                }
            )
            if writer is None:
                writer = pq.ParquetWriter(path, group.schema, **FEATURES_PARQUET_OPTIONS)
            writer.write_table(group, row_group_size=group.num_rows)
    finally:
        if writer is not None:
            writer.close()
    return FeatureSet(Path(path), extracted=0, reused=len(rows), engine="fixture")
