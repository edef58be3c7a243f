"""The bundled MobileNetV2 against torch's own outputs, and every way of naming a backbone."""

import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from conftest import FIXTURES

from headstart.backbone.checkpoint import read_legacy_checkpoint
from headstart.backbone.handles import (
    BUNDLED_HANDLE,
    CHECKPOINT_SHA256_PREFIX,
    Backbone,
    bundled_checkpoint_path,
    resolve_backbone,
)
from headstart.backbone.mobilenet import (
    HEAD,
    build_mobilenet_v2,
    build_mobilenet_v2_split,
    channels_into,
    imagenet_classifier,
)
from headstart.data.preprocessing import resize_images
from headstart.errors import HeadstartError
from headstart.infra.downloads import DownloadPolicy

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def reference():
    return dict(np.load(FIXTURES / "mobilenet_v2_torchvision_reference.npz"))


@pytest.fixture(scope="module")
def state():
    return read_legacy_checkpoint(bundled_checkpoint_path(), CHECKPOINT_SHA256_PREFIX)


@pytest.fixture(scope="module")
def bundled_224(tmp_path_factory):
    return resolve_backbone(BUNDLED_HANDLE, 224, tmp_path_factory.mktemp("cache"))


def test_keras_conversion_matches_torchvision(reference, state):
    network = build_mobilenet_v2(state)
    features = network(reference["inputs_normalized"], training=False).numpy()
    assert np.abs(features - reference["features"]).max() <= TOLERANCE
    kernel, bias = imagenet_classifier(state)
    assert np.abs(features @ kernel + bias - reference["logits"]).max() <= TOLERANCE


@pytest.mark.parametrize("cut", [1, 7, 14, HEAD])
def test_the_network_cut_in_two_computes_what_the_whole_computes(reference, state, cut):
    """The lower part's activations, fed to the upper part, give the whole network's features:
    what lets fine-tuning train the top stages on activations computed once."""
    lower, upper = build_mobilenet_v2_split(state, cut)
    activations = lower(reference["inputs_normalized"], training=False)
    assert activations.shape[-1] == channels_into(cut)
    features = upper(activations, training=False).numpy()
    assert np.abs(features - reference["features"]).max() <= TOLERANCE
    whole = build_mobilenet_v2(state)
    assert len(lower.weights) + len(upper.weights) == len(whole.weights)
    # Every weight of the whole network is in exactly one part, by layer name, bit for bit.
    parts = {weight.name: weight.numpy() for weight in [*lower.weights, *upper.weights]}
    for weight in whole.weights:
        np.testing.assert_array_equal(parts[weight.name], weight.numpy())


@pytest.mark.parametrize("cut", [0, HEAD + 1])
def test_the_network_cannot_be_cut_outside_its_stages(state, cut):
    with pytest.raises(ValueError, match="can be cut before stages 1 to 18"):
        build_mobilenet_v2_split(state, cut)


def test_hub_module_matches_torchvision_features_and_logits(reference, state, bundled_224):
    layer = bundled_224.keras_layer()
    features = layer(reference["inputs_0_1"]).numpy()
    assert features.shape == (2, 1280)
    assert np.abs(features - reference["features"]).max() <= TOLERANCE
    kernel, bias = imagenet_classifier(state)
    logits = features @ kernel + bias
    assert np.abs(logits - reference["logits"]).max() <= TOLERANCE
    np.testing.assert_array_equal(np.argsort(-logits, axis=1)[:, :5], np.argsort(-reference["logits"], axis=1)[:, :5])


def test_hub_module_resizes_any_size_inside(reference, bundled_224):
    layer = bundled_224.keras_layer()
    small = reference["images_uint8_32"].astype(np.float32) / 255.0
    direct = layer(resize_images(small, 224)).numpy()
    assert np.abs(layer(small).numpy() - direct).max() <= 1e-5


def test_hub_module_exposes_its_variables_for_fine_tuning(bundled_224, reference):
    from headstart.infra.keras import tf

    module = tf.saved_model.load(str(bundled_224.module_path))
    # Every convolution's kernel and bias (52 convolutions, BatchNorm folded into them), all trainable.
    assert len(module.trainable_variables) == len(module.variables) == 104
    trainable = bundled_224.keras_layer(trainable=True)
    assert len(trainable.trainable_weights) == 104
    assert not bundled_224.keras_layer(trainable=False).trainable_weights
    with tf.GradientTape() as tape:
        total = tf.reduce_sum(trainable(reference["inputs_0_1"][:1]))
    gradients = tape.gradient(total, trainable.trainable_weights)
    assert all(gradient is not None and float(tf.reduce_max(tf.abs(gradient))) > 0 for gradient in gradients)


