"""Shared fixtures: small generated images, a tiny stand-in backbone, a local HTTP server."""

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


def write_class_images(root: Path, class_colours: dict[str, tuple[int, int, int]], per_class: int, size: int = 32, seed: int = 0) -> Path:
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


@pytest.fixture
def colour_folder(tmp_path) -> Path:
    return write_class_images(tmp_path / "data", {"red": (200, 40, 40), "blue": (40, 40, 200)}, per_class=24)


@pytest.fixture(scope="session")
def tiny_backbone_dir(tmp_path_factory) -> Path:
    """A small convolutional feature extractor exported exactly like the bundled backbone."""
    from headstart.mobilenet import export_hub_module
    from headstart.keras import keras

    inputs = keras.Input((None, None, 3))
    x = keras.layers.Conv2D(8, 3, strides=2, activation="relu", kernel_initializer=keras.initializers.GlorotUniform(seed=1))(inputs)
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
