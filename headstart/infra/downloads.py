"""Downloads: to a temporary file renamed into place only once it is complete and verified,
retrying the failures that a later attempt can fix, with exponential backoff."""

from __future__ import annotations

import http.client
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from headstart.errors import HeadstartError, first_line
from headstart.infra.storage import atomic_path, file_digest, remove_stale_temporaries, temporary_pattern


@dataclass(frozen=True)
class DownloadPolicy:
    """How hard to try: attempts in all, the wait before the second (doubling after each
    failure), how long any one connect or read may stall, and how long the whole download may
    take, its attempts and the waits between them included (a server that trickles a few bytes
    at a time never lets one read stall that long, and would otherwise hold it for ever)."""

    attempts: int = 4
    backoff_seconds: float = 1.0
    timeout: float = 60.0
    deadline_seconds: float = 3600.0


class DownloadError(HeadstartError):
    """A download that failed for good; `reason` is the cause without the URL."""

    def __init__(self, url: str, reason: str):
        super().__init__(f"could not download {url}: {reason}")
        self.url = url
        self.reason = reason


class _IncompleteBody(Exception):
    pass


class _Overdue(Exception):
    pass


def download(
    url: str, destination: Path, checksum: str | None = None, policy: DownloadPolicy = DownloadPolicy()
) -> Path:
    """Downloads url to destination unless it is already there (and matches `checksum`).

    `checksum` ("md5:<hex>" or "sha256:<hex>") is verified before the file takes its name, so a
    file that does not match is never left where a later call would reuse it; one found there
    that no longer matches is downloaded again. Timeouts, resets, bodies shorter than their
    Content-Length and HTTP 5xx, 408 and 429 are retried; other HTTP errors, redirect loops and
    checksum mismatches are not, since repeating the request cannot change them. Past
    `policy.deadline_seconds` the download stops where it is, also mid-file.
    """
    destination = Path(destination)
    if destination.exists():
        if checksum is None or _matches(destination, checksum)[0]:
            return destination
        destination.unlink()
    remove_stale_temporaries(destination.parent, temporary_pattern(destination))  # what a killed download left
    deadline = time.monotonic() + policy.deadline_seconds
    for attempt in range(1, policy.attempts + 1):
        try:
            with atomic_path(destination) as temporary:
                _fetch(url, temporary, policy.timeout, deadline)
                if checksum:
                    _verify_checksum(url, temporary, checksum)
            return destination
        except _Overdue as overdue:
            raise DownloadError(url, f"not complete within {policy.deadline_seconds:g} s ({overdue})") from None
        except urllib.error.HTTPError as error:
            if not (error.code >= 500 or error.code in (408, 429)):
                raise DownloadError(url, _describe_http_error(error)) from None
            reason = _describe_http_error(error)
        except urllib.error.URLError as error:
            if not isinstance(error.reason, OSError):  # an unknown scheme, no host: not a network failure
                raise DownloadError(url, first_line(error.reason)) from None
            reason = _describe(error.reason, policy.timeout)
        except (OSError, http.client.HTTPException, _IncompleteBody) as error:
            reason = _describe(error, policy.timeout)
        except ValueError as error:  # a malformed URL
            raise DownloadError(url, first_line(error)) from None
        wait = policy.backoff_seconds * 2 ** (attempt - 1)
        if attempt == policy.attempts:
            break
        if time.monotonic() + wait >= deadline:
            raise DownloadError(
                url, f"{reason} ({_attempts(attempt)}; no time left for another within {policy.deadline_seconds:g} s)"
            )
        time.sleep(wait)
    raise DownloadError(url, f"{reason} ({_attempts(policy.attempts)})")


def _attempts(count: int) -> str:
    return "1 attempt" if count == 1 else f"{count} attempts"


def _fetch(url: str, target: Path, timeout: float, deadline: float) -> None:
    """One request, streamed to target until the `deadline` (time.monotonic()); a body shorter
    than its Content-Length is an error (http.client reads a truncated body in blocks without
    complaint)."""
    received = 0
    with urllib.request.urlopen(url, timeout=timeout) as response, open(target, "wb") as out:
        announced = response.headers.get("Content-Length")
        # read1 returns what has arrived, so a trickle cannot keep one call waiting past the deadline.
        for block in iter(lambda: response.read1(1 << 20), b""):
            out.write(block)
            received += len(block)
            if time.monotonic() > deadline:
                raise _Overdue(f"{received} bytes" + (f" of {announced}" if announced else "") + " received")
    if announced is not None and announced.isdigit() and received != int(announced):
        raise _IncompleteBody(f"the server sent {received} of the {announced} bytes it announced")


def _verify_checksum(url: str, path: Path, checksum: str) -> None:
    matches, actual = _matches(path, checksum)
    if not matches:
        algorithm, _, expected = checksum.partition(":")
        raise DownloadError(url, f"its {algorithm} is {actual}, expected {expected.lower()}; it was not kept")


def _matches(path: Path, checksum: str) -> tuple[bool, str]:
    """Whether the file has the checksum ("md5:<hex>", "sha256:<hex>"), and its actual digest."""
    algorithm, _, expected = checksum.partition(":")
    actual = file_digest(path, algorithm)
    return actual == expected.lower(), actual


def _describe_http_error(error: urllib.error.HTTPError) -> str:
    if 300 <= error.code < 400:  # urllib gives up on a redirect loop with the last redirect's status
        return f"too many redirects (the last was HTTP {error.code})"
    return f"HTTP {error.code} {first_line(error.reason)}".rstrip()


def _describe(error: BaseException, timeout: float) -> str:
    if isinstance(error, TimeoutError):
        return f"no response within {timeout:g} s"
    if isinstance(error, http.client.RemoteDisconnected):
        return "the server closed the connection without a response"
    if isinstance(error, ConnectionResetError):
        return "the server reset the connection"
    if isinstance(error, http.client.IncompleteRead):
        return f"the server closed the connection after {len(error.partial)} bytes, {error.expected} short"
    return first_line(error)
