"""Images on a store: a folder of class sub-folders at a store URL (`--data s3://bucket/photos`).

The machine that builds the manifest copies the folder into its own copy (local_copy), fetching
only the files new or changed since its last copy (by size and ETag), and scans that copy as it
would any folder. The manifest names each image by its store URL, not by where this machine keeps
it: a manifest of the same images is then the same file, with the same fingerprint, whatever
machine built it. A machine that decodes an image (a Dask worker) reads it from its own copy,
fetched from the store where it has none, or where its copy no longer holds the content hash
the manifest gives.
"""

from __future__ import annotations

import json
from pathlib import Path

from headstart.config import is_url
from headstart.errors import HeadstartError, first_line
from headstart.infra.object_store import ObjectStore, local_copy
from headstart.infra.storage import file_sha256, write_json_atomic

# Beside the copy of a store folder: each copied file's size and ETag, to fetch only what changed.
COPY_RECORD = ".headstart-copy.json"


def copy_store_folder(url: str) -> Path:
    """This machine's copy of the store folder at `url`, brought up to date: files new or changed
    since the last copy (size or ETag differ) downloaded, files gone from the store removed. Hidden
    objects are left out, as a local folder's hidden files are."""
    store = ObjectStore(url)
    try:
        listing = store.listing()
    except Exception as error:  # the clients fail in many types (no credentials, refused, timeout)
        raise HeadstartError(f"data folder {url}: the store does not answer ({first_line(error)})") from None
    if not listing:
        raise HeadstartError(f"data folder not found: {url} holds no files (give a folder of class sub-folders)")
    copy = local_copy(url)
    record_path = copy / COPY_RECORD
    try:
        copied = json.loads(record_path.read_text())
    except (OSError, ValueError):
        copied = {}
    wanted = {name: info for name, info in listing.items() if not any(part.startswith(".") for part in name.split("/"))}
    for name, info in sorted(wanted.items()):
        stamp = [info.get("size"), info.get("ETag")]
        if copied.get(name) != stamp or not (copy / name).is_file():
            store.download(name, copy / name)
            copied[name] = stamp
    for name in set(copied) - set(wanted):
        (copy / name).unlink(missing_ok=True)
        del copied[name]
    write_json_atomic(record_path, copied)
    return copy


def check_store_folder(url: str) -> None:
    """A store folder that does not answer or holds nothing, said in one line before any work."""
    store = ObjectStore(url)
    try:
        children = store.children()
    except Exception as error:  # the clients fail in many types (no credentials, refused, timeout)
        raise HeadstartError(f"data folder {url}: the store does not answer ({first_line(error)})") from None
    if not children:
        raise HeadstartError(f"data folder not found: {url} (give a folder of class sub-folders, or 'cifar10')")


def fetch_images(images: list[tuple[str, str]]) -> None:
    """Makes this machine's copy of each (content hash, path) whose path is a store URL hold that
    content: fetched where it is missing or differs. Local paths are left as they are."""
    stores: dict[str, ObjectStore] = {}
    for sha256, path in images:
        if not is_url(path):
            continue
        target = local_copy(path)
        if target.is_file() and file_sha256(target) == sha256:
            continue
        scheme, rest = path.split("://", 1)
        bucket, key = rest.split("/", 1)
        store = stores.setdefault(bucket, ObjectStore(f"{scheme}://{bucket}"))
        try:
            store.download(key, target)
        except FileNotFoundError:
            pass  # gone from the store: decoding says so, and the image is left out
