"""The region's model repository: a Triton-style directory of versions, checked when opened.

Repository layout, as Triton's::

    <repo>/<model>/<version>/manifest.json + variant files   (an edgecloud package, verified)
    <repo>/<model>/<version>/model.onnx                      (a plain ONNX model)

The latest version (highest number, else lexicographically last name) answers requests that name
none. Layout errors are raised when the repository is opened, naming the directory, so a region
that starts is a region that can serve.

Which variant of a package a region serves is the runtime's choice
(``select_variant(prefer="accuracy")``); this module only finds and verifies what is there.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgecloud.errors import ConfigError, InputError, RemoteError
from edgecloud.package import MANIFEST_FILE, ModelPackage, TensorSpec, verify_package
from edgecloud.runtime.loader import select_variant
from edgecloud.runtime.ort import read_specs

__all__ = [
    "PLAIN_MODEL_FILE",
    "ModelEntry",
    "ModelNotFoundError",
    "ModelRepository",
    "parse_version",
]

PLAIN_MODEL_FILE = "model.onnx"


class ModelNotFoundError(RemoteError, LookupError):
    """No such model or version in the region's repository (V2 status 404)."""

    def __init__(self, message: str, *, region: str | None = None) -> None:
        super().__init__(message, region=region, status=404)


@dataclass(frozen=True)
class ModelEntry:
    """One version of one model in the repository, with the file that will be loaded."""

    name: str
    version: str
    path: Path
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    package: ModelPackage | None = None
    variant: str | None = None


def _version_key(v: str) -> tuple[int, int, str]:
    return (1, int(v), v) if v.isdigit() else (0, 0, v)


class ModelRepository:
    """A Triton-like model repository directory, scanned and checked when opened.

    Packages are verified (hashes always; the signature too when ``public_key`` is given, and then
    an unsigned package is refused).
    """

    def __init__(self, path: Path | str, *, public_key: Any = None) -> None:
        self.path = Path(path)
        self.public_key = public_key
        if not self.path.is_dir():
            raise ConfigError(f"model repository {self.path} does not exist or is not a directory")
        self._versions: dict[str, dict[str, Path]] = {}
        for model_dir in sorted(p for p in self.path.iterdir() if p.is_dir()):
            if model_dir.name.startswith("."):
                continue
            versions = {
                v.name: v for v in model_dir.iterdir() if v.is_dir() and not v.name.startswith(".")
            }
            if not versions:
                raise ConfigError(
                    f"model repository {self.path}: model '{model_dir.name}' has no version "
                    f"directory (expected {model_dir}/<version>/{PLAIN_MODEL_FILE} or a package)"
                )
            for vdir in versions.values():
                if not (vdir / MANIFEST_FILE).is_file() and not (vdir / PLAIN_MODEL_FILE).is_file():
                    raise ConfigError(
                        f"model repository {self.path}: {vdir} holds no model "
                        f"(expected {MANIFEST_FILE} of a package or {PLAIN_MODEL_FILE})"
                    )
            self._versions[model_dir.name] = versions
        if not self._versions:
            raise ConfigError(
                f"model repository {self.path} is empty: expected <model>/<version>/"
                f"{PLAIN_MODEL_FILE} or <model>/<version>/{MANIFEST_FILE}"
            )
        self._entries: dict[tuple[str, str], ModelEntry] = {}
        self._lock = threading.Lock()

    def models(self) -> list[str]:
        return sorted(self._versions)

    def versions(self, name: str) -> list[str]:
        """Versions of ``name``, oldest first; raises ``ModelNotFoundError``."""
        if name not in self._versions:
            raise ModelNotFoundError(
                f"model '{name}' is not in this repository (models: {', '.join(self.models())})"
            )
        return sorted(self._versions[name], key=_version_key)

    def resolve(self, name: str, version: str | None = None) -> str:
        """The version that answers for ``(name, version)``: the latest when ``version`` is None."""
        versions = self.versions(name)
        if version is None or version == "":
            return versions[-1]
        if version not in self._versions[name]:
            raise ModelNotFoundError(
                f"model '{name}' has no version '{version}' (versions: {', '.join(versions)})"
            )
        return version

    def entry(self, name: str, version: str | None = None) -> ModelEntry:
        """Load (verify, read specs of) one version; cached."""
        v = self.resolve(name, version)
        with self._lock:
            cached = self._entries.get((name, v))
            if cached is None:
                cached = self._load(name, v, self._versions[name][v])
                self._entries[(name, v)] = cached
            return cached

    def _load(self, name: str, version: str, vdir: Path) -> ModelEntry:
        if (vdir / MANIFEST_FILE).is_file():
            pkg = verify_package(
                vdir, self.public_key, require_signature=self.public_key is not None
            )
            # The region is every device's accurate fallback: FP32 first (runtime's order).
            best = select_variant(pkg.manifest, prefer="accuracy")
            return ModelEntry(
                name=name,
                version=version,
                path=pkg.path_of(best),
                inputs=pkg.manifest.inputs,
                outputs=pkg.manifest.outputs,
                package=pkg,
                variant=best.name,
            )
        path = vdir / PLAIN_MODEL_FILE
        inputs, outputs = read_specs(path)
        return ModelEntry(name=name, version=version, path=path, inputs=inputs, outputs=outputs)


def parse_version(text: str) -> str:
    """Check a version path segment (digits, letters, '.', '_', '-')."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", text):
        raise InputError(f"bad model version {text!r}")
    return text
