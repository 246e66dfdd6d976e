"""Writing, verifying, packing and unpacking model packages.

A package is written into a temporary sibling folder and renamed into place only when every file,
the manifest and the signature are there, so a crash never leaves a half-written package behind and
an existing package is only replaced when the caller asked for it. Reading verifies before trusting:
the signature over the manifest first, then every file's size and sha256, and a file that is not in
the manifest is an error too (it could be something planted next to the model).
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tarfile
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edgecloud.errors import IntegrityError, PackageError, SignatureError
from edgecloud.package.manifest import FileEntry, Manifest, Variant
from edgecloud.package.signing import (
    SIGNATURE_FILE,
    Signature,
    sign_bytes,
    verify_bytes,
)

__all__ = [
    "MANIFEST_FILE",
    "ModelPackage",
    "pack_package",
    "read_manifest",
    "sha256_file",
    "unpack_package",
    "verify_package",
    "write_package",
]

MANIFEST_FILE = "manifest.json"
_RESERVED = {MANIFEST_FILE, SIGNATURE_FILE}
_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _check_relpath(rel: str) -> None:
    p = Path(rel)
    if p.is_absolute() or ".." in p.parts or rel in _RESERVED or not rel:
        raise PackageError(f"package file name {rel!r} is not allowed")


def write_package(
    out_dir: Path,
    manifest: Manifest,
    files: Mapping[str, Path],
    *,
    signing_key: Ed25519PrivateKey | None = None,
    force: bool = False,
) -> Manifest:
    """Write a package atomically and return the manifest as written (with sizes and hashes).

    ``files`` maps a path inside the package to a source file. Variant entries in ``manifest`` get
    their ``size`` and ``sha256`` filled from the copied files, so callers need not hash twice.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not force:
        raise PackageError(f"{out_dir} already exists; refusing to overwrite it (use --force)")
    for rel in files:
        _check_relpath(rel)
    for v in manifest.variants:
        if v.file not in files:
            raise PackageError(f"variant '{v.name}' names file {v.file!r}, which is not given")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        entries: dict[str, FileEntry] = {}
        for rel, src in sorted(files.items()):
            dst = tmp / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
            entries[rel] = FileEntry(rel, dst.stat().st_size, sha256_file(dst))
        variants = tuple(
            replace(v, size=entries[v.file].size, sha256=entries[v.file].sha256)
            for v in manifest.variants
        )
        final = replace(
            manifest,
            variants=variants,
            files=tuple(entries.values()),
            created=manifest.created or datetime.now(UTC).isoformat(timespec="seconds"),
        )
        data = final.to_json()
        (tmp / MANIFEST_FILE).write_bytes(data)
        if signing_key is not None:
            (tmp / SIGNATURE_FILE).write_bytes(sign_bytes(data, signing_key).to_json())
        for p in tmp.rglob("*"):
            if p.is_file():
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
        os.chmod(tmp, 0o755)
        if out_dir.exists():
            # Swap in two renames: the old package stays intact until the new one is complete.
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            os.rename(out_dir, old)
            os.rename(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out_dir)
        return final
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_manifest(pkg: Path) -> Manifest:
    """Read a manifest without verifying anything (for `inspect`; never for loading a model)."""
    path = Path(pkg) / MANIFEST_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise PackageError(f"{pkg} is not a model package: {MANIFEST_FILE} is missing") from exc
    return Manifest.from_json(data, where=str(path))


@dataclass(frozen=True)
class ModelPackage:
    """A verified package on disk. Only ``verify_package`` makes one, so holding it means trust."""

    root: Path
    manifest: Manifest
    signed_by: str | None

    def path_of(self, variant: Variant | str) -> Path:
        v = self.manifest.variant(variant) if isinstance(variant, str) else variant
        return self.root / v.file


