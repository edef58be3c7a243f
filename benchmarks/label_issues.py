"""How well the label-issue check finds wrong training labels, and what leaving them out is worth.

    uv run python benchmarks/label_issues.py [--data ../shared/datasets/cifar10-catdog] [--cache-dir DIR]

On the dataset's features (bundled MobileNetV2 at 160 px, the defaults; extracted through
headstart's own steps where the cache does not hold them yet), for each of --seeds seeds:

1. --flip (5 %) of the TRAINING labels are flipped at random (here only, in a copy of the
   dataset's features file; validation and test keep their labels);
2. the check runs as a train run runs it (headstart.evaluation.label_issues: 5 out-of-fold heads
   with the default head settings, then confident learning), and its ranking of every training
   image is compared with the flipped ones: precision and recall at several k, and of the
   method's own flagged set;
3. the head is trained on the noisy labels, on the noisy labels without the flagged images (what
   --drop-label-issues does), without only the top 100, 200 or 400 of the ranking, and for
   reference on the clean labels and on the noisy labels without exactly the flipped images;
   test accuracy of each, on the (clean) test split.

The check also runs once on the clean labels: what it flags where nothing was flipped.
Writes benchmarks/results/label-issues.md and label-issues.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from headstart.backbone.handles import resolve_backbone
from headstart.config import HeadConfig, TrainConfig
from headstart.data.sources import prepare_source
from headstart.evaluation.label_issues import (
    FILTERS,
    find_label_issues,
    issue_scores,
    label_issue_table,
    out_of_fold_probabilities,
)
from headstart.features.dataset import FeatureSet, assemble_features, plan_extraction
from headstart.features.encoding import FEATURES_PARQUET_OPTIONS
from headstart.features.extraction import ExtractionContext, ExtractionSettings

RESULTS = Path(__file__).parent / "results"
AT_K = (50, 100, 200, 300, 400, 600, 800, 1200, 1600)
# Retrains without only the top of the ranking, where it is most precise.
DROP_TOP = (100, 200, 400)


def dataset_features(data: str, cache_dir: Path) -> tuple[FeatureSet, tuple[str, ...]]:
    """The dataset's features file at the default configuration, extracted where missing."""
    config = TrainConfig(data=data, cache_dir=cache_dir)
    manifest, _ = prepare_source(config.data, config.runtime.cache_dir)
    backbone = resolve_backbone(config.backbone.handle, config.backbone.image_size, config.runtime.cache_dir)
    shards = plan_extraction(manifest, backbone, cache_dir)
    extracted = 0
    if shards:
        with ExtractionContext(cache_dir, ExtractionSettings()) as context:
            for shard in shards:
                context.extract_shard(shard, backbone)
                extracted += len(shard)
    return assemble_features(manifest, backbone, cache_dir, extracted), manifest.class_names


def with_flipped_labels(features: FeatureSet, destination: Path, fraction: float, seed: int, classes: int):
    """A copy of the features file with `fraction` of the train split's labels moved to another
    class at random (same row groups); returns it and the flipped images' content hashes."""
    parquet = pq.ParquetFile(features.path)
    train_groups = set(features.row_groups("train"))
    hashes = features.rows("train", ["sha256"])["sha256"]
    generator = np.random.default_rng(seed)
    flipped = set(generator.choice(hashes, int(round(fraction * len(hashes))), replace=False).tolist())
    writer = pq.ParquetWriter(destination, parquet.schema_arrow, **FEATURES_PARQUET_OPTIONS)
    try:
        for group in range(parquet.num_row_groups):
            table = parquet.read_row_group(group)
            if group in train_groups:
                labels = table.column("label").to_numpy().copy()
                for row, sha in enumerate(table.column("sha256").to_pylist()):
                    if sha in flipped:
                        labels[row] = (labels[row] + generator.integers(1, classes)) % classes
                index = table.schema.get_field_index("label")
                table = table.set_column(index, table.schema.field(index), pa.array(labels, table.column("label").type))
            writer.write_table(table, row_group_size=table.num_rows)
    finally:
        writer.close()
    return FeatureSet(destination, 0, 0, "cache"), flipped


