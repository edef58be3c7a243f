"""Feature extraction: the same numbers eagerly and streamed, from every engine, and from the cache."""

import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from configs import source_of
from conftest import extract_dataset, write_class_images

from headstart.backbone.handles import resolve_backbone
from headstart.config import TrainConfig
from headstart.data.images import load_image
from headstart.data.preprocessing import decoded_batches, image_batches, resize_images
from headstart.errors import HeadstartError
from headstart.features.cache import FeatureCache
from headstart.features.dataset import plan_extraction
from headstart.features.encoding import features_matrix
from headstart.features.engines import KerasEngine, choose_engine
from headstart.features.extraction import ExtractionContext, ExtractionSettings


@pytest.fixture
def tiny(tiny_backbone_dir, tmp_path):
    return resolve_backbone(str(tiny_backbone_dir), 32, tmp_path / "cache")


def _manifest(folder, tmp_path):
    return source_of(TrainConfig(data=str(folder), cache_dir=tmp_path / "cache"))[0]


def _keras_context(cache_dir, **settings):
    return ExtractionContext(cache_dir, ExtractionSettings("keras", **settings))


@pytest.mark.parametrize(
    "sizes, batch_size",
    [
        ((48,) * 5, 2),  # shrunk, with antialiasing
        ((20, 20, 20, 32, 32), 4),  # enlarged without antialiasing, and scale 1 in the same batch (resized one by one)
    ],
)
def test_streamed_batches_equal_eager_preprocessing(tmp_path, sizes, batch_size):
    for index, size in enumerate(sizes):
        write_class_images(tmp_path / str(index), {"a": (100, 10 * index, 100)}, per_class=1, size=size, seed=index)
    paths = sorted(str(p) for p in tmp_path.glob("*/a/*.png"))
    streamed = np.concatenate([batch.images for batch in image_batches(paths, 32, batch_size=batch_size)])
    eager = np.concatenate([resize_images(load_image(p)[None].astype(np.float32) / 255.0, 32).numpy() for p in paths])
    assert streamed.shape == (5, 32, 32, 3)
    np.testing.assert_allclose(streamed, eager, atol=1e-6)


def test_decoded_batches_shrink_large_images_at_once_and_leave_small_ones(tmp_path):
    write_class_images(tmp_path, {"a": (100, 100, 100)}, per_class=2, size=48)
    write_class_images(tmp_path, {"b": (10, 200, 100)}, per_class=2, size=20)
    paths = sorted(str(p) for p in tmp_path.glob("*/*.png"))
    images = [image for batch in decoded_batches(paths, 32, batch_size=3) for image in batch.images]
    assert [image.shape for image in images] == [(32, 32, 3)] * 2 + [(20, 20, 3)] * 2
    np.testing.assert_allclose(
        images[0], resize_images(load_image(paths[0])[None].astype(np.float32) / 255.0, 32).numpy()[0], atol=1e-6
    )
    np.testing.assert_allclose(images[2], load_image(paths[2]).astype(np.float32) / 255.0)


def test_litert_engine_agrees_with_tensorflow(tiny, tmp_path):
    choice = choose_engine(tiny, "litert", tmp_path / "cache", threads=2)
    assert choice.engine.name == "litert"
    generator = np.random.default_rng(0)
    images = generator.random((5, 32, 32, 3), dtype=np.float32)
    assert np.abs(choice.engine(images) - KerasEngine(tiny)(images)).max() <= 1e-4
    assert 0 <= choice.engine.parity <= 1e-4
    # Enlarged inside the LiteRT model, shrunk with antialiasing before it, or neither; in any order.
    mixed = [
        generator.random(shape, dtype=np.float32)
        for shape in ((12, 20, 3), (32, 32, 3), (48, 40, 3), (12, 20, 3), (7, 90, 3))
    ]
    expected = np.concatenate([KerasEngine(tiny)(image[np.newaxis]) for image in mixed])
    assert np.abs(choice.engine(mixed) - expected).max() <= 1e-4


def test_litert_features_are_the_same_on_one_thread_and_on_two(tiny, tmp_path):
    engine = choose_engine(tiny, "litert", tmp_path / "cache", threads=2).engine
    generator = np.random.default_rng(1)
    images = [generator.random(shape, dtype=np.float32) for shape in [(32, 32, 3)] * 6 + [(20, 24, 3), (32, 32, 3)]]
    np.testing.assert_array_equal(engine(images, threads=2), engine(images, threads=1))


class _Progress:
    def __init__(self, stop_after: int | None = None):
        self.n, self.stop_after = 0, stop_after

    def update(self, count):
        self.n += count
        if self.stop_after is not None and self.n > self.stop_after:
            raise KeyboardInterrupt


