"""Places by URL: an object store (s3://, gs://, az://, through fsspec) where a team shares its
registry and feature cache, and each machine's own copy of what it reads from there.

A place is a local folder (a Path) or a store URL (a str). Every machine keeps its own copy of
what it reads from a store under `<its cache>/store/<scheme>/<bucket>/<key>` (`local_copy`), so
the code that reads runs and features goes on reading local files; only publishing, the
champion's switch and the feature shards cross to the store. Credentials and the endpoint are
found the way the store's own library finds them (for S3: AWS_ACCESS_KEY_ID /
AWS_SECRET_ACCESS_KEY, a profile, AWS_ENDPOINT_URL for an S3-compatible server).
"""

from __future__ import annotations

import os
from pathlib import Path

from headstart.config import Place, is_url
from headstart.errors import HeadstartError, first_line
from headstart.infra.storage import atomic_path, check_writable_directory, writing_under


def machine_cache() -> Path:
    """This machine's own cache for copies of what lives in a store: $XDG_CACHE_HOME/headstart,
    else ~/.cache/headstart."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "headstart"


def local_copy(place: Place) -> Path:
    """Where this machine keeps what it reads from and writes to the place: the folder itself
    for a local place; for a store URL, a folder of this machine's cache named by the URL."""
    if not is_url(place):
        return Path(place)
    scheme, rest = place.split("://", 1)
    return machine_cache() / "store" / scheme / rest


def joined(place: Place, *parts: str) -> Place:
    """A place inside another: a URL joined with '/', a Path with its own operator."""
    if is_url(place):
        return "/".join([place, *parts])
    return Path(place).joinpath(*parts)