def head_test_accuracy(features: FeatureSet, classes: int, head: HeadConfig, leave_out: frozenset[str] = frozenset()):
    """The head trained as a run trains it (on the train split without `leave_out`), on the test split."""
    from headstart.training.fitting import fit_configured_head
    from headstart.training.head import new_head, predict_from_features

    test_features, test_labels, _ = features.load("test")
    classifier = new_head(test_features.shape[1], classes, head.dropout, head.seed)
    fit_configured_head(head, classifier, features, leave_out=leave_out)
    return float((predict_from_features(classifier, test_features).argmax(axis=1) == test_labels).mean())


def ranking_quality(hashes: list[str], ranking: np.ndarray, flipped: set[str]) -> dict:
    """Precision and recall of the top k of the ranking."""
    hits = np.cumsum([hashes[row] in flipped for row in ranking])

    def at(k: int) -> dict:
        k = min(k, len(ranking))
        found = int(hits[k - 1]) if k else 0
        return {"k": k, "found": found, "precision": found / k if k else None, "recall": found / len(flipped)}

    return {"at_k": [at(k) for k in AT_K]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/datasets/cifar10-catdog"))
    parser.add_argument("--cache-dir", default=".cache/headstart")
    parser.add_argument("--flip", type=float, default=0.05)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--folds", type=int, default=5)
    args = parser.parse_args()
    head = HeadConfig()
    features, class_names = dataset_features(args.data, Path(args.cache_dir))
    classes = len(class_names)
    results = {
        "data": Path(args.data).name,
        "flip": args.flip,
        "folds": args.folds,
        "head": head.model_dump(),
        "train_images": len(features.rows("train", ["sha256"])["sha256"]),
        "test_images": len(features.rows("test", ["sha256"])["sha256"]),
    }
    started = time.perf_counter()
    clean = out_of_fold_probabilities(features, classes, head, args.folds)
    clean_table = label_issue_table(clean, class_names)
    results["clean"] = {
        "check_seconds": round(time.perf_counter() - started, 1),
        "flagged": clean_table.num_rows,
        "out_of_fold_accuracy": float((clean.probabilities.argmax(1) == clean.labels).mean()),
        "test_accuracy": head_test_accuracy(features, classes, head),
    }
    print(json.dumps(results["clean"]), flush=True)
    runs = []
    with tempfile.TemporaryDirectory(prefix="label-issues-") as scratch:
        for seed in range(args.seeds):
            copy = Path(scratch) / f"noisy-{seed}.parquet"
            noisy, flipped = with_flipped_labels(features, copy, args.flip, seed, classes)
            started = time.perf_counter()
            out_of_fold = out_of_fold_probabilities(noisy, classes, head, args.folds)
            table = label_issue_table(out_of_fold, class_names)
            seconds = time.perf_counter() - started
            ranking = np.argsort(-issue_scores(out_of_fold.labels, out_of_fold.probabilities), kind="stable")
            flagged = frozenset(table.column("sha256").to_pylist())
            filters = {}
            for filter_by in FILTERS:
                rows = find_label_issues(out_of_fold.labels, out_of_fold.probabilities, filter_by)
                chosen = frozenset(out_of_fold.hashes[row] for row in rows)
                filters[filter_by] = {
                    "flagged": len(chosen),
                    "precision": len(chosen & flipped) / len(chosen) if chosen else None,
                    "recall": len(chosen & flipped) / len(flipped),
                    "test_accuracy_without_flagged": head_test_accuracy(noisy, classes, head, chosen),
                }
            run = {
                "seed": seed,
                "flipped": len(flipped),
                "check_seconds": round(seconds, 1),
                "flagged": len(flagged),
                "flagged_flipped": len(flagged & flipped),
                "out_of_fold_accuracy": float((out_of_fold.probabilities.argmax(1) == out_of_fold.labels).mean()),
                **ranking_quality(out_of_fold.hashes, ranking, flipped),
                "filters": filters,
                "test_accuracy": {
                    "noisy": head_test_accuracy(noisy, classes, head),
                    "noisy_without_flagged": filters[FILTERS[0]]["test_accuracy_without_flagged"],
                    "noisy_without_flipped": head_test_accuracy(noisy, classes, head, frozenset(flipped)),
                    **{
                        f"noisy_without_top_{k}": head_test_accuracy(
                            noisy, classes, head, frozenset(out_of_fold.hashes[row] for row in ranking[:k])
                        )
                        for k in DROP_TOP
                    },
                    "clean": results["clean"]["test_accuracy"],
                },
            }
            print(json.dumps({key: run[key] for key in ("seed", "flagged", "flagged_flipped", "test_accuracy")}))
            runs.append(run)
    results["noisy"] = runs
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "label-issues.json").write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / "label-issues.md").write_text(report(results))
    print(RESULTS / "label-issues.md")