def _shard_and_expected_features(colour_folder, tiny, tmp_path):
    """Ten images to extract, and their features from the LiteRT engine in this process."""
    cache_dir = tmp_path / "cache"
    engine = choose_engine(tiny, "litert", cache_dir, threads=2).engine  # converted now, parity recorded
    shard = plan_extraction(_manifest(colour_folder, tmp_path), tiny, cache_dir)[0][:10]
    expected = np.concatenate([engine(batch.images) for batch in decoded_batches([path for _, path in shard], 32, 4)])
    return shard, expected, cache_dir


def _cached_features(cache_dir, tiny):
    (shard_file,) = FeatureCache(cache_dir, tiny).shard_paths()
    return features_matrix(pq.read_table(shard_file))


def test_the_context_caches_a_shards_litert_features(colour_folder, tiny, tmp_path):
    shard, expected, cache_dir = _shard_and_expected_features(colour_folder, tiny, tmp_path)
    progress = _Progress()
    with ExtractionContext(cache_dir, ExtractionSettings("auto", 2, 4)) as context:
        assert context.extract_shard(shard, tiny, progress).engine == "litert"
    assert progress.n == len(shard)
    np.testing.assert_array_equal(_cached_features(cache_dir, tiny), expected)


def test_the_context_builds_its_engine_once_for_every_shard(colour_folder, tiny, tmp_path, caplog):
    with caplog.at_level(logging.INFO), _keras_context(tmp_path / "cache", batch_size=8) as context:
        extract_dataset(_manifest(colour_folder, tmp_path), tiny, context, shard_size=16)
        assert context.engine(tiny) is context.engine(tiny)
    assert caplog.text.count("feature extraction engine: keras") == 1


def test_cache_is_reused_and_only_new_images_are_extracted(colour_folder, tiny, tmp_path):
    context = _keras_context(tmp_path / "cache", batch_size=8)
    first = extract_dataset(_manifest(colour_folder, tmp_path), tiny, context, shard_size=16)
    assert (first.extracted, first.reused) == (48, 0)
    assert len(FeatureCache(tmp_path / "cache", tiny).shard_paths()) == 3
    again = extract_dataset(_manifest(colour_folder, tmp_path), tiny, context)
    assert (again.extracted, again.reused) == (0, 48)
    write_class_images(tmp_path / "more", {"red": (210, 30, 30)}, per_class=5, seed=3)
    for path in (tmp_path / "more" / "red").iterdir():
        path.rename(colour_folder / "red" / f"new-{path.name}")
    grown = extract_dataset(_manifest(colour_folder, tmp_path), tiny, context)
    assert (grown.extracted, grown.reused) == (5, 48)
    features, labels, paths = grown.load()
    assert features.shape == (53, 16) and len(labels) == 53


def test_cache_shards_written_as_float_lists_are_still_read(colour_folder, tiny, tmp_path):
    context = _keras_context(tmp_path / "cache")
    manifest = _manifest(colour_folder, tmp_path)
    current = extract_dataset(manifest, tiny, context, shard_size=16)
    expected = current.load()
    shards = FeatureCache(tmp_path / "cache", tiny).shard_paths()
    assert len(shards) == 3
    for shard in shards[:2]:  # rewritten as the earlier layout stored them, beside a current one
        table = pq.read_table(shard)
        matrix = features_matrix(table)
        as_lists = pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), matrix.shape[1])
        pq.write_table(table.set_column(table.schema.get_field_index("features"), "features", as_lists), shard)
    current.path.unlink()
    again = extract_dataset(manifest, tiny, context)
    assert (again.extracted, again.reused) == (0, 48)
    assert again.load()[2] == expected[2]
    np.testing.assert_array_equal(again.load()[0], expected[0])


