"""The streams training reads: shuffled (features, labels) batches of one split, in bounded memory."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from headstart.errors import HeadstartError, first_line
from headstart.features.encoding import features_matrix


@contextmanager
def damage_stops_the_run(path: Path):
    """A dataset's features file found damaged while a run reads it (its pages were verified when
    the run planned its extraction, so damaged since): dropped, and the run stopped in one line,
    for the next run to assemble it again, rather than go on with wrong numbers."""
    try:
        yield
    except PermissionError:
        raise
    except (OSError, pa.ArrowException) as error:
        Path(path).unlink(missing_ok=True)
        raise HeadstartError(
            f"dataset features file {path} was damaged during the run ({first_line(error)}); "
            "it was dropped: run again to assemble it from the feature cache"
        ) from None


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
        with damage_stops_the_run(self.path):
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


@dataclass(frozen=True)
class SelectedRows:
    """The FeatureStream interface over some of a stream's rows, chosen by content hash: only those
    in `hashes` (`keep`), or every row but those (one fold of the train split, or the train split
    without the images a run leaves out). Memory holds one row group at a time, as the stream's."""

    stream: FeatureStream
    hashes: frozenset[str]
    keep: bool = False

    @cached_property
    def num_rows(self) -> int:
        with damage_stops_the_run(self.stream.path):
            parquet = pq.ParquetFile(self.stream.path)
            return sum(
                int(self._chosen(parquet.read_row_group(group, columns=["sha256"])).sum())
                for group in self.stream.groups
            )

    def _chosen(self, table: pa.Table) -> np.ndarray:
        return np.array([sha in self.hashes for sha in table.column("sha256").to_pylist()], bool) == self.keep

    def chunks(self, order: np.ndarray | None = None):
        """(features, labels) of each row group's chosen rows, in file order or in `order`."""
        with damage_stops_the_run(self.stream.path):
            parquet = pq.ParquetFile(self.stream.path, page_checksum_verification=True)
            for group in self.stream.groups if order is None else order:
                table = parquet.read_row_group(int(group), columns=["features", "label", "sha256"])
                table = table.filter(pa.array(self._chosen(table)))
                yield features_matrix(table), table.column("label").to_numpy().astype(np.int64)

    def shuffled_chunks(self, seed: int, epoch: int):
        """One epoch, shuffled as FeatureStream.shuffled_chunks shuffles its rows."""
        generator = np.random.default_rng([seed, epoch])
        for features, labels in self.chunks(generator.permutation(np.array(self.stream.groups, dtype=np.int64))):
            order = generator.permutation(len(labels))
            yield features[order], labels[order]
