"""The controller's package store: signed package directories, packed once for download.

Layout: ``<root>/<name>/<version>/`` (the package as given), ``<root>/<name>/<version>.tar.gz``
(what devices download, made by ``pack_package``) and ``<version>.sha256``, the archive's hash
recorded when it was stored. Jobs carry that recorded hash, never one computed again from the
disk, so an archive changed on the controller after upload is refused by every device.

A version is immutable once stored: adding the same name and version again is accepted only when
its manifest is byte-identical (so a re-deploy is idempotent), never to replace a published
package under devices' feet. One exception: a version that devices refused for its signature
(``mark_refused``; a controller without ``--public-key`` cannot check signatures itself) was
never installed anywhere, so it does not use up the version number; the real package replaces it.

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
        refused = self.root / name / f"{version}.refused"
        if dest.exists() and (dest / MANIFEST_FILE).read_bytes() != new_manifest:
            if not refused.exists():
                raise FleetError(
                    f"package {name} version {version} is already in the store with a different "
                    "manifest; publish a new version instead of replacing one devices may have"
                )
            # devices refused the stored one's signature: it never ran anywhere
            for p in (archive, self._sha_path(name, version), refused):
                p.unlink(missing_ok=True)
            shutil.rmtree(dest)
        if not dest.exists():
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{version}.", dir=dest.parent))
            try:
                shutil.copytree(src, tmp / "pkg")
                _normalize_modes(tmp / "pkg")
                os.rename(tmp / "pkg", dest)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        if not archive.exists():
            pack_package(dest, archive)
            os.chmod(archive, 0o644)
            self._sha_path(name, version).write_text(_sha256(archive) + "\n")
        return self._stored(name, version, pkg.signed_by)

    def mark_refused(self, name: str, version: str, reason: str) -> None:
        """Devices refused this version's signature: let a correctly signed one replace it."""
        if _SAFE.match(name) and _SAFE.match(version) and (self.root / name / version).is_dir():
            (self.root / name / f"{version}.refused").write_text(reason + "\n")

    def _sha_path(self, name: str, version: str) -> Path:
        return self.root / name / f"{version}.sha256"

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
        try:  # the hash recorded when the archive was made, not what the disk holds now
            digest = self._sha_path(name, version).read_text().strip()
        except FileNotFoundError:  # stored by an older controller: hash it once, record it
            digest = _sha256(archive)
            self._sha_path(name, version).write_text(digest + "\n")
        return StoredPackage(
            name=name,
            version=version,
            archive=archive,
            sha256=digest,
            size=st.st_size,
            signed_by=signed_by,
        )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _normalize_modes(root: Path) -> None:
    """Stored packages are world-readable whichever way they came (a path or an upload)."""
    os.chmod(root, 0o755)
    for p in root.rglob("*"):
        os.chmod(p, 0o755 if p.is_dir() else 0o644)
