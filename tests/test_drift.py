"""The drift note's rules on hand-made features files and data indexes: images new and gone by
content, per-class counts, how far the mean feature moved against what chance gives, and what it
says where there is nothing to compare with."""

from pathlib import Path

import pyarrow as pa
import pytest
from feature_sets import sha, write_feature_set

from headstart.backbone.handles import Backbone
from headstart.evaluation import drift

BACKBONE = Backbone("fixture", Path("not-loaded"), "backbone-a", 32)


def _candidate(tmp_path, images: list[tuple[str, str, str, list[float]]], class_names: list[str]):
    """A candidate's features file and data index from (image name, split, class, features)."""
    rows = [(sha(name), split, class_names.index(cls), features) for name, split, cls, features in images]
    features = write_feature_set(tmp_path / "candidate.parquet", rows, class_names)
    return features, drift.data_index(features, class_names)


def _index(images: list[tuple[str, str, str]]) -> pa.Table:
    """A champion's data index from (image name, split, class)."""
    return pa.table(
        {
            "sha256": [sha(name) for name, _, _ in images],
            "class": [cls for _, _, cls in images],
            "split": [split for _, split, _ in images],
        }
    )


def _reference(
    mean, spread: float, images: int, fingerprint: str = "backbone-a", image_size: int = 32
) -> drift.FeatureReference:
    return drift.FeatureReference(fingerprint, image_size, images, spread, tuple(mean))


def test_the_data_index_lists_every_image_with_its_class_name_and_split_in_the_files_order(tmp_path):
    features, index = _candidate(
        tmp_path,
        [("t1", "test", "dog", [0, 0]), ("a", "train", "cat", [0, 0]), ("v", "validation", "dog", [0, 0])],
        ["cat", "dog"],
    )
    assert index.to_pydict() == {
        "sha256": [sha("a"), sha("v"), sha("t1")],
        "class": ["cat", "dog", "dog"],
        "split": ["train", "validation", "test"],
    }


def test_the_feature_reference_is_the_training_splits_mean_and_root_mean_square_distance_from_it(tmp_path):
    features, _ = _candidate(
        tmp_path,
        [
            ("a", "train", "cat", [0, 0]),
            ("b", "train", "cat", [2, 0]),
            ("c", "train", "dog", [0, 2]),
            ("d", "train", "dog", [2, 2]),
            # Held-out images are no part of what the champion trained on.
            ("v", "validation", "dog", [50, 50]),
            ("t", "test", "dog", [-50, 9]),
        ],
        ["cat", "dog"],
    )
    reference = drift.feature_reference(features, BACKBONE)
    assert list(reference.mean) == [1.0, 1.0] and reference.images == 4
    assert reference.spread == pytest.approx(2**0.5)  # every training feature lies √2 from the mean
    assert (reference.backbone_fingerprint, reference.image_size) == ("backbone-a", 32)


def test_new_and_gone_images_are_counted_by_content_so_an_edited_image_is_one_new_and_one_gone(tmp_path):
    champion = _index([("a", "train", "cat"), ("b", "train", "dog"), ("c", "test", "dog"), ("d", "train", "cat")])
    features, index = _candidate(
        tmp_path,
        [
            ("a", "train", "cat", [0, 0]),
            ("b", "train", "dog", [0, 0]),
            ("c, edited", "test", "dog", [0, 0]),  # the file of c, rewritten: other content, another hash
            ("e", "train", "cat", [0, 0]),
            ("f", "validation", "dog", [0, 0]),
        ],  # d is gone
        ["cat", "dog"],
    )
    note = drift.compare("v1", champion, None, index, features, BACKBONE)
    assert (note["champion"], note["images"], note["champion_images"]) == ("v1", 5, 4)
    assert (note["new_images"], note["images_gone"]) == (3, 2)  # new: c edited, e, f; gone: c, d


def test_a_relabelled_image_is_neither_new_nor_gone_and_moves_between_the_per_class_counts(tmp_path):
    champion = _index([("a", "train", "cat"), ("b", "train", "cat"), ("c", "test", "dog")])
    features, index = _candidate(
        tmp_path,
        [("a", "train", "cat", [0, 0]), ("b", "train", "dog", [0, 0]), ("c", "test", "dog", [0, 0])],
        ["cat", "dog"],
    )
    note = drift.compare("v1", champion, None, index, features, BACKBONE)
    assert (note["new_images"], note["images_gone"], note["images"], note["champion_images"]) == (0, 0, 3, 3)
    assert note["per_class"] == {
        "cat": {"images": 1, "champion_images": 2},
        "dog": {"images": 2, "champion_images": 1},
    }


