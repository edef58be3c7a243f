"""Extracting a shard of images into the feature cache, within an explicit extraction context.

The context is what the flow owns for one run and passes to every extraction step: the engine
settings and the engines it builds (kept for later shards). Nothing here lives in a module global.

The context names the cache as a place: a local folder, or a store URL. With a store URL, a
process that runs the context (a Dask worker on another machine) works in its own copy of the
cache (local_copy, under its own $XDG_CACHE_HOME), runs the backbone from its own copy of the
module published under the store cache, fetches the images of a store folder into its own copy,
and writes each shard to the store: it never needs a path of the flow's machine.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from headstart.backbone.handles import Backbone, shared_backbone
from headstart.config import Engine, Place, is_url
from headstart.data.preprocessing import apply_to_decoded, decoded_batches
from headstart.data.store_images import fetch_images
from headstart.features.cache import FeatureCache, Shard
from headstart.features.engines import choose_engine
from headstart.infra.object_store import local_copy

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
    Dask workers."""

    engine: Engine = "auto"
    threads: int | None = None
    batch_size: int = 64


class ExtractionContext:
    """How this process runs the frozen forward pass, and what it owns while it does.

    - `settings` and `cache`: the engine asked for, its threads and batch size; the feature
      cache (a folder, or a store URL), in whose local copy the converted LiteRT models lie.
    - The engines it builds, one per backbone, kept for later shards. One extraction uses them
      at a time (a LiteRT interpreter must not run in two threads at once).

    A copy sent to another process (a Dask worker) carries its settings only and builds its own
    engines. `close()`, or leaving a `with` block, drops the engines.
    """

    def __init__(self, cache: Place, settings: ExtractionSettings = ExtractionSettings()):
        self.cache = cache if is_url(cache) else Path(cache)
        self.settings = settings
        self._set_up_process_state()

    @property
    def cache_dir(self) -> Path:
        """This process's own folder of the cache: computed where the context runs, so that a
        worker with a store cache works under its own $XDG_CACHE_HOME."""
        return local_copy(self.cache)

    def _set_up_process_state(self) -> None:
        self._engines: dict[Backbone, object] = {}
        self._engines_lock = threading.Lock()
        self._forward_lock = threading.Lock()

    def __getstate__(self) -> dict:
        return {"cache": self.cache, "settings": self.settings}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._set_up_process_state()

    def __enter__(self) -> "ExtractionContext":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        with self._engines_lock:
            self._engines.clear()

    # --- the forward pass ------------------------------------------------------------------

    def engine(self, backbone: Backbone):
        """The engine for this backbone, chosen and built on first use and kept."""
        with self._engines_lock:
            if backbone not in self._engines:
                # With a store cache, the module this process runs is its own copy, fetched by fingerprint.
                runnable = shared_backbone(backbone, self.cache) if is_url(self.cache) else backbone
                choice = choose_engine(runnable, self.settings.engine, self.cache_dir, self.settings.threads)
                fell_back = self.settings.engine == "auto" and choice.engine.name == "keras"
                (logger.warning if fell_back else logger.info)(
                    "feature extraction engine: %s (%s)", choice.engine.name, choice.reason
                )
                self._engines[backbone] = choice.engine
            return self._engines[backbone]

    def extract_shard(self, shard: Shard, backbone: Backbone, progress=None) -> ExtractedShard:
        """Runs the backbone over one shard's images and caches their features. Each file is decoded
        from the bytes whose hash matches the one it was scanned with: what is cached under a hash
        is always that content's features."""
        hashes, paths = [sha for sha, _ in shard], [path for _, path in shard]
        fetch_images(shard)
        with self._forward_lock:
            engine = self.engine(backbone)
            features, kept, unusable = apply_to_decoded(
                decoded_batches(paths, backbone.image_size, self.settings.batch_size, hashes),
                engine,
                progress,
            )
            if kept:
                FeatureCache(self.cache, backbone).write_shard([hashes[index] for index in kept], features)
        return ExtractedShard(
            engine.name, len(kept), tuple((hashes[index], paths[index], reason) for index, reason in unusable)
        )
