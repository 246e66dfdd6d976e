"""The model store: two slots (A/B), an atomic pointer to the active one, resumable downloads.

Layout under the store path (docs/agent.md)::

    active              JSON {"slot", "previous", "name", "version"}; replaced atomically
    slots/A/, slots/B/  verified package directories (manifest.json, signature, variant files)
    downloads/          <key>.tar.gz.part while downloading, <key>.tar.gz when complete
    staging/<key>/      a package being unpacked, verified, loaded and health-checked

A new version is unpacked, verified, loaded and health-checked in ``staging/``; only once it has
passed is it renamed (same filesystem) into the slot that is *not* active. So the serving
model's files are never touched while it serves, and a refused or failed package never touches
the idle slot either: the previous version stays there for ``rollback`` until a *proven* new
version replaces it. The pointer is switched (write-to-temp, fsync, ``os.replace``, fsync of the
folder) right after the rename. A power cut at any moment leaves either the old or the new
pointer, never a torn one, and the slot it names is always complete.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edgecloud.errors import (
    IntegrityError,
    PackageError,
    RuntimeBackendError,
    StoreError,
    TransportError,
)
from edgecloud.package import ModelPackage, sha256_file, unpack_package, verify_package
from edgecloud.runtime.base import Backend

__all__ = [
    "DiskSpaceError",
    "HealthCheckError",
    "ModelStore",
    "Pointer",
    "download",
    "health_check",
]

log = logging.getLogger("device_agent.store")
SLOTS = ("A", "B")


class DiskSpaceError(StoreError):
    """Not enough free disk space to download or unpack a package (the job is refused)."""


class HealthCheckError(StoreError):
    """A freshly loaded model's warm-up outputs differ from what its package recorded."""


@dataclass(frozen=True)
class Pointer:
    """The contents of the ``active`` file."""

    slot: str
    previous: str | None
    name: str
    version: str


