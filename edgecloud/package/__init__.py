"""Model packages: manifest, hashes and Ed25519 signatures (see docs/package.md)."""

from edgecloud.package.io import (
    MANIFEST_FILE,
    ModelPackage,
    pack_package,
    read_manifest,
    sha256_file,
    unpack_package,
    verify_package,
    write_package,
)
from edgecloud.package.manifest import (
    SCHEMA_VERSION,
    FileEntry,
    Manifest,
    TensorSpec,
    Variant,
    shape_matches,
)
from edgecloud.package.signing import (
    SIGNATURE_FILE,
    Signature,
    generate_keypair,
    key_id,
    load_private_key,
    load_public_key,
)

__all__ = [
    "MANIFEST_FILE",
    "SCHEMA_VERSION",
    "SIGNATURE_FILE",
    "FileEntry",
    "Manifest",
    "ModelPackage",
    "Signature",
    "TensorSpec",
    "Variant",
    "generate_keypair",
    "key_id",
    "load_private_key",
    "load_public_key",
    "pack_package",
    "read_manifest",
    "sha256_file",
    "shape_matches",
    "unpack_package",
    "verify_package",
    "write_package",
]