class ObjectStore:
    """One folder of a store (a URL prefix), read and written through fsspec. Names inside it
    are relative, '/'-separated."""

    def __init__(self, url: str):
        import fsspec

        self.url = url
        try:
            self.fs, self.root = fsspec.core.url_to_fs(url)
        except (ImportError, ValueError) as error:
            raise HeadstartError(f"{url}: {first_line(error)}") from None
        self.root = self.root.rstrip("/")

    def __reduce__(self):  # travels to Dask workers as its URL; each process opens its own client
        return (ObjectStore, (self.url,))

    def key(self, name: str) -> str:
        return f"{self.root}/{name}" if name else self.root

    def location(self, name: str) -> str:
        return f"{self.url}/{name}" if name else self.url

    # --- reading --------------------------------------------------------------------------------

    def read_bytes(self, name: str) -> bytes | None:
        """The object's bytes; None where it is absent."""
        try:
            return self.fs.cat_file(self.key(name))
        except FileNotFoundError:
            return None

    def read_with_tag(self, name: str) -> tuple[bytes | None, str | None]:
        """The object's bytes and its ETag (what a conditional write compares); (None, None)
        where it is absent."""
        try:
            # The tag is read first: were the object replaced in between, the bytes are the newer
            # ones and a write conditional on the older tag fails, as it should.
            info = self.fs.info(self.key(name), refresh=True)
            data = self.fs.cat_file(self.key(name))
        except FileNotFoundError:
            return None, None
        return data, info.get("ETag")

    def exists(self, name: str) -> bool:
        return self.fs.exists(self.key(name))

    def listing(self, prefix: str = "") -> dict[str, dict]:
        """Every object under the prefix (recursively): relative name → fsspec's details (size,
        ETag, LastModified where the store gives them)."""
        base = self.key(prefix).rstrip("/")
        self.fs.invalidate_cache(base)
        try:
            found = self.fs.find(base, detail=True)
        except FileNotFoundError:
            return {}
        start = len(self.root) + 1
        return {path[start:]: info for path, info in found.items() if info.get("type", "file") == "file"}

    def children(self, prefix: str = "") -> list[str]:
        """The names one level under the prefix (objects and 'folders')."""
        base = self.key(prefix).rstrip("/")
        self.fs.invalidate_cache(base)
        try:
            found = self.fs.ls(base, detail=False)
        except FileNotFoundError:
            return []
        return sorted({path.rstrip("/").rsplit("/", 1)[-1] for path in found if path.rstrip("/") != base})

    def download(self, name: str, destination: Path) -> Path:
        """Copies the object to a local file atomically (a reader never sees half of it)."""
        with atomic_path(destination) as temporary:
            self.fs.get_file(self.key(name), str(temporary))
        return Path(destination)

    # --- writing --------------------------------------------------------------------------------

    def write_bytes(self, name: str, data: bytes) -> None:
        """Writes the object whole (an object store never shows half an object)."""
        self.fs.pipe_file(self.key(name), data)

    def upload(self, source: Path, name: str) -> None:
        with writing_under(Path(source)):
            self.fs.put_file(str(source), self.key(name))

    def create(self, name: str, data: bytes) -> bool:
        """Writes the object only where none is there yet (If-None-Match: *); False where one was.
        On a store without conditional writes, a look first (enough for objects written once
        under a name no one else writes)."""
        if not self._conditional_writes():
            if self.exists(name):
                return False
            self.write_bytes(name, data)
            return True
        return self.replace_if(name, data, None)

    def _conditional_writes(self) -> bool:
        return "s3" in tuple(self.fs.protocol)

    def replace_if(self, name: str, data: bytes, tag: str | None) -> bool:
        """Compare-and-swap: writes the object only while its ETag is still `tag` (None: while it
        is absent); False where another writer got there first. The store's conditional PUT
        decides, so two machines never both win."""
        if not self._conditional_writes():
            raise HeadstartError(
                f"{self.url}: switching the champion needs conditional writes, which headstart makes on s3:// "
                "stores (and S3-compatible servers); keep the registry on one"
            )
        condition = {"mode": "create"} if tag is None else {"IfMatch": tag}
        try:
            self.fs.pipe_file(self.key(name), data, **condition)
        except OSError as error:
            if _precondition_failed(error):
                return False
            raise
        return True

    def remove(self, name: str) -> None:
        """Removes an object, or every object under a prefix; absent ones are no error."""
        try:
            self.fs.rm(self.key(name), recursive=True)
        except FileNotFoundError:
            pass
        self.fs.invalidate_cache(self.key(name))

    def check(self, option: str) -> None:
        """Stops, in one line naming `option`, unless the store answers and its bucket exists:
        found before any work, not when the first result is written. A store that does not
        answer is given seconds, not the client's minutes of retries."""
        import fsspec

        bucket = self.root.split("/", 1)[0]
        options = {}
        if "s3" in tuple(self.fs.protocol):
            options = {"config_kwargs": {"connect_timeout": 5, "read_timeout": 10, "retries": {"max_attempts": 1}}}
        try:
            impatient = fsspec.filesystem(self.fs.protocol[0], skip_instance_cache=True, **options)
            impatient.retries = 1
            impatient.ls(bucket, detail=False)  # unlike exists(), says why it cannot look
            found = True
        except FileNotFoundError:
            found = False
        except Exception as error:  # the clients fail in many types (no credentials, refused, timeout)
            raise HeadstartError(f"{option} {self.url}: the store does not answer ({first_line(error)})") from None
        if not found:
            raise HeadstartError(f"{option} {self.url}: there is no bucket {bucket}; create it, or choose another")


def check_place(place: Place, option: str) -> None:
    """A place a command will write to, checked before any work, in one line naming `option`: a
    local folder writable by this process; a store that answers, with its bucket, and this
    machine's copy of it writable."""
    if is_url(place):
        ObjectStore(place).check(option)
    check_writable_directory(local_copy(place), option)


def _precondition_failed(error: OSError) -> bool:
    """Whether a write failed on its condition (HTTP 412, or 409 where a create raced another)."""
    text = f"{error} {error.__cause__!r}"
    return "PreconditionFailed" in text or "pre-conditions you specified did not hold" in text or "412" in text
