"""Ed25519 keys and detached signatures over the manifest.

One signature over the manifest's canonical bytes is enough because the manifest records the
sha256 of every other file. The signature file carries the key id (a hash of the public key) so a
fleet can rotate keys and a device can say *which* key it expected.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from edgecloud.errors import ConfigError, SignatureError

__all__ = [
    "SIGNATURE_FILE",
    "Signature",
    "generate_keypair",
    "key_id",
    "load_private_key",
    "load_public_key",
    "sign_bytes",
    "verify_bytes",
]

SIGNATURE_FILE = "manifest.sig"


def key_id(public_key: Ed25519PublicKey) -> str:
    """A short, stable name for a public key: the first 16 hex digits of its sha256."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_keypair(out: Path, *, force: bool = False) -> tuple[Path, Path]:
    """Write ``out`` (private key, PKCS8 PEM, mode 0600) and ``out.pub`` (public key PEM)."""
    pub = out.with_name(out.name + ".pub")
    for p in (out, pub):
        if p.exists() and not force:
            raise ConfigError(f"{p} already exists; refusing to overwrite a key (use --force)")
    out.parent.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # Create with 0600 from the start: a chmod after writing leaves a window where others can read.
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private_pem)
    os.chmod(out, 0o600)
    pub.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return out, pub


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except FileNotFoundError as exc:
        raise ConfigError(f"signing key {path} does not exist") from exc
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{path} is not an unencrypted PEM private key: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path} is not an Ed25519 private key")
    return key


def load_public_key(path: Path | bytes) -> Ed25519PublicKey:
    try:
        data = path if isinstance(path, bytes) else Path(path).read_bytes()
        key = serialization.load_pem_public_key(data)
    except FileNotFoundError as exc:
        raise ConfigError(f"public key {path!r} does not exist") from exc
    except ValueError as exc:
        raise ConfigError(f"{path!r} is not a PEM public key: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"{path!r} is not an Ed25519 public key")
    return key


@dataclass(frozen=True)
class Signature:
    """The content of ``manifest.sig``."""

    key_id: str
    signature: bytes
    algorithm: str = "ed25519"

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "algorithm": self.algorithm,
                "key_id": self.key_id,
                "signature": base64.b64encode(self.signature).decode(),
            },
            sort_keys=True,
        ).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Signature:
        try:
            d = json.loads(data)
            sig = cls(
                key_id=str(d["key_id"]),
                signature=base64.b64decode(d["signature"], validate=True),
                algorithm=str(d.get("algorithm", "ed25519")),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise SignatureError(f"{SIGNATURE_FILE} is malformed: {exc}") from exc
        if sig.algorithm != "ed25519":
            raise SignatureError(f"{SIGNATURE_FILE}: unsupported algorithm {sig.algorithm!r}")
        return sig


def sign_bytes(data: bytes, key: Ed25519PrivateKey) -> Signature:
    return Signature(key_id=key_id(key.public_key()), signature=key.sign(data))


def verify_bytes(data: bytes, sig: Signature, key: Ed25519PublicKey) -> None:
    """Raise ``SignatureError`` unless ``sig`` is ``key``'s signature of ``data``."""
    expected = key_id(key)
    if sig.key_id != expected:
        raise SignatureError(
            f"manifest was signed by key {sig.key_id}, but the trusted key is {expected}"
        )
    try:
        key.verify(sig.signature, data)
    except InvalidSignature as exc:
        raise SignatureError(
            "manifest.json does not match its signature: the manifest was changed after signing"
        ) from exc
