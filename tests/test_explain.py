"""Where the model looked: the backbone's feature map, class activation maps, Grad-CAM, the overlays,
`headstart explain`."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from headstart.backbone.handles import Backbone
from headstart.errors import HeadstartError
from headstart.evaluation.attention import (
    centred_logits,
    class_activation_maps,
    evidence_maps,
    explain_images,
    feature_map_function,
    grad_cam,
    heatmap,
    overlay,
)

SIZE, PATCH = 32, 8


def _backbone(module_dir, handle="test") -> Backbone:
    return Backbone(handle=handle, module_path=module_dir, fingerprint="0" * 16, image_size=SIZE)


def _tiny_network(padding: str = "valid"):
    """Two random convolutions and global pooling; with 'same' padding each map cell sits over
    the pixels it sees, as in MobileNetV2, which pads symmetrically."""
    from headstart.infra.keras import keras

    inputs = keras.Input((None, None, 3))
    x = keras.layers.Conv2D(
        8, 3, 2, padding, activation="relu", kernel_initializer=keras.initializers.GlorotUniform(seed=1)
    )(inputs)
    x = keras.layers.Conv2D(
        16, 3, 1, padding, activation="relu", kernel_initializer=keras.initializers.GlorotUniform(seed=2)
    )(x)
    return keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x))


@pytest.fixture(scope="module")
def mirrored_backbone_dir(tmp_path_factory):
    from headstart.backbone.hub_module import export_hub_module

    return export_hub_module(_tiny_network(), SIZE, tmp_path_factory.mktemp("backbones") / "mirrored", True)


@pytest.mark.parametrize("mirrored", [False, True])
def test_the_feature_map_averages_to_the_pooled_features(tiny_backbone_dir, mirrored_backbone_dir, mirrored):
    """The map is the one global pooling averages, mirror averaging included: an image of another
    size, resized inside, and not symmetric, so that a map not flipped back would show."""
    from headstart.infra.keras import tf

    module_dir = mirrored_backbone_dir if mirrored else tiny_backbone_dir
    images = np.random.default_rng(0).random((2, 45, 37, 3)).astype(np.float32)
    maps = feature_map_function(_backbone(module_dir))(images)
    assert maps.shape == (2, 13, 13, 16)
    pooled = tf.saved_model.load(str(module_dir))(tf.constant(images)).numpy()
    np.testing.assert_allclose(maps.mean(axis=(1, 2)), pooled, atol=1e-6)
    flipped = feature_map_function(_backbone(module_dir))(images[:, :, ::-1])
    if mirrored:  # the mirror image's map is the map mirrored
        np.testing.assert_allclose(flipped, maps[:, :, ::-1], atol=1e-5)
    else:
        assert np.abs(flipped - maps[:, :, ::-1]).max() > 1e-2


def test_a_fine_tuned_backbone_exposes_its_last_feature_map(tmp_path):
    """MobileNetV2's map before pooling (1280 channels, 1/32 of the side) in the module fine-tuning
    exports, mirror-averaged (the bundled module is exported by the same function, unmirrored)."""
    from headstart.backbone.handles import BUNDLED_HANDLE
    from headstart.infra.keras import tf
    from headstart.training.fine_tuning import SplitBackbone

    # Cutting needs only the bundled checkpoint: the converted module itself is never read.
    split = SplitBackbone(Backbone(BUNDLED_HANDLE, tmp_path / "unused", "0" * 16, 64), 16)
    tuned = split.export(tmp_path / "tuned", "tuned", mirror_average=True)
    images = np.random.default_rng(1).random((2, 50, 70, 3)).astype(np.float32)
    maps = feature_map_function(tuned)(images)
    assert maps.shape == (2, 2, 2, 1280)
    pooled = tf.saved_model.load(str(tuned.module_path))(tf.constant(images)).numpy()
    np.testing.assert_allclose(maps.mean(axis=(1, 2)), pooled, atol=1e-5 * np.abs(pooled).max())


def test_a_module_without_a_feature_map_is_a_one_line_error(tmp_path):
    from headstart.backbone.hub_module import export_hub_module
    from headstart.infra.keras import keras

    inputs = keras.Input((SIZE, SIZE, 3))
    flat = keras.Model(inputs, keras.layers.Flatten()(keras.layers.AveragePooling2D(8)(inputs)))
    module_dir = export_hub_module(flat, SIZE, tmp_path / "flat")
    with pytest.raises(HeadstartError, match=r"^backbone https://x \(.*\) has no feature map: only headstart's own"):
        feature_map_function(_backbone(module_dir, "https://x"))


# --- a class decided by one patch ----------------------------------------------------------------


def _patch_images(count: int, seed: int, labels=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Grey noisy images; those of class 1 ('patch') have one red 8×8 patch at a random place,
    those of class 0 ('plain') none: the patch alone decides the class. Returns images
    [n, 32, 32, 3] in [0, 1], labels and each image's patch's top-left corner."""
    generator = np.random.default_rng(seed)
    images = np.clip(0.5 + generator.normal(0, 0.08, (count, SIZE, SIZE, 3)), 0, 1)
    labels = generator.integers(0, 2, count) if labels is None else np.asarray(labels)
    corners = generator.integers(0, SIZE - PATCH + 1, (count, 2))
    for image, label, (top, left) in zip(images, labels, corners):
        if label:
            image[top : top + PATCH, left : left + PATCH] = (0.9, 0.1, 0.1)
    return images.astype(np.float32), labels, corners


