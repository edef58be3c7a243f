"""Attacks through a run's model files: a model.keras that would run code as it loads (an HDF5 file
or a zip .keras holding a Lambda layer), a damaged model.keras or saved_model.pb, class names
that disagree with the model. Each is met by one `headstart: error:` line and exit code 2 in
predict, evaluate, export and the gate, and the Lambda's code never runs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from configs import smoke_config
from conftest import write_class_images

from flows.cli import main
from headstart.config import TrainConfig
from headstart.registry import versions as registry
from headstart.registry.runs import BACKBONE_DIR, CLASS_NAMES_FILE, MODEL_FILE, SERVING_DIR, Run

# The attack files are HDF5 on purpose: the format Keras warns about is the one that runs code.
pytestmark = pytest.mark.filterwarnings("ignore:You are saving your model as an HDF5 file")


def _config(folder: Path, backbone_dir: Path, root: Path, **overrides) -> TrainConfig:
    values = dict(epochs=5, batch_size=8, test_fraction=0.25, gate=False)
    return smoke_config(
        folder,
        backbone_dir,
        root,
        **{**values, **overrides},
    )


@pytest.fixture(scope="module")
def colours(tmp_path_factory) -> Path:
    return write_class_images(
        tmp_path_factory.mktemp("colours") / "data", {"red": (200, 40, 40), "blue": (40, 40, 200)}, per_class=16
    )


@pytest.fixture(scope="module")
def trained(prefect_harness, colours, tiny_backbone_dir, tmp_path_factory) -> tuple[Run, Path]:
    """A real run of the flow, and the cache its features are in."""
    from flows.train import train

    config = _config(colours, tiny_backbone_dir, tmp_path_factory.mktemp("trained"))
    return Run(train(**config.flat())), config.runtime.cache_dir


def _lambda_model(marker: Path):
    """A model whose Lambda layer creates `marker` when it is built, as loading it builds it."""
    from headstart.infra.keras import keras
    from headstart.training.head import HEAD_DENSE, HEAD_DROPOUT

    # The marker's path is a constant of the function's own code, so it survives Keras' serialisation.
    touch = eval(f"lambda x: (__import__('pathlib').Path({str(marker)!r}).touch(), x)[1]")
    # Shaped like a head on the tiny backbone's 16 features, so that a loader that trusts it goes on.
    features = keras.Input((16,), name="features")
    dropped = keras.layers.Dropout(0.2, name=HEAD_DROPOUT)(keras.layers.Lambda(touch)(features))
    return keras.Model(features, keras.layers.Dense(2, activation="softmax", name=HEAD_DENSE)(dropped))


def _hostile_model_file(kind: str, destination: Path, marker: Path) -> Path:
    """A model file in `kind` (hdf5 or zip) holding a Lambda layer, written to `destination`."""
    model = _lambda_model(marker)
    saved = destination.with_name(f"saved.{'h5' if kind == 'hdf5' else 'keras'}")
    model.save(saved)
    marker.unlink(missing_ok=True)  # building the model to save it ran the Lambda once
    saved.replace(destination)
    return destination


@pytest.fixture
def hostile_registry(trained, tmp_path):
    """A registry whose champion is a copy of the trained run with a model.keras of another kind."""

    def make(kind: str) -> tuple[Run, Path, Path]:
        root = tmp_path / "artifacts"
        run = Run(shutil.copytree(trained[0].path, root / trained[0].path.name))
        marker = tmp_path / f"marker-{kind}"
        if kind in ("hdf5", "zip"):
            _hostile_model_file(kind, run.path / MODEL_FILE, marker)
        registry.promote(root, run.path.name, "the attack's champion")
        return run, root, marker

    return make


def _one_error_line(capsys, code: int) -> str:
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err, captured.err
    errors = [line for line in captured.err.splitlines() if line.startswith("headstart: error:")]
    assert code == 2 and len(errors) == 1, captured.err
    return errors[0]


@pytest.mark.parametrize("kind", ["hdf5", "zip"])
def test_the_crafted_model_files_run_their_code_when_keras_loads_them(kind, tmp_path):
    """The attack files are real: Keras' own loader runs their Lambda (the zip one once safe_mode is off)."""
    from headstart.infra.keras import keras

    marker = tmp_path / "marker"
    path = _hostile_model_file(kind, tmp_path / "model.keras", marker)
    assert not marker.exists()
    keras.models.load_model(path, safe_mode=False)
    assert marker.exists()


COMMANDS = ["predict", "evaluate", "export"]


def _command(command: str, run: Run, root: Path, colours: Path, cache: Path) -> list[str]:
    places = ["--artifacts-root", str(root), "--cache-dir", str(cache)]
    return {
        "predict": ["predict", "--model", str(run.path), str(colours / "red"), *places],
        "evaluate": ["evaluate", "--model", str(run.path), "--data", str(colours)],
        "export": ["export", "--model", str(run.path), *places],
    }[command]