def test_per_class_counts_list_a_class_only_the_champion_had_and_one_only_the_candidate_has(tmp_path):
    champion = _index([("a", "train", "cat"), ("f", "train", "fox"), ("g", "test", "fox")])
    features, index = _candidate(
        tmp_path,
        [("a", "train", "cat", [0, 0]), ("h", "train", "bird", [0, 0]), ("i", "test", "cat", [0, 0])],
        ["bird", "cat"],
    )
    note = drift.compare("v1", champion, None, index, features, BACKBONE)
    assert note["per_class"] == {
        "bird": {"images": 1, "champion_images": 0},
        "cat": {"images": 2, "champion_images": 1},
        "fox": {"images": 0, "champion_images": 2},
    }
    assert list(note["per_class"]) == ["bird", "cat", "fox"]  # sorted by name, whichever side has the class


def _moved(tmp_path):
    """Two images the champion had, at its training mean (the origin), and two new ones away from it,
    in different splits: the mean of all four is (1, 1.5), that of the new ones (2, 3)."""
    champion = _index([("old 1", "train", "cat"), ("old 2", "validation", "dog"), ("gone", "train", "dog")])
    return champion, *_candidate(
        tmp_path,
        [
            ("old 1", "train", "cat", [0, 0]),
            ("new 1", "train", "cat", [4, 0]),
            ("old 2", "validation", "dog", [0, 0]),
            ("new 2", "test", "dog", [0, 6]),
        ],
        ["cat", "dog"],
    )


def test_the_mean_feature_shift_is_in_champion_spreads_beside_what_chance_gives_for_all_and_for_new_images(tmp_path):
    champion, features, index = _moved(tmp_path)
    note = drift.compare("v1", champion, _reference([0, 0], 2.0, 4), index, features, BACKBONE)
    assert note["mean_feature_shift"] == pytest.approx(3.25**0.5 / 2, abs=1e-4)  # |(1, 1.5)| / 2
    assert note["mean_feature_shift_by_chance"] == pytest.approx((1 / 4 + 1 / 4) ** 0.5, abs=1e-4)  # n = 4, m = 4
    assert note["new_images_mean_feature_shift"] == pytest.approx(13**0.5 / 2, abs=1e-4)  # |(2, 3)| / 2
    assert note["new_images_shift_by_chance"] == pytest.approx((1 / 2 + 1 / 4) ** 0.5, abs=1e-4)  # n = 2, m = 4


def test_a_champion_whose_training_features_did_not_spread_gives_the_shift_in_feature_units(tmp_path):
    champion, features, index = _moved(tmp_path)
    note = drift.compare("v1", champion, _reference([0, 0], 0.0, 4), index, features, BACKBONE)
    assert note["mean_feature_shift"] == pytest.approx(3.25**0.5, abs=1e-4)
    assert note["new_images_mean_feature_shift"] == pytest.approx(13**0.5, abs=1e-4)


def test_without_new_images_only_the_whole_sets_shift_is_given(tmp_path):
    champion = _index([("a", "train", "cat"), ("b", "test", "dog")])
    features, index = _candidate(
        tmp_path, [("a", "train", "cat", [3, 0]), ("b", "test", "dog", [3, 8])], ["cat", "dog"]
    )
    note = drift.compare("v1", champion, _reference([3, 4], 1.0, 2), index, features, BACKBONE)
    assert note["new_images"] == 0 and note["mean_feature_shift"] == 0.0
    assert note["new_images_mean_feature_shift"] is None and note["new_images_shift_by_chance"] is None
    assert "new images' mean" not in drift.summary(note)


@pytest.mark.parametrize(
    "reference",
    [
        None,  # a champion written before runs kept a feature reference
        _reference([0, 0], 2.0, 4, fingerprint="backbone-b"),
        _reference([0, 0], 2.0, 4, image_size=64),
    ],
    ids=["no reference", "another backbone", "another image size"],
)
def test_features_of_another_backbone_or_image_size_are_not_compared_and_the_note_says_so(reference, tmp_path):
    champion, features, index = _moved(tmp_path)
    note = drift.compare("v1", champion, reference, index, features, BACKBONE)
    assert note["mean_feature_shift"] is None and "new_images_mean_feature_shift" not in note
    assert note["mean_feature_note"].endswith("not comparable")
    assert (note["new_images"], note["images_gone"]) == (2, 1)  # the counts need no features
    assert drift.summary(note).endswith("another backbone or image size: not comparable")


def test_a_champion_without_a_data_index_gets_a_note_instead_of_a_comparison(tmp_path):
    _, features, index = _moved(tmp_path)
    note = drift.compare("v1", None, _reference([0, 0], 2.0, 4), index, features, BACKBONE)
    assert note == {"note": "champion v1 was written before runs kept a data index: no comparison"}
    assert drift.summary(note) == note["note"]


def test_the_summary_gives_the_counts_per_class_and_both_shifts_with_their_chance_figures(tmp_path):
    champion, features, index = _moved(tmp_path)
    note = drift.compare("v1", champion, _reference([0, 0], 2.0, 4), index, features, BACKBONE)
    assert drift.summary(note) == (
        "2 new images, 1 gone since champion v1; per class: cat 2 (was 1), dog 2 (was 2); "
        "mean feature moved 0.9014 spreads (chance: 0.7071), the new images' mean 1.8028 (chance: 0.866)"
    )