@pytest.fixture(scope="module")
def patch_model(tmp_path_factory):
    """A tiny backbone and a Dropout → Dense head trained (as headstart trains heads) on its
    features of patch images: (backbone, classifier, kernel, bias)."""
    from headstart.backbone.hub_module import export_hub_module
    from headstart.infra.keras import tf
    from headstart.training.head import HEAD_DENSE, build_classifier, train_head

    module_dir = export_hub_module(_tiny_network("same"), SIZE, tmp_path_factory.mktemp("backbones") / "same")
    backbone = _backbone(module_dir)
    images, labels, _ = _patch_images(400, seed=1)
    features = tf.saved_model.load(str(module_dir))(tf.constant(images)).numpy()
    classifier = build_classifier(backbone.keras_layer(), 2, SIZE, 0.0, seed=0)
    train_head(classifier, (features, labels), None, 60, 32, 0.05, 5, seed=0)
    kernel, bias = classifier.get_layer(HEAD_DENSE).get_weights()
    return backbone, classifier, kernel, bias


def test_the_map_of_the_predicted_class_lights_the_patch_that_decides_it(patch_model, tmp_path):
    """Wherever the patch lies, the overlay's hottest pixel lies on it."""
    backbone, _, kernel, bias = patch_model
    images, labels, corners = _patch_images(30, seed=2, labels=[1] * 30)
    paths = []
    for index, image in enumerate(images):
        paths.append(tmp_path / f"{index}.png")
        Image.fromarray(np.round(image * 255).astype(np.uint8)).save(paths[-1])
    explanations = explain_images(feature_map_function(backbone), kernel, bias, paths)
    assert np.mean([explanation.predicted for explanation in explanations] == labels) >= 0.95
    on_patch = []
    for explanation, (top, left) in zip(explanations, corners):
        assert explanation.heat.shape == (16, 16) and explanation.heat.max() == 1.0
        stretched = np.asarray(
            Image.fromarray(explanation.heat.astype(np.float32), mode="F").resize((SIZE, SIZE), Image.BILINEAR)
        )
        row, column = np.unravel_index(np.argmax(stretched), stretched.shape)
        on_patch.append(top - 1 <= row <= top + PATCH and left - 1 <= column <= left + PATCH)
    # An 8×8 patch (with a pixel of margin) is a tenth of the image: chance would hit it 1 time in 10.
    assert np.mean(on_patch) >= 0.9


