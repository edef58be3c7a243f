"""Extracting a shard of images into the feature cache, within an explicit extraction context.

The context is what the flow owns for one run and passes to every extraction step: the engine
settings, the engines it builds (kept for later shards), and the backbone being loaded into
TensorFlow beside the extraction. Nothing here lives in a module global.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from headstart.backbone.handles import Backbone
from headstart.config import Engine
from headstart.data.preprocessing import apply_to_decoded, decoded_batches
from headstart.features.cache import FeatureCache, Shard
from headstart.features.engines import choose_engine, litert_ready_without_tensorflow

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExtractedShard:
    """What extracting a shard did: the engine that ran, how many images it cached, and the
    images it left out, as (content hash, path, reason): files rewritten or removed since the
    scan hashed them. Their features are never cached under the hash they no longer have."""

    engine: str
    extracted: int
    left_out: tuple[tuple[str, str, str], ...] = ()


@dataclass(frozen=True)
class ExtractionSettings:
    """How the forward pass runs: engine, threads, images per batch. Small, so it travels to
    Dask workers and child processes."""

    engine: Engine = "auto"
    threads: int | None = None
    batch_size: int = 64


class ExtractionContext:
    """How this process runs the frozen forward pass, and what it owns while it does.

    - `settings` and `cache_dir`: the engine asked for, its threads and batch size, where the
      cache and the converted LiteRT models lie.
    - The engines it builds, one per backbone, kept for later shards. One extraction uses them
      at a time (a LiteRT interpreter must not run in two threads at once).
    - The backbone loading into TensorFlow beside the extraction
      (`load_keras_layer_in_background`; `keras_layer` takes the result). While it loads,
      LiteRT runs on one thread, and in a child process where its model is converted already
      (`child_process`: "while-loading", the default; "always", wherever the converted model
      allows it; "never").

    A copy sent to another process (a Dask worker) carries its settings only and builds its own
    engines. `close()`, or leaving a `with` block, drops the engines and stops waiting for the load.
    """

    def __init__(
        self,
        cache_dir: Path,
        settings: ExtractionSettings = ExtractionSettings(),
        child_process: Literal["while-loading", "always", "never"] = "while-loading",
    ):
        self.cache_dir = Path(cache_dir)
        self.settings = settings
        self.child_process = child_process
        self._set_up_process_state()

    def _set_up_process_state(self) -> None:
        self._engines: dict[Backbone, object] = {}
        self._engines_lock = threading.Lock()
        self._forward_lock = threading.Lock()
        self._loader: ThreadPoolExecutor | None = None
        self._layers: dict[Backbone, Future] = {}

    def __getstate__(self) -> dict:
        return {"cache_dir": self.cache_dir, "settings": self.settings, "child_process": self.child_process}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._set_up_process_state()

    def __enter__(self) -> "ExtractionContext":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        if self._loader is not None:
            self._loader.shutdown(wait=False)
            self._loader = None
        self._layers.clear()
        with self._engines_lock:
            self._engines.clear()

    # --- the backbone in TensorFlow, loaded beside the extraction -----------------------------

    def load_keras_layer_in_background(self, backbone: Backbone) -> None:
        """Starts importing TensorFlow and loading the backbone into a Keras layer, on a thread of its own.

        For while the LiteRT engine extracts features, which holds the GIL only between images:
        the import (2–3 s) and the load (~1 s) then run beside it rather than after it. On 910
        new images at 224 px, extraction and load took 8.9 s one after the other, 7.8–8.3 s side
        by side. The next `keras_layer(backbone)` takes that layer.
        """
        if backbone in self._layers:
            return
        if self._loader is None:
            self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="load-backbone")
        self._layers[backbone] = self._loader.submit(backbone.keras_layer)

    @property
    def backbone_loading(self) -> bool:
        """Whether a load started by `load_keras_layer_in_background` is at work right now."""
        return any(not layer.done() for layer in list(self._layers.values()))

    def keras_layer(self, backbone: Backbone, trainable: bool = False):
        """The layer loaded in the background for this backbone (once), or a new one."""
        loading = self._layers.pop(backbone, None)
        layer = loading.result() if loading is not None else backbone.keras_layer()
        layer.trainable = trainable
        return layer

    # --- the forward pass ------------------------------------------------------------------

    def engine(self, backbone: Backbone):
        """The engine for this backbone, chosen and built on first use and kept."""
        with self._engines_lock:
            if backbone not in self._engines:
                choice = choose_engine(backbone, self.settings.engine, self.cache_dir, self.settings.threads)
                fell_back = self.settings.engine == "auto" and choice.engine.name == "keras"
                (logger.warning if fell_back else logger.info)(
                    "feature extraction engine: %s (%s)", choice.engine.name, choice.reason
                )
                self._engines[backbone] = choice.engine
            return self._engines[backbone]

    def forward_threads(self) -> int | None:
        """Threads for the next forward pass: one while the backbone loads beside it, else the settings'.

        XNNPACK's threads wait for each other after every layer, so one that shares its core
        drags the rest: while the backbone loaded into TensorFlow beside the engine, two threads
        ran at 107 img/s and one at 124 (219 with the cores to themselves).
        """
        return 1 if self.backbone_loading else self.settings.threads

    def extract_shard(self, shard: Shard, backbone: Backbone, progress=None) -> ExtractedShard:
        """Runs the backbone over one shard's images and caches their features.

        Where the child-process policy asks for it and a LiteRT model converted earlier is
        ready, a child process extracts the shard (see `_extract_shard_in_child`).
        """
        wants_child = self.child_process == "always" or (
            self.child_process == "while-loading" and self.backbone_loading
        )
        if (
            wants_child
            and self.settings.engine != "keras"
            and litert_ready_without_tensorflow(backbone, self.cache_dir)
        ):
            extracted = _extract_shard_in_child(shard, backbone, self.cache_dir, self.settings, progress)
            if extracted is not None:
                return extracted
        return self.extract_shard_here(shard, backbone, progress)

    def extract_shard_here(self, shard: Shard, backbone: Backbone, progress=None) -> ExtractedShard:
        """`extract_shard` in this process. Each file is decoded from the bytes whose hash matches
        the one it was scanned with: what is cached under a hash is always that content's features."""
        hashes, paths = [sha for sha, _ in shard], [path for _, path in shard]
        with self._forward_lock:
            engine = self.engine(backbone)
            features, kept, unusable = apply_to_decoded(
                decoded_batches(paths, backbone.image_size, self.settings.batch_size, hashes),
                lambda images: engine(images, self.forward_threads()),
                progress,
            )
            if kept:
                FeatureCache(self.cache_dir, backbone).write_shard([hashes[index] for index in kept], features)
        return ExtractedShard(
            engine.name, len(kept), tuple((hashes[index], paths[index], reason) for index, reason in unusable)
        )


