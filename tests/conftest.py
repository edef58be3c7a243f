"""Shared fixtures: small generated images, a tiny stand-in backbone, a local HTTP server, the
Prefect test harness, and extraction of a whole manifest through the steps the flow composes."""

from __future__ import annotations

import functools
import http.server
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

warnings.filterwarnings("ignore", message="pkg_resources is deprecated")

FIXTURES = Path(__file__).parent / "fixtures"


def pytest_addoption(parser):
    parser.addoption(
        "--refresh-docs",
        action="store_true",
        help="keep the end-to-end test's dashboard screenshots in docs/ (dashboard-*.png)",
    )


def write_class_images(
    root: Path, class_colours: dict[str, tuple[int, int, int]], per_class: int, size: int = 32, seed: int = 0
) -> Path:
    """Noisy images whose dominant colour is their class: easy to learn, all distinct."""
    generator = np.random.default_rng(seed)
    for name, colour in class_colours.items():
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            noise = generator.integers(-60, 60, (size, size, 3))
            pixels = np.clip(np.array(colour)[None, None, :] + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{index:03d}.png")
    return root


class RunsACommand:
    """Pickled, an object that runs a shell command when unpickled: what a crafted pickle carries."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        import os

        return (os.system, (self.command,))


@pytest.fixture
def colour_folder(tmp_path) -> Path:
    return write_class_images(tmp_path / "data", {"red": (200, 40, 40), "blue": (40, 40, 200)}, per_class=24)


@pytest.fixture(scope="session")
def tiny_backbone_dir(tmp_path_factory) -> Path:
    """A small convolutional feature extractor exported exactly like the bundled backbone."""
    from headstart.backbone.hub_module import export_hub_module
    from headstart.infra.keras import keras

    inputs = keras.Input((None, None, 3))
    x = keras.layers.Conv2D(
        8, 3, strides=2, activation="relu", kernel_initializer=keras.initializers.GlorotUniform(seed=1)
    )(inputs)
    x = keras.layers.Conv2D(16, 3, activation="relu", kernel_initializer=keras.initializers.GlorotUniform(seed=2))(x)
    features = keras.layers.GlobalAveragePooling2D()(x)
    network = keras.Model(inputs, features)
    return export_hub_module(network, 32, tmp_path_factory.mktemp("backbones") / "tiny")


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def serve_directory():
    """Serves a directory on 127.0.0.1 and returns its base URL; stopped after the test."""
    servers = []

    def start(directory: Path, handler_class=_QuietHandler) -> str:
        handler = functools.partial(handler_class, directory=str(directory))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect server (SQLite) for every test that runs a flow in this process."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def extract_dataset(manifest, backbone, context, shard_size: int = 1024, progress=None, **assemble_options):
    """Features of every image of the manifest through the public steps the train flow composes:
    plan the shards, extract each within the context, assemble the dataset's file."""
    from headstart.features.dataset import assemble_features, plan_extraction

    shards = plan_extraction(manifest, backbone, context.cache_dir, shard_size)
    engine = "cache"
    for shard in shards:
        engine = context.extract_shard(shard, backbone, progress).engine
    return assemble_features(manifest, backbone, context.cache_dir, sum(map(len, shards)), engine, **assemble_options)


@pytest.fixture(scope="session")
def moto_endpoint(tmp_path_factory):
    """moto's S3 server, one for the session (tests.object_stores)."""
    from tests.object_stores import moto_server

    with moto_server(tmp_path_factory.mktemp("moto")) as endpoint:
        yield endpoint


@pytest.fixture
def s3_bucket(moto_endpoint, monkeypatch, tmp_path, request) -> str:
    """A new bucket on the moto server, reachable through the standard AWS variables, with this
    machine's cache (copies of what is read from a store) in a temporary folder; its s3:// URL."""
    import re
    import secrets

    from tests.object_stores import make_bucket, use_store

    use_store(monkeypatch, moto_endpoint)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "machine-cache"))
    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-") + "-" + secrets.token_hex(3)
    return make_bucket(moto_endpoint, name)