def test_the_class_activation_map_averages_to_the_head_logit(patch_model):
    from headstart.training.head import predict_from_features

    backbone, classifier, kernel, bias = patch_model
    images, _, _ = _patch_images(8, seed=3)
    maps = feature_map_function(backbone)(images)
    cams = class_activation_maps(maps, kernel, bias)
    logits = maps.mean(axis=(1, 2)) @ kernel + bias
    np.testing.assert_allclose(cams.mean(axis=(1, 2)), logits, rtol=1e-6, atol=1e-6)
    probabilities = predict_from_features(classifier, maps.mean(axis=(1, 2)))
    softmax = np.exp(logits - logits.max(axis=1, keepdims=True))
    np.testing.assert_allclose(softmax / softmax.sum(axis=1, keepdims=True), probabilities, atol=1e-5)
    # What `evidence_maps` shows is the CAM less the mean of every class's CAM, less the bias.
    np.testing.assert_allclose(
        evidence_maps(maps, kernel), cams - cams.mean(axis=-1, keepdims=True) - (bias - bias.mean()), atol=1e-5
    )


def test_grad_cam_of_the_linear_head_is_the_positive_part_of_its_map_rescaled(patch_model):
    """For a Dense head on pooled maps, Grad-CAM is ReLU of the class activation map (without its
    bias) times 1 / (h · w): the same heatmap once scaled to its peak."""
    from headstart.infra.keras import tf

    backbone, _, kernel, bias = patch_model
    images, labels, _ = _patch_images(6, seed=4)
    maps = feature_map_function(backbone)(images)
    cells = maps.shape[1] * maps.shape[2]
    gradient_maps = grad_cam(maps, centred_logits(kernel, bias), labels)
    evidence = np.take_along_axis(evidence_maps(maps, kernel), labels[:, None, None, None], axis=-1)[..., 0]
    np.testing.assert_allclose(gradient_maps * cells, np.maximum(evidence, 0), atol=1e-4)
    for gradient_map, image_evidence in zip(gradient_maps, evidence):
        np.testing.assert_allclose(heatmap(gradient_map), heatmap(image_evidence), atol=1e-4)
    # The same holds for the plain logit and its CAM without the bias.
    raw = grad_cam(maps, lambda pooled: pooled @ tf.constant(kernel) + tf.constant(bias), labels)
    cams = np.take_along_axis(class_activation_maps(maps, kernel, bias * 0), labels[:, None, None, None], -1)[..., 0]
    np.testing.assert_allclose(raw * cells, np.maximum(cams, 0), atol=1e-4)
    # A head that is not linear: Grad-CAM still localises through its gradient (nothing to compare exactly).
    squared = grad_cam(maps, lambda pooled: tf.square(pooled @ tf.constant(kernel)), labels)
    assert squared.shape == maps.shape[:3] and np.isfinite(squared).all()


def test_the_overlay_keeps_the_image_where_the_map_is_cold_and_colours_it_where_hot():
    image = np.full((32, 32, 3), 128, np.uint8)
    heat = np.zeros((4, 4))
    heat[0, 0] = 1.0
    blended = overlay(image, heat, side=64)
    assert blended.shape == (64, 64, 3)
    np.testing.assert_array_equal(blended[-1, -1], [128, 128, 128])
    assert np.abs(blended[0, 0].astype(int) - 128).max() > 40


# --- headstart explain ------------------------------------------------------------------------------


@pytest.fixture
def patch_run(patch_model, tmp_path):
    """A run directory holding the patch model: what `headstart explain --model RUN` reads."""
    backbone, classifier, _, _ = patch_model
    run = tmp_path / "artifacts" / "20261204-000000-patch"
    run.mkdir(parents=True)
    shutil.copytree(backbone.module_path, run / "backbone")
    classifier.save(run / "model.keras")
    (run / "class_names.json").write_text(json.dumps(["plain", "patch"]))
    (run / "metrics.json").write_text("{}")
    (run / "config.json").write_text(
        json.dumps({"image_size": SIZE, "backbone": "test", "backbone_fingerprint": backbone.fingerprint})
    )
    return run