@pytest.mark.parametrize("damage", ["flipped", "truncated"])
def test_a_damaged_cache_shard_is_dropped_and_its_images_extracted_again(damage, colour_folder, tiny, tmp_path, caplog):
    context = _keras_context(tmp_path / "cache", batch_size=8)
    manifest = _manifest(colour_folder, tmp_path)
    first = extract_dataset(manifest, tiny, context, shard_size=16)
    expected = first.load()
    shard = FeatureCache(tmp_path / "cache", tiny).shard_paths()[1]
    data = bytearray(shard.read_bytes())
    if damage == "flipped":  # one bit inside the features, the middle of the file
        data[len(data) // 2] ^= 0x01
    else:
        data = data[: len(data) // 2]
    shard.write_bytes(bytes(data))
    first.path.unlink()
    with caplog.at_level(logging.WARNING, logger="headstart"):
        again = extract_dataset(manifest, tiny, context, shard_size=16)
    assert (again.extracted, again.reused) == (16, 32) and "is damaged" in caplog.text
    assert again.load()[2] == expected[2]
    np.testing.assert_array_equal(again.load()[0], expected[0])


def test_cached_features_equal_a_fresh_forward_pass(colour_folder, tiny, tmp_path):
    context = ExtractionContext(tmp_path / "cache", ExtractionSettings("litert", batch_size=7))
    features, _, paths = extract_dataset(_manifest(colour_folder, tmp_path), tiny, context).load()
    images = np.concatenate([batch.images for batch in image_batches(paths, 32, batch_size=64)])
    np.testing.assert_allclose(features, KerasEngine(tiny)(images), atol=1e-4)


def test_an_interrupted_run_keeps_finished_shards(colour_folder, tiny, tmp_path):
    manifest = _manifest(colour_folder, tmp_path)
    context = _keras_context(tmp_path / "cache", batch_size=8)
    with pytest.raises(KeyboardInterrupt):  # after the first batch of the third shard
        extract_dataset(manifest, tiny, context, shard_size=16, progress=_Progress(stop_after=32))
    shards = FeatureCache(tmp_path / "cache", tiny).shard_paths()
    assert len(shards) == 2 and sum(pq.read_metadata(s).num_rows for s in shards) == 32
    resumed = extract_dataset(manifest, tiny, context, shard_size=16)
    assert (resumed.extracted, resumed.reused) == (16, 32)


def test_litert_failure_is_an_error_when_asked_for_and_a_fallback_otherwise(tiny, tmp_path, monkeypatch):
    import headstart.features.engines as engines_module

    def broken(*args, **kwargs):
        raise RuntimeError("converter exploded")

    monkeypatch.setattr(engines_module, "convert_to_litert", broken)
    assert choose_engine(tiny, "auto", tmp_path, None).engine.name == "keras"
    with pytest.raises(HeadstartError, match="converter exploded"):
        choose_engine(tiny, "litert", tmp_path, None)


def test_dataset_file_is_independent_of_the_cache_layout_and_streams_each_train_row_once(colour_folder, tiny, tmp_path):
    manifest = _manifest(colour_folder, tmp_path)
    # Eight rows per row group: several row groups per split.
    fine = extract_dataset(manifest, tiny, _keras_context(tmp_path / "fine"), shard_size=7, rows_per_group=8)
    coarse = extract_dataset(manifest, tiny, _keras_context(tmp_path / "coarse"), shard_size=48, rows_per_group=8)
    assert pq.read_metadata(fine.path).num_row_groups >= 5
    for split in ("train", "validation", "test"):
        assert fine.load(split)[2] == coarse.load(split)[2]
        np.testing.assert_allclose(fine.load(split)[0], coarse.load(split)[0], atol=1e-5)

    train_features, train_labels, _ = fine.load("train")
    stream = fine.stream("train")
    assert stream.num_rows == len(train_labels)
    epoch = list(stream.shuffled_chunks(seed=1, epoch=0))
    assert len(epoch) >= 3
    streamed = np.concatenate([features for features, _ in epoch])

    def by_rows(matrix):
        return matrix[np.lexsort(matrix.T)]

    np.testing.assert_array_equal(by_rows(streamed), by_rows(train_features))
    assert np.concatenate([labels for _, labels in epoch]).sum() == train_labels.sum()
    again = np.concatenate([features for features, _ in stream.shuffled_chunks(seed=1, epoch=0)])
    next_epoch = np.concatenate([features for features, _ in stream.shuffled_chunks(seed=1, epoch=1)])
    np.testing.assert_array_equal(streamed, again)
    assert not np.array_equal(streamed, next_epoch)


def test_a_context_sent_to_another_process_carries_its_settings_only(tiny, tmp_path):
    import pickle

    context = ExtractionContext(tmp_path, ExtractionSettings("litert", 2, 4))
    engine = context.engine(tiny)
    copy = pickle.loads(pickle.dumps(context))
    assert (copy.cache_dir, copy.settings) == (context.cache_dir, context.settings)
    assert copy.engine(tiny) is not engine and context.engine(tiny) is engine


def test_planning_clears_what_a_killed_extraction_left_and_keeps_what_is_being_written(colour_folder, tiny, tmp_path):
    import os

    manifest = _manifest(colour_folder, tmp_path)
    shards_dir, datasets_dir = FeatureCache(tmp_path / "cache", tiny).directory, tmp_path / "cache" / "datasets"
    left = [
        shards_dir / ".shard-0123.parquet.x1.tmp",
        datasets_dir / ".0123-ab-32px-v3.parquet.x2.tmp",
        datasets_dir / ".assemble-x3",
    ]
    fresh = [shards_dir / ".shard-4567.parquet.y1.tmp", datasets_dir / ".assemble-y2"]
    for path in left + fresh:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.mkdir() if "assemble" in path.name else path.write_bytes(b"half")
    for path in left:
        os.utime(path, (0, 0))
    plan_extraction(manifest, tiny, tmp_path / "cache")
    assert [path.exists() for path in left + fresh] == [False] * len(left) + [True] * len(fresh)
