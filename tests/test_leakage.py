"""The near-duplicate check: nearest training images by feature cosine, the flagged pairs, the test
accuracy with and without them, and a re-encoded copy of a training image found by a whole run."""

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from headstart.evaluation import near_duplicates as leakage
from headstart.evaluation.near_duplicates import (
    accuracy_with_and_without,
    find_near_duplicates,
    near_duplicate_report,
    nearest_neighbours,
)
from headstart.features.dataset import FeatureSet
from headstart.features.encoding import features_column


def _planted(dimensions: int = 48, references: int = 300, seed: int = 0):
    """Reference rows, and queries of which three are planted: an exact copy of reference 17, a
    scaled copy of 250 and a slightly noisy copy of 123; the rest independent random rows."""
    generator = np.random.default_rng(seed)
    reference = generator.normal(size=(references, dimensions)).astype(np.float32)
    queries = generator.normal(size=(40, dimensions)).astype(np.float32)
    queries[5] = reference[17]
    queries[11] = 3.5 * reference[250]
    queries[30] = reference[123] + 0.05 * generator.normal(size=dimensions)
    return reference, queries


@pytest.mark.parametrize("block_rows", [7, 64, 1000])
def test_each_query_gets_its_most_similar_reference_whatever_the_blocks(block_rows, monkeypatch):
    monkeypatch.setattr(leakage, "QUERY_BLOCK", 16)  # three query blocks, the last one short
    reference, queries = _planted()
    indices, similarities = nearest_neighbours(queries, reference, block_rows)
    brute = (queries / np.linalg.norm(queries, axis=1, keepdims=True)) @ (
        reference / np.linalg.norm(reference, axis=1, keepdims=True)
    ).T
    np.testing.assert_array_equal(indices, brute.argmax(axis=1))
    np.testing.assert_allclose(similarities, brute.max(axis=1), atol=1e-5)
    assert (indices[5], indices[11], indices[30]) == (17, 250, 123)
    assert similarities[5] == pytest.approx(1.0, abs=1e-5) and similarities[11] == pytest.approx(1.0, abs=1e-5)
    assert 0.99 < similarities[30] < 0.9999
    others = np.delete(similarities, [5, 11, 30])
    assert others.max() < 0.6  # independent 48-d rows are far from any of 300 references


def _features_file(path: Path, splits: dict[str, tuple[np.ndarray, list[int]]], rows_per_group: int) -> FeatureSet:
    """A dataset features file in the layout assemble_features writes: row groups of one split each."""
    writer = None
    for split, (features, labels) in splits.items():
        table = pa.table(
            {
                "path": [f"/data/{split}/{index}.png" for index in range(len(labels))],
                "label": pa.array(labels, pa.int32()),
                "sha256": [hashlib.sha256(f"{split}{index}".encode()).hexdigest() for index in range(len(labels))],
                "split": [split] * len(labels),
                "features": features_column(features),
            }
        )
        writer = writer or pq.ParquetWriter(path, table.schema)
        writer.write_table(table, row_group_size=rows_per_group)
    writer.close()
    return FeatureSet(path, 0, 0, "test")


def test_pairs_above_the_threshold_are_flagged_with_paths_classes_and_similarity(tmp_path):
    reference, queries = _planted()
    train_labels = [index % 2 for index in range(len(reference))]
    test_labels = [0] * len(queries)
    validation = np.stack([reference[42], reference[7] + 0.6 * np.random.default_rng(1).normal(size=48)]).astype(
        np.float32
    )
    features = _features_file(
        tmp_path / "features.parquet",
        {"train": (reference, train_labels), "validation": (validation, [0, 1]), "test": (queries, test_labels)},
        rows_per_group=64,
    )
    assert len(features.row_groups("train")) == 5  # the nearest image is searched across row groups

    check = find_near_duplicates(features, ["cat", "dog"], threshold=0.95)
    test = check.splits["test"]
    assert check.train_images == 300 and test.images == 40
    # Most similar first; the noisy copy last. Reference 17 is a dog (odd), 250 and 123 a cat and a dog.
    pairs = {(pair.path, pair.train_path, pair.label, pair.train_label) for pair in test.pairs}
    assert pairs == {
        ("/data/test/5.png", "/data/train/17.png", "cat", "dog"),
        ("/data/test/11.png", "/data/train/250.png", "cat", "cat"),
        ("/data/test/30.png", "/data/train/123.png", "cat", "dog"),
    }
    assert (
        test.pairs[-1].path == "/data/test/30.png"
        and test.pairs[0].similarity >= test.pairs[1].similarity > test.pairs[2].similarity > 0.99
    )
    np.testing.assert_array_equal(np.flatnonzero(check.flagged("test")), [5, 11, 30])
    # Validation: an exact copy of 42 is flagged, a heavily noised 7 is not.
    assert [pair.train_path for pair in check.splits["validation"].pairs] == ["/data/train/42.png"]
    assert check.splits["validation"].similarities[1] < 0.95

    record = check.to_dict()
    assert (
        record["threshold"] == 0.95
        and record["splits"]["test"]["flagged"] == 3
        and record["splits"]["validation"]["flagged"] == 1
    )
    assert json.loads(json.dumps(record)) == record  # what the data report stores
    # Just below the noisy copy's similarity: only the two exact copies are left.
    stricter = find_near_duplicates(features, ["cat", "dog"], threshold=float(test.pairs[2].similarity) + 1e-4)
    assert {pair.path for pair in stricter.splits["test"].pairs} == {"/data/test/5.png", "/data/test/11.png"}