def report(results: dict) -> str:
    runs = results["noisy"]

    def mean(values) -> float:
        return float(np.mean(list(values)))

    def spread(values, digits: int = 4) -> str:
        values = list(values)
        return f"{np.mean(values):.{digits}f} ({min(values):.{digits}f}–{max(values):.{digits}f})"

    lines = [
        f"# Wrong labels in the training data: `{results['data']}`",
        "",
        "Written by `benchmarks/label_issues.py`. Bundled MobileNetV2 at 160 px, the default head settings; "
        f"{results['train_images']} training images, {results['test_images']} test images. "
        f"{results['flip']:.0%} of the training labels flipped at random (cat ↔ dog), {len(runs)} seeds; "
        f"{results['folds']} out-of-fold heads, then confident learning (filter `{FILTERS[0]}`, what a run uses). "
        "Validation and test labels are never flipped. Figures are means over the seeds (range in brackets).",
        "",
        "## The ranking against the flipped labels",
        "",
        "| top k | precision | recall |",
        "|---:|---:|---:|",
    ]
    for index, k in enumerate(AT_K):
        lines.append(
            f"| {k} | {spread(run['at_k'][index]['precision'] for run in runs)} | "
            f"{spread(run['at_k'][index]['recall'] for run in runs)} |"
        )
    lines.append(
        f"| **flagged set** ({mean(run['flagged'] for run in runs):.0f} images) | "
        f"{spread(run['filters'][FILTERS[0]]['precision'] for run in runs)} | "
        f"{spread(run['filters'][FILTERS[0]]['recall'] for run in runs)} |"
    )
    clean = results["clean"]
    lines += [
        "",
        f"Flipped per seed: {runs[0]['flipped']}. Out-of-fold accuracy on the noisy labels: "
        f"{spread(run['out_of_fold_accuracy'] for run in runs)}. On the clean labels the check flags "
        f"{clean['flagged']} images (out-of-fold accuracy {clean['out_of_fold_accuracy']:.4f}): "
        "a cat-vs-dog head on upscaled 32 px photos is wrong on many honest images, and the method flags "
        "the ones it is confidently wrong on.",
        "",
        "## Test accuracy of the head",
        "",
        "| trained on | test accuracy |",
        "|---|---:|",
        f"| clean labels (reference) | {clean['test_accuracy']:.4f} |",
        f"| noisy labels | {spread(run['test_accuracy']['noisy'] for run in runs)} |",
        f"| noisy labels without the flagged images (`--drop-label-issues`) | "
        f"{spread(run['test_accuracy']['noisy_without_flagged'] for run in runs)} |",
        *(
            f"| noisy labels without the top {k} of the ranking | "
            f"{spread(run['test_accuracy'][f'noisy_without_top_{k}'] for run in runs)} |"
            for k in DROP_TOP
        ),
        f"| noisy labels without exactly the flipped images (reference) | "
        f"{spread(run['test_accuracy']['noisy_without_flipped'] for run in runs)} |",
        "",
        "## How the flagged set is chosen",
        "",
        "The same out-of-fold probabilities, three ways of choosing from the confident joint "
        "(headstart.evaluation.label_issues.FILTERS; the first is what a run uses):",
        "",
        "| filter | flagged | precision | recall | test accuracy without them |",
        "|---|---:|---:|---:|---:|",
        *(
            f"| {name} | {mean(run['filters'][name]['flagged'] for run in runs):.0f} | "
            f"{spread(run['filters'][name]['precision'] or 0.0 for run in runs)} | "
            f"{spread(run['filters'][name]['recall'] for run in runs)} | "
            f"{spread(run['filters'][name]['test_accuracy_without_flagged'] for run in runs)} |"
            for name in runs[0]["filters"]
        ),
        "",
        f"Cost of the check (5 heads on the cached features, then confident learning): "
        f"{spread((run['check_seconds'] for run in runs), 0)} s on this machine (2 shared cores); "
        f"{clean['check_seconds']} s on the clean labels.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