def verify_package(
    pkg: Path,
    public_key: Ed25519PublicKey | None,
    *,
    require_signature: bool = True,
    check_files: bool = True,
) -> ModelPackage:
    """Verify a package directory and return it; raise naming the first file that fails.

    With ``public_key=None`` and ``require_signature=False`` only the hashes are checked: that
    proves the files match the manifest, not who made it (useful for local development only).
    """
    root = Path(pkg)
    if not root.is_dir():
        raise PackageError(f"{root} is not a package directory")
    try:
        data = (root / MANIFEST_FILE).read_bytes()
    except FileNotFoundError as exc:
        raise PackageError(f"{root} is not a model package: {MANIFEST_FILE} is missing") from exc
    signed_by: str | None = None
    sig_path = root / SIGNATURE_FILE
    if public_key is not None:
        if not sig_path.exists():
            raise SignatureError(f"{root} is not signed ({SIGNATURE_FILE} is missing)")
        sig = Signature.from_json(sig_path.read_bytes())
        verify_bytes(data, sig, public_key)
        signed_by = sig.key_id
    elif require_signature:
        raise SignatureError("no public key given to verify the package signature against")
    manifest = Manifest.from_json(data, where=str(root / MANIFEST_FILE))
    if check_files:
        listed = {f.path: f for f in manifest.files}
        for v in manifest.variants:
            entry = listed.get(v.file)
            if entry is None or entry.sha256 != v.sha256 or entry.size != v.size:
                raise IntegrityError(
                    f"variant '{v.name}' file {v.file} disagrees with the manifest's file list",
                    path=v.file,
                )
        for entry in manifest.files:
            _check_relpath(entry.path)
            p = root / entry.path
            if not p.is_file():
                raise IntegrityError(
                    f"{entry.path}: listed in the manifest but missing", path=entry.path
                )
            size = p.stat().st_size
            if size != entry.size:
                raise IntegrityError(
                    f"{entry.path}: size {size} bytes, manifest says {entry.size}", path=entry.path
                )
            if sha256_file(p) != entry.sha256:
                raise IntegrityError(
                    f"{entry.path}: sha256 differs from the manifest (file was modified)",
                    path=entry.path,
                )
        for p in root.rglob("*"):
            rel = p.relative_to(root).as_posix()
            if p.is_file() and rel not in listed and rel not in _RESERVED:
                raise IntegrityError(f"{rel}: file is not listed in the manifest", path=rel)
    return ModelPackage(root=root, manifest=manifest, signed_by=signed_by)


def pack_package(pkg: Path, archive: Path) -> Path:
    """Pack a package directory into one ``.tar.gz`` for download (no verification)."""
    root = Path(pkg)
    archive = Path(archive)  # str paths too
    read_manifest(root)
    archive.parent.mkdir(parents=True, exist_ok=True)
    tmp = archive.with_name(archive.name + ".part")
    with tarfile.open(tmp, "w:gz") as tar:
        for p in sorted(root.rglob("*")):
            if p.is_file():
                tar.add(p, arcname=p.relative_to(root).as_posix())
    os.replace(tmp, archive)
    return archive


def unpack_package(archive: Path | bytes, out_dir: Path) -> Path:
    """Unpack an archive made by ``pack_package``, refusing links and paths that escape."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise PackageError(f"{out_dir} already exists")
    fileobj = io.BytesIO(archive) if isinstance(archive, bytes) else None
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    _umask = os.umask(0)
    os.umask(_umask)
    os.chmod(tmp, 0o777 & ~_umask)  # mkdtemp's 0700 would outlive the rename
    try:
        try:
            tar = (
                tarfile.open(fileobj=fileobj, mode="r:gz")
                if fileobj is not None
                else tarfile.open(archive, "r:gz")  # type: ignore[arg-type]
            )
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise PackageError(f"package archive is not a readable .tar.gz: {exc}") from exc
        with tar:
            for m in tar.getmembers():
                if not m.isfile():
                    raise PackageError(f"package archive member {m.name!r} is not a regular file")
                _check_relpath(m.name) if m.name not in _RESERVED else None
                target = tmp / m.name
                target.parent.mkdir(parents=True, exist_ok=True)
                src = tar.extractfile(m)
                if src is None:
                    raise PackageError(f"package archive member {m.name!r} cannot be read")
                with src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        os.rename(tmp, out_dir)
        return out_dir
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