def test_export_is_cached_and_fingerprinted(bundled_224, monkeypatch):
    import headstart.backbone.hub_module as hub_module

    monkeypatch.setattr(hub_module, "export_hub_module", lambda *args: pytest.fail("exported again"))
    again = resolve_backbone(BUNDLED_HANDLE, 224, bundled_224.module_path.parents[1])
    assert again.module_path == bundled_224.module_path
    assert again.fingerprint == bundled_224.fingerprint


def test_remote_compressed_module_loads_by_url_into_each_callers_cache(
    tmp_path, bundled_224, serve_directory, reference
):
    archive = tmp_path / "site" / "mobilenet_v2.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        for item in bundled_224.module_path.iterdir():
            tar.add(item, arcname=item.name)
    url = serve_directory(archive.parent) + "/mobilenet_v2.tar.gz"
    environment = dict(os.environ)
    first = resolve_backbone(url, 224, tmp_path / "first-cache")
    second = resolve_backbone(url, 224, tmp_path / "second-cache")
    assert first.module_path.is_relative_to(tmp_path / "first-cache" / "tfhub")
    assert second.module_path.is_relative_to(tmp_path / "second-cache" / "tfhub")
    assert dict(os.environ) == environment  # no TFHUB_CACHE_DIR or anything else left behind
    assert first.fingerprint == second.fingerprint == bundled_224.fingerprint
    features = first.keras_layer()(reference["inputs_0_1"]).numpy()
    assert np.abs(features - reference["features"]).max() <= TOLERANCE


def test_local_savedmodel_directory_is_a_handle(tiny_backbone_dir, tmp_path):
    backbone = resolve_backbone(str(tiny_backbone_dir), 32, tmp_path)
    assert backbone.module_path == tiny_backbone_dir
    assert backbone.keras_layer()(np.zeros((1, 32, 32, 3), np.float32)).shape == (1, 16)


def test_loading_a_hub_layer_does_not_import_keras_3_nor_change_the_environment(tiny_backbone_dir, tmp_path):
    """tensorflow_hub's probe for standalone Keras 2 would import all of Keras 3 (0.3–0.5 s)."""
    code = (
        "import os, sys; from pathlib import Path; environment = dict(os.environ); "
        "from headstart.backbone.handles import resolve_backbone; "
        f"layer = resolve_backbone({str(tiny_backbone_dir)!r}, 32, Path({str(tmp_path)!r})).keras_layer(); "
        "from headstart.infra.keras import tf; "
        "print(type(layer).__module__, 'keras' in sys.modules, dict(os.environ) == environment, "
        "tf.keras.Model.__module__.startswith('tf_keras'))"
    )
    environment = {key: value for key, value in os.environ.items() if key != "TF_USE_LEGACY_KERAS"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=environment)
    assert result.stdout.split() == ["tensorflow_hub.keras_layer", "False", "True", "True"], result.stderr[-2000:]


def test_a_module_that_does_not_load_is_a_one_line_error_where_the_layer_is_needed(tmp_path):
    (tmp_path / "module").mkdir()
    (tmp_path / "module" / "saved_model.pb").write_bytes(b"not a SavedModel")
    backbone = Backbone("broken", tmp_path / "module", "0" * 16, 32)
    with pytest.raises(HeadstartError, match="could not load backbone broken") as raised:
        backbone.keras_layer()
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize(
    "handle, message",
    [
        ("no/such/dir", "neither"),
        ("http://127.0.0.1:9/missing.tar.gz", "could not load backbone"),
    ],
)
def test_bad_handles_are_one_line_errors(handle, message, tmp_path):
    with pytest.raises(HeadstartError, match=message) as raised:
        resolve_backbone(handle, 32, tmp_path, DownloadPolicy(attempts=2, backoff_seconds=0.01))
    assert "\n" not in str(raised.value)


def test_a_folder_that_is_not_a_savedmodel_is_refused(tmp_path):
    with pytest.raises(HeadstartError, match="not a SavedModel"):
        resolve_backbone(str(tmp_path), 32, tmp_path)