def test_an_empty_validation_split_is_checked_as_zero_images(tmp_path):
    reference, queries = _planted()
    features = _features_file(
        tmp_path / "features.parquet",
        {"train": (reference, [0] * 300), "test": (queries, [0] * 40)},
        rows_per_group=128,
    )
    check = find_near_duplicates(features, ["cat", "dog"], threshold=0.95)
    assert check.splits["validation"].images == 0 and check.splits["validation"].pairs == ()
    assert check.splits["test"].images == 40 and len(check.splits["test"].pairs) == 3


def test_accuracy_with_and_without_the_flagged_images():
    labels = np.array([0, 1, 1, 0, 1])
    probabilities = np.array(
        [[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.7, 0.3], [0.8, 0.2]]
    )  # right, right, wrong, right, wrong
    flagged = np.array([False, False, True, False, True])
    assert accuracy_with_and_without(labels, probabilities, flagged) == {
        "accuracy": 0.6,
        "n": 5,
        "accuracy_without_flagged": 1.0,
        "n_without_flagged": 3,
    }
    assert accuracy_with_and_without(labels, probabilities, ~flagged) == {
        "accuracy": 0.6,
        "n": 5,
        "accuracy_without_flagged": 0.0,
        "n_without_flagged": 2,
    }
    assert accuracy_with_and_without(labels, probabilities, np.ones(5, bool))["accuracy_without_flagged"] is None


def test_the_report_gives_the_test_accuracy_without_the_flagged_images(tmp_path):
    reference, queries = _planted()
    features = _features_file(
        tmp_path / "features.parquet",
        {"train": (reference, [0] * 300), "test": (queries, [1] * 40)},
        rows_per_group=128,
    )
    check = find_near_duplicates(features, ["cat", "dog"], threshold=0.95)
    # Right on every image but the three planted copies: 37 of 40 with them, all 37 without.
    probabilities = np.tile([0.1, 0.9], (40, 1))
    probabilities[[5, 11, 30]] = [0.9, 0.1]
    test = near_duplicate_report(check, features, probabilities)["splits"]["test"]
    assert (
        test["flagged"],
        test["accuracy"],
        test["n"],
        test["accuracy_without_flagged"],
        test["n_without_flagged"],
    ) == (3, 37 / 40, 40, 1.0, 37)


# --- a whole run ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def pixel_backbone_dir(tmp_path_factory) -> Path:
    """A stand-in backbone whose features are the image's 4×4-pixel block means (8 × 8 × 3 = 192):
    unlike the tiny convolutional one, it tells two different images apart, and a re-encoded or
    shifted copy from its original only a little, as MobileNetV2 does at its own scale."""
    from headstart.backbone.hub_module import export_hub_module
    from headstart.infra.keras import keras

    inputs = keras.Input((32, 32, 3))
    network = keras.Model(inputs, keras.layers.Flatten()(keras.layers.AveragePooling2D(4)(inputs)))
    return export_hub_module(network, 32, tmp_path_factory.mktemp("backbones") / "pixel-blocks")


def _block_images(root: Path, class_colours: dict[str, tuple[int, int, int]], per_class: int, seed: int = 0) -> Path:
    """Images of 8 × 8 blocks of random colours around their class's colour."""
    generator = np.random.default_rng(seed)
    for name, colour in class_colours.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            blocks = np.clip(np.array(colour)[None, None, :] + generator.integers(-100, 100, (8, 8, 3)), 0, 255).astype(
                np.uint8
            )
            Image.fromarray(blocks).resize((32, 32), Image.Resampling.NEAREST).save(root / name / f"{index:03d}.png")
    return root