def _extract_shard_in_child(
    shard: Shard, backbone: Backbone, cache_dir: Path, settings: ExtractionSettings, progress=None
) -> ExtractedShard | None:
    """Extracts the shard with LiteRT in a child process, which writes the cache shard itself.

    Importing TensorFlow in this process holds the GIL for long stretches inside C code, so the
    LiteRT engine running beside it in the same process lost a third of its speed; in a process
    of its own it keeps it. Extracting 910 new images at 224 px while loading the backbone into
    Keras, alternately four times each: 6.3–8.1 s (mean 7.5) this way, 7.0–9.1 s (mean 8.1) in
    one process. Returns None, after a warning, when the child fails: this process then extracts
    the shard itself, and meets, and reports, any error the images cause.
    """
    request = {
        "shard": shard,
        "cache_dir": str(cache_dir),
        "settings": asdict(settings),
        "backbone": {
            **asdict(backbone),
            "module_path": str(backbone.module_path),
            "litert_model": str(backbone.litert_model) if backbone.litert_model is not None else None,
        },
    }
    # The child finds headstart where this process found it, however it was started.
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(entry for entry in sys.path if entry)}
    with tempfile.TemporaryFile(mode="w+") as errors:
        try:
            child = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    "from headstart.features.extraction import serve_extraction_request; serve_extraction_request()",
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=errors,
                text=True,
                env=environment,
            )
        except OSError as error:
            logger.warning("could not start a child process to extract features (%s); extracting here instead", error)
            return None
        reply: dict = {}
        reported = 0
        try:
            with contextlib.suppress(OSError):  # a child gone already says so by its exit status, below
                with child.stdin:
                    child.stdin.write(json.dumps(request) + "\n")
            for line in child.stdout:
                message = json.loads(line) if line.startswith("{") else {}
                if "images" in message and progress is not None:
                    progress.update(message["images"])
                    reported += message["images"]
                reply.update(message)
            child.wait()
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
        if child.returncode == 0 and "engine" in reply:
            logger.info("feature extraction engine: %s, in a child process", reply["engine"])
            return ExtractedShard(reply["engine"], reply["extracted"], tuple(map(tuple, reply["left_out"])))
        errors.seek(0)
        last_line = (
            [line for line in errors.read().splitlines() if line.strip()] or [f"exit status {child.returncode}"]
        )[-1]
        logger.warning("extracting in a child process failed (%s); extracting here instead", last_line)
        if reported and progress is not None:
            progress.update(-reported)
        return None


def serve_extraction_request() -> None:
    """The child's side of `_extract_shard_in_child`: one JSON request on stdin, JSON lines on stdout."""
    request = json.loads(sys.stdin.readline())
    given = request["backbone"]
    backbone = Backbone(
        **{
            **given,
            "module_path": Path(given["module_path"]),
            "litert_model": given["litert_model"] and Path(given["litert_model"]),
        }
    )

    class Progress:
        @staticmethod
        def update(count: int) -> None:
            print(json.dumps({"images": count}), flush=True)

    with ExtractionContext(
        Path(request["cache_dir"]), ExtractionSettings(**request["settings"]), child_process="never"
    ) as context:
        extracted = context.extract_shard_here([tuple(pair) for pair in request["shard"]], backbone, Progress())
    print(json.dumps(asdict(extracted)), flush=True)