class ModelStore:
    """A/B slots on disk. Thread-safe for one agent process (one lock around pointer changes)."""

    def __init__(self, root: Path, public_key: Ed25519PublicKey, *, min_free_bytes: int = 0):
        self.root = Path(root)
        self.public_key = public_key
        self.min_free_bytes = min_free_bytes
        self._lock = threading.Lock()
        try:
            for d in ("slots", "downloads", "staging"):
                (self.root / d).mkdir(parents=True, exist_ok=True)
            # A crash while unpacking leaves a staging folder nobody will finish.
            for p in (self.root / "staging").iterdir():
                shutil.rmtree(p, ignore_errors=True)
        except OSError as exc:
            raise StoreError(
                f"model store {self.root} is not usable: {exc.strerror or exc}"
            ) from exc

    # -- pointer ---------------------------------------------------------------------------
    @property
    def pointer_path(self) -> Path:
        return self.root / "active"

    def pointer(self) -> Pointer | None:
        try:
            d = json.loads(self.pointer_path.read_bytes())
            return Pointer(
                slot=str(d["slot"]),
                previous=d.get("previous"),
                name=str(d.get("name", "")),
                version=str(d.get("version", "")),
            )
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError) as exc:
            raise StoreError(f"model store pointer {self.pointer_path} is corrupt: {exc}") from exc

    def slot_path(self, slot: str) -> Path:
        if slot not in SLOTS:
            raise StoreError(f"unknown slot {slot!r} (expected A or B)")
        return self.root / "slots" / slot

    def idle_slot(self) -> str:
        p = self.pointer()
        return "B" if p is not None and p.slot == "A" else "A"

    def set_active(self, slot: str, pkg: ModelPackage) -> Pointer:
        """Point ``active`` at ``slot`` (atomic); the old active slot becomes ``previous``."""
        with self._lock:
            old = self.pointer()
            prev = (
                old.slot
                if old is not None and old.slot != slot
                else (old.previous if old is not None else None)
            )
            new = Pointer(slot, prev, pkg.manifest.name, pkg.manifest.version)
            _atomic_write(self.pointer_path, json.dumps(new.__dict__).encode())
            return new

    def forget_previous(self) -> None:
        """The idle slot is about to be overwritten: rollback can no longer return to it."""
        with self._lock:
            old = self.pointer()
            if old is not None and old.previous is not None:
                new = Pointer(old.slot, None, old.name, old.version)
                _atomic_write(self.pointer_path, json.dumps(new.__dict__).encode())

    def verify_slot(self, slot: str) -> ModelPackage:
        return verify_package(self.slot_path(slot), self.public_key)

    # -- installing ------------------------------------------------------------------------
    def check_space(self, need: int, where: Path | None = None) -> None:
        """Refuse when writing ``need`` bytes would leave less than ``min_free_bytes`` free."""
        free = shutil.disk_usage(where or self.root).free
        if free - need < self.min_free_bytes:
            raise DiskSpaceError(
                f"not enough free disk space in {self.root}: need {need} bytes and keep "
                f"{self.min_free_bytes} free, but only {free} bytes are free"
            )

    def unpack(self, archive: Path, name: str) -> ModelPackage:
        """Unpack ``archive`` into ``staging/<name>`` and verify it; no slot is touched.

        The package is loaded and health-checked from there, and only ``promote`` moves it into
        a slot: a refused or failed install leaves both slots, and so ``rollback``, as they were.
        Raises ``SignatureError``/``IntegrityError`` (refused package) or ``PackageError``.
        """
        self.check_space(_unpacked_size(archive))
        staging = self.root / "staging" / hashlib.sha256(name.encode()).hexdigest()[:32]
        shutil.rmtree(staging, ignore_errors=True)
        try:
            unpack_package(archive, staging)
            return verify_package(staging, self.public_key)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    def promote(self, staged: ModelPackage, slot: str) -> ModelPackage:
        """Move a proven package from staging into the idle ``slot`` (a rename, same filesystem).

        Only now is the slot's old content, the rollback target, given up. A crash in between
        leaves the pointer naming the serving slot with no ``previous``, never a torn slot.
        """
        staging_dir = self.root / "staging"
        if staged.root.parent != staging_dir:
            raise StoreError(f"{staged.root} is not a staged package of this store")
        p = self.pointer()
        if p is not None and p.slot == slot:
            raise StoreError(f"slot {slot} is active; refusing to overwrite the serving model")
        self.forget_previous()
        target = self.slot_path(slot)
        try:
            if target.exists():
                shutil.rmtree(target)
            os.rename(staged.root, target)
            _fsync_dir(target.parent)
            _fsync_dir(staging_dir)
        except OSError as exc:
            raise StoreError(
                f"cannot move the verified package into slot {slot}: {exc.strerror or exc}"
            ) from exc
        # Same bytes, renamed: the verification made in staging still holds.
        return dataclasses.replace(staged, root=target)

    def discard(self, staged: ModelPackage) -> None:
        """Drop a staged package that was refused or failed (no-op once promoted)."""
        if staged.root.parent == self.root / "staging":
            shutil.rmtree(staged.root, ignore_errors=True)

    def stage(self, archive: Path, slot: str) -> ModelPackage:
        """``unpack`` then ``promote`` at once, for a package that needs no health check."""
        p = self.pointer()
        if p is not None and p.slot == slot:
            raise StoreError(f"slot {slot} is active; refusing to overwrite the serving model")
        staged = self.unpack(archive, f"{slot}.new")
        try:
            return self.promote(staged, slot)
        finally:
            self.discard(staged)

    def download_path(self, key: str) -> Path:
        safe = hashlib.sha256(key.encode()).hexdigest()[:32]
        return self.root / "downloads" / f"{safe}.tar.gz"

    def fetch(
        self,
        url: str,
        key: str,
        *,
        sha256: str | None = None,
        timeout: float = 60.0,
        cancelled: Callable[[], bool] = lambda: False,
        deadline: float | None = None,
    ) -> Path:
        """Download ``url`` (resuming a ``.part`` left by an earlier attempt) and check its hash.

        ``deadline`` (``time.monotonic()``) makes transient failures retried until then instead
        of a fixed number of times: a package server restarting for a while is waited for.
        """
        dest = self.download_path(key)
        download(
            url,
            dest,
            check_space=lambda need: self.check_space(need, dest.parent),
            timeout=timeout,
            cancelled=cancelled,
            deadline=deadline,
        )
        if sha256:
            got = sha256_file(dest)
            if got != sha256.lower():
                dest.unlink(missing_ok=True)
                raise IntegrityError(
                    f"package archive sha256 is {got}, the job says {sha256}", path=url
                )
        return dest

    def discard_download(self, key: str) -> None:
        """Forget a finished job's archive and partial file (a retry is a new execution)."""
        dest = self.download_path(key)
        for p in (dest, dest.with_name(dest.name + ".part")):
            with contextlib.suppress(OSError):
                p.unlink()

    def cleanup_downloads(self, keep: Path | None = None) -> None:
        for p in (self.root / "downloads").iterdir():
            if keep is None or p.name not in (keep.name, keep.name + ".part"):
                with contextlib.suppress(OSError):
                    p.unlink()