@pytest.mark.parametrize("kind", ["hdf5", "zip"])
@pytest.mark.parametrize("command", COMMANDS)
def test_a_model_file_with_a_lambda_layer_runs_no_code(command, kind, trained, hostile_registry, colours, capsys):
    """A run directory whose model.keras holds a Keras Lambda layer (HDF5 or zip) runs no code."""
    run, root, marker = hostile_registry(kind)
    before = sorted(path.name for path in run.path.rglob("*"))
    line = _one_error_line(capsys, main(_command(command, run, root, colours, trained[1])))
    assert str(run.path / MODEL_FILE) in line and "refusing" in line
    assert not marker.exists()
    assert sorted(path.name for path in run.path.rglob("*")) == before


@pytest.mark.parametrize("kind", ["hdf5", "zip"])
def test_the_gate_refuses_a_champion_whose_model_file_holds_a_lambda_layer(
    kind, trained, hostile_registry, colours, tiny_backbone_dir, capsys
):
    """The gate of a train whose champion's model.keras holds a Lambda layer (HDF5 or zip) runs no code."""
    run, root, marker = hostile_registry(kind)
    # Another seed: a new training, not a reuse of the champion's own.
    code = main(
        [
            "train",
            *("--data", str(colours), "--backbone", str(tiny_backbone_dir), "--image-size", "32"),
            *("--epochs", "2", "--test-fraction", "0.25", "--seed", "1"),
            *("--artifacts-root", str(root), "--cache-dir", str(root.parent / "fresh-cache")),
        ]
    )
    line = _one_error_line(capsys, code)
    assert str(run.path / MODEL_FILE) in line and not marker.exists()
    assert registry.champion(root).path.name == run.path.name
    # Refused before any work: no image scanned, no feature extracted, no run written.
    assert not list((root.parent / "fresh-cache").rglob("*.*"))
    assert {path.name for path in root.iterdir()} == {"registry", run.path.name}


