"""Resumable, bounded package downloads for the model store (``ModelStore.fetch``).

An interrupted download keeps its ``.part`` file and resumes with a Range request; transient
failures (connection refused, 5xx, a stall) are retried with tenacity's jittered exponential
waits, a fixed number of times or until a deadline.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from edgecloud.errors import StoreError, TransportError

__all__ = ["download"]

log = logging.getLogger("device_agent.store")


# -- downloads ---------------------------------------------------------------------------------
def download(
    url: str,
    dest: Path,
    *,
    check_space: Callable[[int], None],
    timeout: float = 60.0,
    attempts: int = 4,
    cancelled: Callable[[], bool] = lambda: False,
    deadline: float | None = None,
) -> Path:
    """Fetch ``url`` into ``dest`` via ``dest.part``, resuming with HTTP Range after a failure.

    A ``file://`` URL is copied. For HTTP, the bytes already in ``.part`` (from an earlier attempt
    or an earlier run of the agent) are kept and only the rest is requested; a server that ignores
    Range (200 instead of 206) makes us start over. Transport failures and 5xx answers are
    retried with capped exponential backoff (at most 5 s apart): ``attempts`` times, or, with a
    ``deadline`` (``time.monotonic()``), as long as the next attempt can start before it. The
    ``.part`` is kept when it gives up, so a later attempt still resumes. Free space is checked
    before writing.
    """
    dest = Path(dest)
    if dest.exists():
        return dest
    u = urlsplit(url)
    if u.scheme == "file":
        src = Path(unquote(u.path))
        if not src.is_file():
            raise StoreError(f"package URL {url}: file {src} does not exist")
        check_space(src.stat().st_size)
        part = dest.with_name(dest.name + ".part")
        shutil.copyfile(src, part)
        os.replace(part, dest)
        return dest
    if u.scheme not in ("http", "https"):
        raise StoreError(f"package URL {url!r}: expected http(s):// or file://")
    import httpx
    from tenacity import (
        Retrying,
        retry_if_exception_type,
        stop_after_attempt,
        stop_before_delay,
        wait_exponential_jitter,
    )

    stop = (
        stop_after_attempt(attempts)
        if deadline is None
        else stop_before_delay(max(0.0, deadline - time.monotonic()))
    )
    retrying = Retrying(
        stop=stop,
        wait=wait_exponential_jitter(multiplier=0.2, max=5.0, jitter=0.2),
        retry=retry_if_exception_type(_Retry),
        reraise=True,
    )
    try:
        with httpx.Client(timeout=timeout, follow_redirects=True) as client:
            for attempt in retrying:
                with attempt:
                    _download_once(client, url, dest, check_space, cancelled)
    except _Retry as exc:
        tries = retrying.statistics.get("attempt_number", attempts)
        raise TransportError(
            f"download of {url} failed after {tries} attempts (the partial download is kept): {exc}"
        ) from exc
    return dest


class _Retry(Exception):
    """A transient download failure: try again from where the ``.part`` file ends."""


def _download_once(
    client: Any,
    url: str,
    dest: Path,
    check_space: Callable[[int], None],
    cancelled: Callable[[], bool],
) -> None:
    import httpx

    if cancelled():
        raise StoreError(f"download of {url} abandoned")
    part = dest.with_name(dest.name + ".part")
    offset = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    try:
        with client.stream("GET", url, headers=headers) as r:
            if r.status_code == 416 and offset:
                # Our .part is already complete (or the file changed): start over to be sure.
                part.unlink(missing_ok=True)
                raise _Retry("server refused the range; restarting the download")
            if r.status_code >= 500:
                raise _Retry(f"server answered {r.status_code}")
            if r.status_code not in (200, 206):
                raise StoreError(f"download of {url} failed: HTTP {r.status_code}")
            if r.status_code == 200 and offset:
                log.info("server ignored Range; downloading %s from the start", url)
                offset = 0
            length = r.headers.get("Content-Length")
            if length is not None:
                check_space(int(length))
            mode = "ab" if r.status_code == 206 else "wb"
            with open(part, mode) as f:
                for chunk in r.iter_bytes():
                    if cancelled():
                        raise StoreError(f"download of {url} abandoned")
                    f.write(chunk)
                    f.flush()  # on disk as it arrives: a kill keeps what was received
                f.flush()
                os.fsync(f.fileno())
    except httpx.TransportError as exc:
        raise _Retry(f"{type(exc).__name__}: {exc}") from exc
    os.replace(part, dest)
