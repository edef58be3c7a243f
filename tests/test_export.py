"""A run as .tflite files (float32 and int8, class names inside), predicting from them with LiteRT
alone, and the int8 extraction engine's features kept apart from float ones."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import FIXTURES, write_class_images

from headstart.config import TrainConfig
from headstart.edge.int8.quantization import RANGE_ENDS
from headstart.errors import HeadstartError
from headstart.registry.runs import Run

PROJECT = Path(__file__).resolve().parents[1]


def _config(folder: Path, backbone_dir: Path, root: Path, **overrides) -> TrainConfig:
    values = dict(epochs=40, learning_rate=0.1, batch_size=8, patience=40, test_fraction=0.25, gate=False)
    values.update(overrides)
    return TrainConfig.smoke(
        data=str(folder),
        backbone=str(backbone_dir),
        artifacts_root=root / "artifacts",
        cache_dir=root / "cache",
        **values,
    )


@pytest.fixture(scope="module")
def colours(tmp_path_factory) -> Path:
    return write_class_images(
        tmp_path_factory.mktemp("colours") / "data", {"red": (200, 40, 40), "blue": (40, 40, 200)}, per_class=24
    )


@pytest.fixture(scope="module")
def exported_run(prefect_harness, colours, tiny_backbone_dir, tmp_path_factory) -> Run:
    """A run trained by the flow with --export tflite."""
    from flows.train import train

    return Run(
        train(**_config(colours, tiny_backbone_dir, tmp_path_factory.mktemp("exported"), export="tflite").flat())
    )


def test_the_flow_exports_float_and_int8_files_measured_against_the_keras_model(exported_run):
    from prefect.artifacts import Artifact

    from headstart.edge import TFLiteClassifier, read_labels

    exports = exported_run.metrics["exports"]
    assert set(exports) == {"none", "int8"}
    float32, int8 = exports["none"], exports["int8"]
    assert float32["file"] == "exports/model-float32.tflite" and int8["file"] == "exports/model-int8.tflite"
    assert (
        float32["max_probability_difference"] <= 1e-4 and float32["top1_agreement"] == 1.0 and float32["meets_target"]
    )
    assert (
        float32["test_images"] == exported_run.metrics["n"]
        and float32["accuracy"] == float32["keras_accuracy"] == exported_run.metrics["accuracy"]
    )
    # Two colours far apart: int8 keeps every decision of so easy a model.
    assert int8["top1_agreement"] == 1.0 and int8["bytes"] < float32["bytes"]
    # Its ranges were chosen on the validation split, which the file agrees with as well.
    assert (
        int8["range_end_percentile"] in RANGE_ENDS
        and int8["validation_agreement"] == 1.0
        and int8["validation_images"] >= 1
    )
    assert 0.0 <= int8["validation_divergence"] < 0.01
    for record in (float32, int8):
        model_file = exported_run.path / record["file"]
        assert model_file.stat().st_size == record["bytes"]
        assert read_labels(model_file.read_bytes()) == exported_run.class_names == ["blue", "red"]
    assert (
        not TFLiteClassifier(exported_run.path / float32["file"]).quantized
        and TFLiteClassifier(exported_run.path / int8["file"]).quantized
    )
    assert "## On devices (.tflite)" in exported_run.model_card and "`model-int8.tflite`" in exported_run.model_card
    assert f"ReLU6 ranges end at the {int8['range_end_percentile']:g}th percentile" in exported_run.model_card
    artifact = Artifact.get("headstart-export")
    assert artifact is not None and "model-int8.tflite" in artifact.data


def _official_metadata_schema():
    import importlib.util

    spec = importlib.util.spec_from_file_location("tflite_metadata_schema", FIXTURES / "tflite_metadata_schema.py")
    metadata_schema = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(metadata_schema)
    return metadata_schema


def test_the_metadata_enum_values_written_are_the_official_schemas():
    from headstart.edge import tflite_file

    metadata_schema = _official_metadata_schema()
    for enum in ("AssociatedFileType", "ColorSpaceType", "ContentProperties", "ProcessUnitOptions"):
        ours, official = getattr(tflite_file, f"_{enum}"), getattr(metadata_schema, enum)
        members = {name: value for name, value in vars(ours).items() if name[0] != "_"}
        assert members and all(getattr(official, name) == value for name, value in members.items()), enum


def test_the_class_names_travel_as_tflite_metadata_and_a_packed_labels_file(exported_run):
    import io
    import zipfile

    from ai_edge_litert import schema_py_generated as schema

    from headstart.edge import embed_labels

    metadata_schema = _official_metadata_schema()
    model = (exported_run.path / "exports" / "model-float32.tflite").read_bytes()
    root = schema.Model.GetRootAs(model, 0)
    names = [root.Metadata(index).Name() for index in range(root.MetadataLength())]
    assert b"TFLITE_METADATA" in names
    record = root.Buffers(root.Metadata(names.index(b"TFLITE_METADATA")).Buffer()).DataAsNumpy().tobytes()
    # Read with the official metadata schema: what TFLite's metadata tools and Model Maker's readers see.
    assert metadata_schema.ModelMetadata.ModelMetadataBufferHasIdentifier(record, 0)
    metadata = metadata_schema.ModelMetadataT.InitFromObj(
        metadata_schema.ModelMetadata.GetRootAsModelMetadata(record, 0)
    )
    assert metadata.minParserVersion == b"1.0.0" and b"blue, red" in metadata.description
    (subgraph,) = metadata.subgraphMetadata
    (image,), (probability,) = subgraph.inputTensorMetadata, subgraph.outputTensorMetadata
    assert image.content.contentPropertiesType == metadata_schema.ContentProperties.ImageProperties
    assert image.content.contentProperties.colorSpace == metadata_schema.ColorSpaceType.RGB
    assert (image.content.contentProperties.defaultSize.width, image.content.contentProperties.defaultSize.height) == (
        32,
        32,
    )
    (normalization,) = image.processUnits
    assert list(normalization.options.mean) == [0.0] and list(normalization.options.std) == [
        1.0
    ]  # 0–255 pixels as they are
    assert list(image.stats.min) == [0.0] and list(image.stats.max) == [255.0]
    (labels,) = probability.associatedFiles
    assert labels.name == b"labels.txt" and labels.type == metadata_schema.AssociatedFileType.TENSOR_AXIS_LABELS
    assert zipfile.ZipFile(io.BytesIO(model)).read("labels.txt") == b"blue\nred\n"
    # Embedding again replaces the record and the labels instead of piling them up.
    relabelled = embed_labels(model[: model.rfind(b"PK\x03\x04")], ["bleu", "rouge"], 32, "again")
    again = schema.Model.GetRootAs(relabelled, 0)
    assert [again.Metadata(i).Name() for i in range(again.MetadataLength())].count(b"TFLITE_METADATA") == 1
    assert zipfile.ZipFile(io.BytesIO(relabelled)).read("labels.txt") == "bleu\nrouge\n".encode()


def _cli(*args, tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args], cwd=PROJECT, env=env, capture_output=True, text=True, timeout=600
    )


def test_predict_from_a_tflite_file_imports_no_tensorflow_and_agrees_with_the_run(exported_run, colours, tmp_path):
    from headstart.features.extraction import ExtractionContext
    from headstart.serving.predict import predict_images

    (tmp_path / "broken.png").write_bytes(b"\x89PNG truncated")
    probe = (
        "import json, sys; from flows.cli import main; status = main(sys.argv[1:]); "
        "print(json.dumps({'status': status, 'tensorflow': 'tensorflow' in sys.modules}))"
    )
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            probe,
            "predict",
            "--model",
            str(exported_run.path / "exports" / "model-float32.tflite"),
            str(colours),
            str(tmp_path / "broken.png"),
            "--json",
        ],
        cwd=PROJECT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert lines[-1] == {"status": 0, "tensorflow": False}, result.stderr[-2000:]
    assert "broken.png" in result.stderr and "Traceback" not in result.stderr
    from_file = {row["path"]: row for row in lines[:-1]}
    with ExtractionContext(tmp_path / "cache") as context:
        from_run = predict_images(exported_run, [colours], context)
    assert sorted(from_file) == sorted(from_run.paths) and len(from_file) == 48
    for path, probabilities in zip(from_run.paths, from_run.probabilities):
        assert from_file[path]["label"] == exported_run.class_names[int(np.argmax(probabilities))]
        assert from_file[path]["probabilities"]["red"] == pytest.approx(float(probabilities[1]), abs=1e-4)


def test_a_tflite_file_without_class_names_or_not_a_model_is_a_one_line_error(exported_run, colours, tmp_path):
    from headstart.backbone.handles import resolve_backbone
    from headstart.features.engines import convert_to_litert

    (tmp_path / "notes.tflite").write_text("not a model")
    backbone = resolve_backbone(str(exported_run.path / "backbone"), 32, tmp_path / "cache")
    unlabelled = convert_to_litert(backbone, tmp_path / "cache")
    for model, message in [
        (tmp_path / "missing.tflite", "model file not found"),
        (tmp_path / "notes.tflite", "not a .tflite model with class names"),
        (unlabelled, "not a .tflite model with class names"),
    ]:
        result = _cli("predict", "--model", str(model), str(colours), tmp_path=tmp_path)
        assert result.returncode == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1, (
            result.stderr
        )


def test_export_command_writes_where_asked_and_records_the_figures(exported_run, tmp_path):
    output = tmp_path / "out" / "classifier.tflite"
    result = _cli(
        "export", "--model", str(exported_run.path), "--quantize", "none", "--output", str(output), tmp_path=tmp_path
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == str(output) and output.is_file()
    assert "float32" in result.stderr and ": met" in result.stderr
    assert json.loads((exported_run.path / "metrics.json").read_text())["exports"]["none"]["file"] == str(output)
    assert sorted(path.name for path in output.parent.iterdir()) == [
        "classifier.tflite"
    ]  # no temporary file left behind


def test_export_can_fail_a_script_when_the_file_misses_its_target(exported_run, tmp_path, monkeypatch, capsys):
    import headstart.edge.export
    from flows.cli import main

    output = tmp_path / "strict.tflite"
    arguments = ["export", "--model", str(exported_run.path), "--output", str(output), "--require-target"]
    assert main(arguments) == 0
    monkeypatch.setattr(headstart.edge.export, "FLOAT_TOLERANCE", -1.0)  # a target no file meets
    assert main(arguments) == 1 and output.is_file()
    assert "NOT met" in capsys.readouterr().err


def test_int8_features_are_cached_under_their_own_key(prefect_harness, colours, tiny_backbone_dir, tmp_path):
    from flows.train import train
    from headstart.backbone.handles import resolve_backbone
    from headstart.edge import export_tflite, quantized_backbone
    from headstart.features.cache import FeatureCache
    from headstart.features.extraction import ExtractionContext
    from headstart.serving.inference import evaluate_folder, predict_files
    from headstart.serving.predict import predict_images

    float_run = Run(train(**_config(colours, tiny_backbone_dir, tmp_path).flat()))
    int8_run = Run(train(**_config(colours, tiny_backbone_dir, tmp_path, engine="litert-int8").flat()))
    assert (
        int8_run.config["backbone_fingerprint"]
        == f"{float_run.config['backbone_fingerprint']}-int8-" + int8_run.config["backbone_fingerprint"][-12:]
    )
    assert int8_run.config["training_key"] != float_run.config["training_key"]  # never a reuse of the float run
    assert sorted(path.name for path in (tmp_path / "cache" / "features").iterdir()) == sorted(
        f"{run.config['backbone_fingerprint']}-32px" for run in (float_run, int8_run)
    )
    assert (int8_run.path / "backbone-int8.tflite").is_file() and int8_run.metrics["engine"] == "litert-int8"
    assert (
        int8_run.backbone.litert_model == int8_run.path / "backbone-int8.tflite"
        and float_run.backbone.litert_model is None
    )
    with pytest.raises(HeadstartError, match="trained on int8 features"):
        export_tflite(int8_run, "none", None)  # its Keras model holds the float backbone, not what was measured
    # Predicting and evaluating with the int8 run run its int8 backbone, whichever path is taken.
    with ExtractionContext(tmp_path / "cache") as context:
        through_engine = predict_images(int8_run, [colours], context)
    probabilities, kept, _ = predict_files(int8_run, [Path(path) for path in through_engine.paths])
    assert len(kept) == 48 and np.abs(probabilities - through_engine.probabilities).max() < 1e-5
    assert evaluate_folder(int8_run, colours)["accuracy"] >= 0.9

    backbone = resolve_backbone(str(tiny_backbone_dir), 32, tmp_path / "cache")
    rows = [
        {"path": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "split": "train"}
        for path in sorted(colours.glob("*/*.png"))
    ]
    first, again, other = (
        quantized_backbone(backbone, chosen, tmp_path / "cache") for chosen in (rows[:20], rows[:20], rows[-20:])
    )
    assert (
        first == again and first.fingerprint != other.fingerprint != backbone.fingerprint
    )  # another calibration set: another backbone
    assert len({FeatureCache(tmp_path / "cache", chosen).directory for chosen in (backbone, first, other)}) == 3
    with pytest.raises(
        HeadstartError, match="only 0 were usable"
    ):  # files no longer holding the listed contents calibrate nothing
        quantized_backbone(backbone, [{**row, "sha256": "0" * 64} for row in rows], tmp_path / "cache")


def test_the_int8_engine_refuses_what_it_cannot_do(exported_run, tmp_path):

    with pytest.raises(ValueError, match="choose one of them"):
        TrainConfig.smoke(data="x", fine_tune=True, engine="litert-int8")
    result = _cli(
        "predict",
        "--model",
        str(exported_run.path),
        "--engine",
        "litert-int8",
        str(exported_run.path / "plots"),
        "--cache-dir",
        str(tmp_path / "cache"),
        tmp_path=tmp_path,
    )
    assert result.returncode == 2 and "is float32" in result.stderr and "Traceback" not in result.stderr


def test_the_predict_flow_takes_a_tflite_file_too(exported_run, colours, tmp_path):
    import pyarrow.parquet as pq
    from prefect.artifacts import Artifact

    from flows.predict import predict

    output = tmp_path / "labels.parquet"
    summary = predict(
        inputs=[str(colours)], model=str(exported_run.path / "exports" / "model-int8.tflite"), output=output
    )
    assert summary.startswith("48 images labelled (blue 24, red 24)")
    assert pq.read_table(output).num_rows == 48
    assert "labelled by model-int8.tflite" in Artifact.get("headstart-predictions").description


def test_an_image_broken_since_training_is_left_out_of_the_check(exported_run, colours, tmp_path):
    from headstart.edge import ExportImages, export_tflite

    (tmp_path / "broken.png").write_bytes(b"\x89PNG truncated")
    blue = sorted(str(path) for path in (colours / "blue").glob("*.png"))[:6]
    images = ExportImages(blue[:3], [*blue, str(tmp_path / "broken.png")], np.zeros(7, np.int64))
    record = export_tflite(exported_run, "none", images, tmp_path / "checked.tflite")
    assert record.test_images == 6 and record.accuracy == 1.0 and record.meets_target
    assert Run(exported_run.path).metrics["exports"]["none"] == record.to_dict()  # as metrics.json keeps it


def test_the_int8_export_keeps_the_file_closest_to_the_keras_model_not_the_first(exported_run):
    """Two candidates that agree on every validation decision, the int8 file first: the float32
    file moves no probability, so it is the one kept."""
    from headstart.edge.export import closest_variant, convert_classifier, export_images

    images = export_images(exported_run)
    int8, _ = convert_classifier(exported_run, "int8", images, range_ends=(99.99,))
    float32, _ = convert_classifier(exported_run, "none", images)
    kept, chosen = closest_variant(exported_run, {1.0: int8, 2.0: float32}, images.validation)
    assert kept == float32 and chosen["range_end_percentile"] == 2.0
    assert (
        chosen["validation_agreement"] == 1.0
        and chosen["validation_divergence"] < 1e-6
        and chosen["validation_images"] == len(images.validation)
    )


def test_the_divergence_that_chooses_an_int8_file_counts_every_probability():
    from headstart.edge.export import mean_divergence

    expected = np.array([[0.9, 0.1], [0.6, 0.4]])
    assert mean_divergence(expected, expected) == pytest.approx(0.0, abs=1e-6)
    # The same decisions, moved probabilities: no disagreement, yet a divergence.
    moved = np.array([[0.8, 0.2], [0.55, 0.45]])
    by_hand = np.mean(
        [0.9 * np.log(0.9 / 0.8) + 0.1 * np.log(0.1 / 0.2), 0.6 * np.log(0.6 / 0.55) + 0.4 * np.log(0.4 / 0.45)]
    )
    assert mean_divergence(expected, moved) == pytest.approx(by_hand, rel=1e-4)
    assert (
        mean_divergence(expected, np.array([[1.0, 0.0], [0.6, 0.4]])) > 0
    )  # an int8 probability of exactly 0 stays finite


def test_export_records_keep_and_show_what_the_dicts_before_them_did(tmp_path):
    """The exports of a run's metrics.json and its model card as the code before typed records wrote
    them (tests/fixtures/exports_before_records.json, with the table rows and summary lines it made,
    and int8 records of earlier versions): read into records, they are written back byte for byte,
    and give the same summary lines, table rows and model card."""
    from headstart.edge import ExportRecord, export_rows
    from headstart.edge.export import CARD_SECTION, card_section, card_with_exports
    from headstart.infra.storage import write_json_atomic

    before = json.loads((FIXTURES / "exports_before_records.json").read_text())
    records = {quantize: ExportRecord.from_dict(written) for quantize, written in before["exports"].items()}

    def as_written(exports: dict) -> bytes:
        return write_json_atomic(tmp_path / "metrics.json", {"exports": exports}).read_bytes()

    assert as_written({quantize: record.to_dict() for quantize, record in records.items()}) == as_written(
        before["exports"]
    )
    assert [record.summary for record in records.values()] == [
        written["summary"] for written in before["exports"].values()
    ]
    assert export_rows([records["none"], records["int8"]]) == before["rows"]
    card, float32 = before["model_card"], records["none"]
    trained = card.partition(f"\n{CARD_SECTION}\n")[0]
    assert card_with_exports(trained, [float32, records["int8"]]) == card  # a first export
    assert card_with_exports(card, [records["int8"], float32]) == card  # an export again
    for older in before["older_int8_records"]:
        record = ExportRecord.from_dict(older["record"])
        assert as_written(record.to_dict()) == as_written({**older["record"], "summary": record.summary}), older["name"]
        assert card_section([float32, record]) == older["card_section"], older["name"]
        assert export_rows([float32, record]) == older["rows"], older["name"]
        assert record.summary == older.get("summary", record.summary), older["name"]