def _damage(run: Run, damage: str) -> Path:
    """Damages one file of the run as the attack says; returns the file."""
    if damage == "garbage model.keras":
        (run.path / MODEL_FILE).write_bytes(b"\x00garbage" * 64)
        return run.path / MODEL_FILE
    if damage == "truncated model.keras":
        data = (run.path / MODEL_FILE).read_bytes()
        (run.path / MODEL_FILE).write_bytes(data[: len(data) // 2])
        return run.path / MODEL_FILE
    if damage == "garbage backbone saved_model.pb":
        (run.path / BACKBONE_DIR / "saved_model.pb").write_bytes(b"\x00garbage" * 64)
        return run.path / BACKBONE_DIR
    names = json.loads((run.path / CLASS_NAMES_FILE).read_text())
    changed = names + ["green"] if damage == "more class names" else names[:1]
    (run.path / CLASS_NAMES_FILE).write_text(json.dumps(changed))
    return run.path / CLASS_NAMES_FILE


DAMAGES = ["garbage model.keras", "truncated model.keras", "more class names", "fewer class names"]


@pytest.mark.parametrize("damage", DAMAGES + ["garbage backbone saved_model.pb"])
@pytest.mark.parametrize("command", ["predict", "evaluate"])
def test_a_champion_with_a_damaged_model_is_one_line(command, damage, trained, hostile_registry, colours, capsys):
    """A champion whose model.keras or saved_model.pb is garbage, or whose class_names.json disagrees
    with its model."""
    run, root, _ = hostile_registry("intact")
    damaged = _damage(run, damage)
    arguments = _command(command, run, root, colours, trained[1])
    if command == "predict":
        arguments[arguments.index("--model") + 1] = "champion"
        # A fresh cache: the LiteRT model converted from the intact backbone would stand in for it.
        arguments[-1] = str(root.parent / "fresh-cache")
    line = _one_error_line(capsys, main(arguments))
    assert str(damaged) in line or (damage.endswith("class names") and str(run.path / MODEL_FILE) in line)


def test_a_champion_whose_serving_model_is_garbage_still_predicts_and_evaluates(
    trained, hostile_registry, colours, capsys
):
    """A champion whose saved_model.pb is garbage: predict and evaluate never load the serving
    SavedModel, and loading it on request is one line naming the file."""
    from headstart.errors import HeadstartError

    run, root, _ = hostile_registry("intact")
    (run.path / SERVING_DIR / "saved_model.pb").write_bytes(b"\x00garbage" * 64)
    for command in ("predict", "evaluate"):
        assert main(_command(command, run, root, colours, trained[1])) == 0
    assert "Traceback" not in capsys.readouterr().err
    with pytest.raises(HeadstartError, match=str(run.path / SERVING_DIR / "saved_model.pb")):
        run.serving_model()


def test_the_gate_refuses_a_champion_whose_model_file_is_garbage(
    trained, hostile_registry, colours, tiny_backbone_dir, capsys
):
    """A champion whose model.keras is garbage, met by train's gate."""
    run, root, _ = hostile_registry("intact")
    damaged = _damage(run, "garbage model.keras")
    code = main(
        [
            "train",
            *("--data", str(colours), "--backbone", str(tiny_backbone_dir), "--image-size", "32"),
            *("--epochs", "2", "--test-fraction", "0.25", "--seed", "2"),
            *("--artifacts-root", str(root), "--cache-dir", str(root.parent / "fresh-cache")),
        ]
    )
    assert str(damaged) in _one_error_line(capsys, code)
    assert not list((root.parent / "fresh-cache").rglob("*.*"))
    assert registry.champion(root).path.name == run.path.name


@pytest.fixture
def small_bounds(monkeypatch):
    """The huge-image bounds scaled down, so that a small file takes the path a 100-megapixel one takes."""
    from headstart.data import images

    monkeypatch.setattr(images, "HUGE_PIXELS", 100_000)
    monkeypatch.setattr(images, "REDUCED_PIXELS", 20_000)
    return images


def _gradient(width: int, height: int) -> np.ndarray:
    x, y = np.meshgrid(np.linspace(0, 255, width), np.linspace(0, 255, height))
    return np.stack([x, y, 255 - x], axis=-1).astype(np.uint8)


@pytest.mark.parametrize(
    "suffix, mode", [(".png", "RGB"), (".png", "RGBA"), (".png", "P"), (".png", "I;16"), (".jpg", "RGB")]
)
def test_a_huge_image_is_decoded_within_bounds(suffix, mode, small_bounds, tmp_path):
    """Peak memory for one 100-megapixel image: a huge image is shrunk while it is decoded, to at
    most REDUCED_PIXELS, its aspect and its colours kept."""
    from PIL import Image

    pixels = _gradient(600, 400)
    if mode == "I;16":
        image = Image.fromarray(pixels[..., 0].astype(np.uint16) * 257)
    else:
        image = Image.fromarray(pixels).convert(mode)
    image.save(tmp_path / f"huge{suffix}")
    decoded = small_bounds.load_image(tmp_path / f"huge{suffix}")
    assert decoded.dtype == np.uint8 and decoded.shape[2] == 3
    assert decoded.shape[0] * decoded.shape[1] <= 20_000 and abs(decoded.shape[1] / decoded.shape[0] - 1.5) < 0.05
    # Block averages of a gradient are the gradient's values at the block centres.
    expected = np.asarray(Image.fromarray(pixels).resize(decoded.shape[1::-1], Image.Resampling.BOX).convert("RGB"))
    channels = [0] if mode == "I;16" else [0, 1, 2]
    tolerance = 12 if mode in ("P",) or suffix == ".jpg" else 2
    assert np.abs(decoded[..., channels].astype(int) - expected[..., channels]).mean() <= tolerance


def test_a_huge_jpeg_keeps_its_exif_rotation(small_bounds, tmp_path):
    """Peak memory for one 100-megapixel image: a huge JPEG decoded at a reduced scale still turns
    as its EXIF orientation says."""
    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: shown turned a quarter clockwise
    Image.fromarray(_gradient(600, 400)).save(tmp_path / "turned.jpg", exif=exif)
    decoded = small_bounds.load_image(tmp_path / "turned.jpg")
    assert decoded.shape[0] > decoded.shape[1] and decoded.shape[0] * decoded.shape[1] <= 20_000
    assert small_bounds.check_image(tmp_path / "turned.jpg") is None


def test_an_image_below_the_bound_decodes_exactly_as_before(tmp_path):
    """Peak memory for one 100-megapixel image: the bound changes nothing below it."""
    from PIL import Image, ImageOps

    from headstart.data.images import load_image

    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(_gradient(600, 400)).save(tmp_path / "photo.jpg", exif=exif)
    with Image.open(tmp_path / "photo.jpg") as image:
        expected = np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
    np.testing.assert_array_equal(load_image(tmp_path / "photo.jpg"), expected)


def test_a_model_file_that_unpacks_to_more_than_any_model_is_refused_unread(trained, monkeypatch):
    """A model.keras whose entries unpack to more than any model's weights is refused before it is read."""
    from headstart.errors import HeadstartError
    from headstart.registry import model_file

    monkeypatch.setattr(model_file, "MAX_ENTRY_BYTES", 100)
    with pytest.raises(HeadstartError, match="refusing to load .*model.keras: its config.json unpacks to"):
        trained[0].head_weights()
