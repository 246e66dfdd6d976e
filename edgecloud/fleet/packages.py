"""The controller's package store: signed package directories, packed once for download.

Layout: ``<root>/<name>/<version>/`` (the package as given) and ``<root>/<name>/<version>.tar.gz``
(what devices download, made by ``pack_package``). A version is immutable once stored: adding
the same name and version again is accepted only when its manifest is byte-identical (so a
re-deploy is idempotent), never to replace a published package under devices' feet.

The controller signs nothing: packages arrive signed by ``edgecloud convert --sign``. With a
public key it refuses a package whose signature does not verify; without one it still checks
every file against the manifest, and the devices verify the signature themselves.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edgecloud.errors import FleetError, PackageError
from edgecloud.package import MANIFEST_FILE, pack_package, read_manifest, verify_package

__all__ = ["PackageStore", "StoredPackage"]

_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass(frozen=True)
class StoredPackage:
    name: str
    version: str
    archive: Path
    sha256: str
    size: int
    signed_by: str | None

    def url_path(self) -> str:
        return f"/packages/{self.name}/{self.version}.tar.gz"


class PackageStore:
    def __init__(self, root: Path, public_key: Ed25519PublicKey | None = None) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.public_key = public_key
        self._hashes: dict[tuple[str, int, int], str] = {}  # (path, mtime_ns, size) -> sha256

    def add(self, package_dir: Path) -> StoredPackage:
        """Verify ``package_dir`` and store it (idempotent for an identical manifest)."""
        src = Path(package_dir)
        try:
            manifest = read_manifest(src)
            pkg = verify_package(
                src, self.public_key, require_signature=self.public_key is not None
            )
        except PackageError as exc:
            raise FleetError(f"package {src} refused: {exc}") from exc
        name, version = manifest.name, manifest.version
        dest = self.root / name / version
        archive = self.root / name / f"{version}.tar.gz"
        new_manifest = (src / MANIFEST_FILE).read_bytes()
        if dest.exists():
            if (dest / MANIFEST_FILE).read_bytes() != new_manifest:
                raise FleetError(
                    f"package {name} version {version} is already in the store with a different "
                    "manifest; publish a new version instead of replacing one devices may have"
                )
        else:
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{version}.", dir=dest.parent))
            try:
                shutil.copytree(src, tmp / "pkg")
                os.rename(tmp / "pkg", dest)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        if not archive.exists():
            pack_package(dest, archive)
        return self._stored(name, version, pkg.signed_by)

    def get(self, name: str, version: str) -> StoredPackage:
        if not (_SAFE.match(name) and _SAFE.match(version)):
            raise FleetError(f"no package {name!r} version {version!r}")
        archive = self.root / name / f"{version}.tar.gz"
        if not archive.is_file():
            raise FleetError(f"no package {name!r} version {version!r} in the store")
        return self._stored(name, version, None)

    def archive_path(self, name: str, version: str) -> Path | None:
        """The archive to serve for a download URL, or None (no path escapes the root)."""
        if not (_SAFE.match(name) and _SAFE.match(version)):
            return None
        p = self.root / name / f"{version}.tar.gz"
        return p if p.is_file() else None

    def list(self) -> list[StoredPackage]:
        out = []
        for archive in sorted(self.root.glob("*/*.tar.gz")):
            if not (_SAFE.match(archive.parent.name) and _SAFE.match(archive.name)):
                continue  # uploads and copies in progress live in hidden temp folders
            out.append(self._stored(archive.parent.name, archive.name[: -len(".tar.gz")], None))
        return out

    def _stored(self, name: str, version: str, signed_by: str | None) -> StoredPackage:
        archive = self.root / name / f"{version}.tar.gz"
        st = archive.stat()
        key = (str(archive), st.st_mtime_ns, st.st_size)
        digest = self._hashes.get(key)
        if digest is None:
            h = hashlib.sha256()
            with open(archive, "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
            digest = self._hashes[key] = h.hexdigest()
        return StoredPackage(
            name=name,
            version=version,
            archive=archive,
            sha256=digest,
            size=st.st_size,
            signed_by=signed_by,
        )
