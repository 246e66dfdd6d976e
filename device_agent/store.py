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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from device_agent.download import download
from device_agent.health import HealthCheckError, health_check
from edgecloud.errors import (
    IntegrityError,
    PackageError,
    StoreError,
)
from edgecloud.package import ModelPackage, sha256_file, unpack_package, verify_package
from edgecloud.runtime.base import Backend

__all__ = [
    "DiskSpaceError",
    "HealthCheckError",
    "Installed",
    "ModelStore",
    "PackageMismatch",
    "PackageSource",
    "Pointer",
    "download",
    "health_check",
]

log = logging.getLogger("device_agent.store")
SLOTS = ("A", "B")


class DiskSpaceError(StoreError):
    """Not enough free disk space to download or unpack a package (the job is refused)."""


@dataclass(frozen=True)
class Pointer:
    """The contents of the ``active`` file."""

    slot: str
    previous: str | None
    name: str
    version: str


class PackageMismatch(PackageError):
    """The package is not the one the job names (another version or model): refused."""


@dataclass(frozen=True)
class PackageSource:
    """What to install: where to fetch it, what it must be, how long fetching may take."""

    url: str
    key: str  # one download per key: a retry of the same job resumes the same .part
    sha256: str | None = None
    version: str | None = None
    model: str | None = None
    timeout: float = 60.0
    deadline: float | None = None  # time.monotonic(): transient failures are retried until then
    cancelled: Callable[[], bool] = lambda: False


@dataclass(frozen=True)
class Installed:
    """What an install or rollback activated (``replaced``: the version it took over from)."""

    slot: str
    package: ModelPackage
    backend: Backend
    health: dict[str, Any]
    replaced: str = ""


class ModelStore:
    """A/B slots on disk. Thread-safe for one agent process (one lock around pointer changes)."""

    def __init__(self, root: Path, public_key: Ed25519PublicKey, *, min_free_bytes: int = 0):
        self.root = Path(root)
        self.public_key = public_key
        self.min_free_bytes = min_free_bytes
        self._lock = threading.Lock()
        self._install_lock = threading.Lock()
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

    # -- the install transaction ----------------------------------------------------------
    def install(
        self,
        source: PackageSource,
        *,
        load: Callable[[ModelPackage], Backend],
        activate: Callable[[str, ModelPackage, Backend], None],
        on_step: Callable[[str], None] = lambda step: None,
        lock_timeout: float = 60.0,
    ) -> Installed:
        """fetch -> unpack + verify -> load -> health check -> promote -> activate, or nothing.

        ``on_step(name)`` is called at each step boundary and may raise to stop the install
        there (a cancelled job). ``load`` builds the backend, ``activate(slot, pkg, backend)``
        starts serving it. A failure at any step leaves the serving model, its slot and the
        pointer as they were: the idle slot (the rollback target) is given up only at
        ``promote``, after the package passed everything, and an ``activate`` that raises puts
        the pointer back. One install at a time, also against a job a watchdog abandoned.
        """
        on_step("download")
        archive = self.fetch(
            source.url,
            source.key,
            sha256=source.sha256,
            timeout=source.timeout,
            cancelled=source.cancelled,
            deadline=source.deadline,
        )
        on_step("verify")
        if not self._install_lock.acquire(timeout=lock_timeout):
            raise StoreError("another installation is still running")
        try:
            on_step("verify")
            staged = self.unpack(archive, source.key)
            try:
                man = staged.manifest
                if source.version and man.version != source.version:
                    raise PackageMismatch(
                        f"package is version {man.version}, the job says {source.version}"
                    )
                if source.model and man.name != source.model:
                    raise PackageMismatch(
                        f"package is model {man.name}, the job says {source.model}"
                    )
                on_step("load")
                backend = load(staged)
                try:
                    on_step("health_check")
                    figures = health_check(backend, staged)
                    on_step("activate")
                    slot = self.idle_slot()
                    pkg = self.promote(staged, slot)
                    self._activate(slot, pkg, backend, activate)
                except BaseException:
                    backend.close()
                    raise
            finally:
                self.discard(staged)
        finally:
            self._install_lock.release()
        self.cleanup_downloads()
        return Installed(slot, pkg, backend, figures)

    def rollback(
        self,
        version: str | None,
        *,
        load: Callable[[ModelPackage], Backend],
        activate: Callable[[str, ModelPackage, Backend], None],
        on_step: Callable[[str], None] = lambda step: None,
    ) -> Installed:
        """Serve the previous slot again: verify -> load -> health check -> activate, or nothing.

        ``version``, when given, must be the previous slot's (``PackageMismatch`` otherwise).
        """
        on_step("rollback")
        p = self.pointer()
        if p is None or p.previous is None:
            raise StoreError("there is no previous version on this device")
        pkg = self.verify_slot(p.previous)
        if version is not None and pkg.manifest.version != version:
            raise PackageMismatch(
                f"the previous version is {pkg.manifest.version}, the job asks for {version}"
            )
        backend = load(pkg)
        try:
            on_step("health_check")
            figures = health_check(backend, pkg)
            on_step("activate")
            self._activate(p.previous, pkg, backend, activate)
        except BaseException:
            backend.close()
            raise
        return Installed(p.previous, pkg, backend, figures, replaced=p.version)

    def _activate(
        self,
        slot: str,
        pkg: ModelPackage,
        backend: Backend,
        activate: Callable[[str, ModelPackage, Backend], None],
    ) -> None:
        """Switch the pointer, then start serving; put the pointer back if serving fails."""
        with self._lock:
            before = self.pointer_path.read_bytes() if self.pointer_path.exists() else None
        self.set_active(slot, pkg)
        try:
            activate(slot, pkg, backend)
        except BaseException:
            with self._lock:
                if before is None:
                    self.pointer_path.unlink(missing_ok=True)
                else:
                    _atomic_write(self.pointer_path, before)
            raise

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