def _shifted_jpeg(image: Image.Image, quality: int) -> bytes:
    """The image moved one pixel right and down (the edge repeated) and saved as a JPEG."""
    pixels = np.asarray(image.convert("RGB"))
    shifted = np.pad(pixels, ((1, 0), (1, 0), (0, 0)), mode="edge")[: pixels.shape[0], : pixels.shape[1]]
    buffer = io.BytesIO()
    Image.fromarray(shifted).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def test_a_shifted_reencoded_copy_of_a_training_image_in_the_test_split_is_flagged_by_the_run(
    prefect_harness, pixel_backbone_dir, tmp_path
):
    from prefect.artifacts import Artifact

    from flows.train import train
    from headstart.config import TrainConfig
    from headstart.data.images import load_image
    from headstart.data.manifest import assign_split
    from headstart.registry.runs import Run
    from headstart.reporting.plots import NEAR_DUPLICATES_PLOT, PLOT_FILES

    config = TrainConfig.smoke(
        data=str(tmp_path / "data"),
        backbone=str(pixel_backbone_dir),
        artifacts_root=tmp_path / "artifacts",
        cache_dir=tmp_path / "cache",
        epochs=40,
        learning_rate=0.1,
        batch_size=8,
        patience=40,
        test_fraction=0.25,
        near_duplicate_threshold=0.9,
        gate=False,
    )
    folder = _block_images(tmp_path / "data", {"red": (200, 60, 60), "blue": (60, 60, 200)}, per_class=16)

    def split_of(data: bytes) -> str:
        fractions = config.data.validation_fraction, config.data.test_fraction
        return assign_split(hashlib.sha256(data).hexdigest(), *fractions)

    # The first red training image, and the first JPEG quality at which its shifted copy's hash
    # puts the copy in the test split (splits go by content hash).
    original = next(path for path in sorted((folder / "red").iterdir()) if split_of(path.read_bytes()) == "train")
    copy = next(
        data
        for quality in range(95, 60, -1)
        if split_of(data := _shifted_jpeg(Image.open(original), quality)) == "test"
    )
    (folder / "red" / "copy.jpg").write_bytes(copy)
    (folder / "red" / "byte-copy.png").write_bytes(original.read_bytes())  # an exact copy: skipped before any check

    run = Run(train(**config.flat()))
    data_report = run.data_report
    (skipped,) = data_report["skipped"]
    assert skipped["reason"].startswith("duplicate of ")
    assert {skipped["path"], skipped["reason"].removeprefix("duplicate of ")} == {
        str(original),
        str(folder / "red" / "byte-copy.png"),
    }
    near = data_report["near_duplicates"]
    test = near["splits"]["test"]
    assert near["threshold"] == 0.9 and test["flagged"] == 1 and near["splits"]["validation"]["flagged"] == 0
    (pair,) = test["pairs"]
    assert (Path(pair["path"]), Path(pair["train_path"]), pair["label"], pair["train_label"]) == (
        (folder / "red" / "copy.jpg").resolve(),
        original.resolve(),
        "red",
        "red",
    )
    assert 0.9 <= pair["similarity"] < 0.999

    # Accuracy with and without the copy, checked against the saved model's own predictions.
    (dataset,) = (tmp_path / "cache" / "datasets").glob("*.parquet")
    labels, test_paths = FeatureSet(dataset, 0, 0, "").labels_and_paths("test")
    predictions = run.serving_model()(np.stack([load_image(path) for path in test_paths]).astype(np.float32)).argmax(
        axis=1
    )
    right = predictions == labels
    kept = np.array([Path(path) != (folder / "red" / "copy.jpg").resolve() for path in test_paths])
    assert (
        kept.sum() == len(test_paths) - 1 == test["n_without_flagged"]
        and test["n"] == len(test_paths) == run.metrics["n"]
    )
    assert test["accuracy"] == pytest.approx(right.mean()) == pytest.approx(run.metrics["accuracy"])
    assert test["accuracy_without_flagged"] == pytest.approx(right[kept].mean())
    assert run.metrics["near_duplicates"] == {
        "threshold": 0.9,
        "flagged": 1,
        "accuracy_without_flagged": test["accuracy_without_flagged"],
        "n_without_flagged": len(test_paths) - 1,
    }

    card = run.model_card
    assert f"**1** of {len(test_paths)} test images are near-duplicates" in card
    assert f"**{test['accuracy_without_flagged']:.4f}** on the other {len(test_paths) - 1}" in card
    assert sorted(png.name for png in run.plots()) == sorted(PLOT_FILES + (NEAR_DUPLICATES_PLOT,))
    assert (run.path / "plots" / NEAR_DUPLICATES_PLOT).read_bytes().startswith(b"\x89PNG")
    table = Artifact.get("headstart-near-duplicates")
    assert table is not None and "copy.jpg" in table.data and original.name in table.data
    report = Artifact.get("headstart-report")
    assert "**Near-duplicates:** **1** of" in report.data