def test_explain_writes_one_overlay_per_image_titled_with_the_prediction(patch_run, tmp_path, capsys):
    from flows.cli import main

    images, _, _ = _patch_images(2, seed=5)
    for folder, image in zip(("a", "b"), images):
        (tmp_path / folder).mkdir()
        Image.fromarray(np.round(image * 255).astype(np.uint8)).save(tmp_path / folder / "same.png")
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    given = [str(tmp_path / "a" / "same.png"), str(tmp_path / "b" / "same.png"), str(tmp_path / "broken.jpg")]
    output = tmp_path / "overlays"
    assert main(["explain", *given, "--model", str(patch_run), "--output", str(output)]) == 0
    written = sorted(path.name for path in output.iterdir())
    assert written == ["same-2.cam.png", "same.cam.png"]
    assert all((output / name).read_bytes().startswith(b"\x89PNG") for name in written)
    out, err = capsys.readouterr()
    assert f"headstart: skipped {tmp_path / 'broken.jpg'}: cannot decode" in err
    lines = [line.split("\t") for line in out.splitlines()]
    assert [line[0] for line in lines] == given[:2] and {line[1] for line in lines} <= {"plain", "patch"}
    assert [line[3] for line in lines] == [str(output / "same.cam.png"), str(output / "same-2.cam.png")]
    # A run trained with a confidence threshold: below it, the label is 'unsure', as predict says it.
    first, second = sorted(float(line[2]) for line in lines)
    assert first < second
    (patch_run / "metrics.json").write_text(json.dumps({"unsure": {"threshold": (first + second) / 2}}))
    assert main(["explain", *given[:2], "--model", str(patch_run), "--output", str(output)]) == 0
    labels = {float(line.split("\t")[2]): line.split("\t")[1] for line in capsys.readouterr().out.splitlines()}
    assert labels[first] == "unsure" and labels[second] != "unsure"


def test_explain_says_in_one_line_what_it_cannot_explain(patch_run, tmp_path, capsys):
    from flows.cli import main

    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    assert main(["explain", str(tmp_path / "broken.jpg"), "--model", str(patch_run)]) == 2
    assert "headstart: error: no image to explain in" in capsys.readouterr().err
    assert main(["explain", str(tmp_path / "broken.jpg"), "--model", "model.tflite"]) == 2
    assert "headstart: error: a .tflite file" in capsys.readouterr().err
    images, _, _ = _patch_images(1, seed=6)
    Image.fromarray(np.round(images[0] * 255).astype(np.uint8)).save(tmp_path / "fine.png")
    (tmp_path / "a-file").write_text("")
    assert (
        main(["explain", str(tmp_path / "fine.png"), "--model", str(patch_run), "--output", str(tmp_path / "a-file")])
        == 2
    )
    assert "headstart: error: --output" in capsys.readouterr().err
    model_file = (patch_run / "model.keras").read_bytes()
    (patch_run / "model.keras").write_bytes(b"not the zip headstart writes")
    assert main(["explain", str(tmp_path / "fine.png"), "--model", str(patch_run)]) == 2
    assert "refusing to load" in capsys.readouterr().err
    (patch_run / "model.keras").write_bytes(model_file)
    shutil.rmtree(patch_run / "backbone")
    from headstart.backbone.hub_module import export_hub_module
    from headstart.infra.keras import keras

    inputs = keras.Input((SIZE, SIZE, 3))
    export_hub_module(keras.Model(inputs, keras.layers.Flatten()(inputs)), SIZE, patch_run / "backbone")
    assert main(["explain", str(tmp_path / "fine.png"), "--model", str(patch_run)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("headstart: error: backbone test") and "only headstart's own backbones" in error
    assert len(error.strip().splitlines()) == 1