def _unpacked_size(archive: Path) -> int:
    import tarfile

    try:
        with tarfile.open(archive, "r:gz") as tar:
            return sum(m.size for m in tar.getmembers())
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise PackageError(f"package archive is not a readable .tar.gz: {exc}") from exc


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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


def _strip(key: str, prefix: str) -> str:
    return key[len(prefix) :] if key.startswith(prefix) else key


# -- health check ------------------------------------------------------------------------------
def health_check(backend: Backend, pkg: ModelPackage) -> dict[str, Any]:
    """Run the package's recorded warm-up inputs and compare with its recorded outputs.

    ``manifest.warmup`` (written by the converters, docs/package.md) names a ``.npz`` in the
    package (``file``) whose arrays are listed in ``inputs`` (``input.<name>``) and ``outputs``
    (``output.<name>``), the output to compare (``compare_output``, default all) and the
    tolerances ``min_top1_agreement`` (default 0.99 for ``task == "classification"``, not checked
    for other tasks, whose output columns are not classes) and ``max_rel_l2`` (default 0.05). A
    package without a warm-up file passes if one inference on zeros runs. Returns the figures.
    """
    w = pkg.manifest.warmup
    file = w.get("file")
    m = pkg.manifest
    try:
        if not file:
            feed = {
                s.name: np.zeros(
                    [d if isinstance(d, int) else 1 for d in s.shape], dtype=np.dtype(s.dtype)
                )
                for s in m.inputs
            }
            backend.infer(feed)
            return {"checked": False}
        path = pkg.root / str(file)
        with np.load(path, allow_pickle=False) as npz:
            in_keys = [str(x) for x in w.get("inputs") or [f"input.{s.name}" for s in m.inputs]]
            out_keys = [str(x) for x in w.get("outputs") or [f"output.{s.name}" for s in m.outputs]]
            missing = [k for k in (*in_keys, *out_keys) if k not in npz.files]
            if missing:
                raise HealthCheckError(
                    f"warm-up file {file} lacks arrays {missing} (it has {sorted(npz.files)})"
                )
            feed = {_strip(k, "input."): npz[k] for k in in_keys}
            expected = {_strip(k, "output."): npz[k] for k in out_keys}
        compare = w.get("compare_output")
        if isinstance(compare, str) and compare in expected:
            expected = {compare: expected[compare]}
        got = backend.infer(feed)
    except (RuntimeBackendError, ValueError, OSError) as exc:
        raise HealthCheckError(f"warm-up inference failed: {exc}") from exc
    # Top-1 agreement means something only for class scores: a regression or embedding model's
    # columns are not classes, so without an explicit threshold only max_rel_l2 applies to it.
    raw_agree = w.get("min_top1_agreement")
    if raw_agree is None and m.task == "classification":
        raw_agree = 0.99
    min_agree = None if raw_agree is None else float(raw_agree)
    max_l2 = float(w.get("max_rel_l2", 0.05))
    figures: dict[str, Any] = {"checked": True}
    for name, exp in expected.items():
        out = np.asarray(got[name], dtype=np.float64)
        ref = np.asarray(exp, dtype=np.float64)
        if out.shape != ref.shape:
            raise HealthCheckError(
                f"warm-up output '{name}': shape {list(out.shape)}, expected {list(ref.shape)}"
            )
        rel = float(np.linalg.norm(out - ref) / max(float(np.linalg.norm(ref)), 1e-12))
        figures[f"{name}.rel_l2"] = rel
        if rel > max_l2:
            raise HealthCheckError(
                f"warm-up output '{name}': relative L2 error {rel:.4g} exceeds {max_l2}"
            )
        if min_agree is not None and out.ndim >= 2 and out.shape[-1] > 1:
            agree = float(np.mean(out.argmax(-1) == ref.argmax(-1)))
            figures[f"{name}.top1_agreement"] = agree
            if agree < min_agree:
                raise HealthCheckError(
                    f"warm-up output '{name}': top-1 agreement {agree:.3f} below {min_agree}"
                )
    return figures
