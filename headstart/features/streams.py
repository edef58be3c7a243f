"""The streams training reads: shuffled (features, labels) batches of one split, in bounded memory."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from headstart.features.encoding import features_matrix


@dataclass(frozen=True)
class FeatureStream:
    """Shuffled (features, labels) batches of some row groups; memory holds one row group at a time.

    Each row group is a uniform random sample of its split (rows are grouped by content hash),
    so shuffling the order of the groups and the rows inside each one shuffles the split.
    """

    path: Path
    groups: tuple[int, ...]
    num_rows: int
    features_bytes: int  # the features' size in memory, uncompressed

    def chunks(self, order: np.ndarray | None = None):
        """(features, labels) of each row group, in file order or in `order`."""
        parquet = pq.ParquetFile(self.path, page_checksum_verification=True)
        for group in self.groups if order is None else order:
            table = parquet.read_row_group(int(group), columns=["features", "label"])
            yield features_matrix(table), table.column("label").to_numpy().astype(np.int64)

    def shuffled_chunks(self, seed: int, epoch: int):
        """One epoch: the row groups in a seeded random order, each with its rows permuted."""
        generator = np.random.default_rng([seed, epoch])
        for features, labels in self.chunks(generator.permutation(np.array(self.groups, dtype=np.int64))):
            order = generator.permutation(len(labels))
            yield features[order], labels[order]


@dataclass(frozen=True)
class InMemoryFeatures:
    """The FeatureStream interface over arrays already in memory."""

    features: np.ndarray
    labels: np.ndarray

    @property
    def num_rows(self) -> int:
        return len(self.labels)

    def chunks(self):
        yield self.features, self.labels.astype(np.int64)

    def shuffled_chunks(self, seed: int, epoch: int):
        order = np.random.default_rng([seed, epoch]).permutation(len(self.labels))
        yield self.features[order], self.labels[order].astype(np.int64)
