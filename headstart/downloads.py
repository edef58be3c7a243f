"""Downloads: to a temporary file renamed into place, retrying transient failures with backoff."""

from __future__ import annotations

import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path

from headstart.errors import HeadstartError
from headstart.storage import atomic_path


def download(url: str, destination: Path, attempts: int = 4, backoff_seconds: float = 1.0, timeout: float = 60.0) -> Path:
    """Downloads url to destination atomically, retrying transient failures with backoff."""
    destination = Path(destination)
    if destination.exists():
        return destination
    last_error = None
    for attempt in range(attempts):
        try:
            with atomic_path(destination) as temporary:
                with urllib.request.urlopen(url, timeout=timeout) as response, open(temporary, "wb") as out:
                    shutil.copyfileobj(response, out, length=1 << 20)
            return destination
        except urllib.error.HTTPError as error:
            last_error = error
            if 400 <= error.code < 500 and error.code != 429:
                break
        except (urllib.error.URLError, OSError, TimeoutError) as error:
            last_error = error
        if attempt + 1 < attempts:
            time.sleep(backoff_seconds * 2**attempt)
    reason = getattr(last_error, "reason", None) or last_error
    raise HeadstartError(f"could not download {url}: {reason}")
