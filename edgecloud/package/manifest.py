"""The model package manifest: what a device needs to know to run a model and trust it.

The manifest is plain JSON so that any language on any device can read it. Its schema is versioned
(``schema_version``); a reader refuses a newer major version instead of guessing. Every file in the
package is listed with its size and sha256 under ``files`` and, for model files, again under
``variants`` with how the variant was validated, so one signature over the manifest covers them all.
Documented field by field in docs/package.md.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from edgecloud.errors import PackageError

__all__ = [
    "SCHEMA_VERSION",
    "FileEntry",
    "Manifest",
    "TensorSpec",
    "Variant",
]

SCHEMA_VERSION = 1

Dim = int | str
ConfidenceKind = Literal["logits", "probabilities", "none"]

_DTYPES = {
    "float32",
    "float16",
    "float64",
    "int8",
    "uint8",
    "int16",
    "int32",
    "int64",
    "bool",
    "bfloat16",
}
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def _need(d: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in d:
        raise PackageError(f"manifest: {where} is missing '{key}'")
    return d[key]


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output: ``shape`` has ints for fixed dims, names for symbolic ones."""

    name: str
    dtype: str
    shape: tuple[Dim, ...]

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise PackageError(f"manifest: tensor '{self.name}' has unknown dtype '{self.dtype}'")
        for d in self.shape:
            if isinstance(d, bool) or not isinstance(d, int | str):
                raise PackageError(f"manifest: tensor '{self.name}' has a bad dim {d!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TensorSpec:
        name = str(_need(d, "name", "a tensor"))
        shape = _need(d, "shape", f"tensor '{name}'")
        if not isinstance(shape, list):
            raise PackageError(f"manifest: tensor '{name}' shape must be a list")
        return cls(name=name, dtype=str(_need(d, "dtype", f"tensor '{name}'")), shape=tuple(shape))


@dataclass(frozen=True)
class FileEntry:
    """Size and sha256 of one file of the package, relative to the package root."""

    path: str
    size: int
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {"size": self.size, "sha256": self.sha256}


@dataclass(frozen=True)
class Variant:
    """One runnable form of the model (FP32, FP16, INT8 QDQ, a TensorRT engine, ...).

    ``metrics`` are the validation gate's figures against the original (agreement, accuracy,
    cosine, latency, ...); ``extra`` holds format-specific facts such as a TensorRT engine's
    version, compute capability and optimisation profiles, which a device checks before loading.
    """

    name: str
    file: str
    format: Literal["onnx", "tensorrt"]
    precision: str
    target: str
    size: int
    sha256: str
    metrics: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not _SAFE_NAME.match(self.name):
            raise PackageError(f"manifest: variant name {self.name!r} is not a safe identifier")
        if self.format not in ("onnx", "tensorrt"):
            raise PackageError(
                f"manifest: variant '{self.name}' has unknown format {self.format!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "file": self.file,
            "format": self.format,
            "precision": self.precision,
            "target": self.target,
            "size": self.size,
            "sha256": self.sha256,
            "metrics": self.metrics,
            "extra": self.extra,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Variant:
        name = str(_need(d, "name", "a variant"))
        where = f"variant '{name}'"
        return cls(
            name=name,
            file=str(_need(d, "file", where)),
            format=_need(d, "format", where),
            precision=str(_need(d, "precision", where)),
            target=str(d.get("target", "cpu")),
            size=int(_need(d, "size", where)),
            sha256=str(_need(d, "sha256", where)),
            metrics=dict(d.get("metrics", {})),
            extra=dict(d.get("extra", {})),
        )


@dataclass(frozen=True)
class Manifest:
    """Everything a device reads before it runs a package. See docs/package.md."""

    name: str
    version: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    variants: tuple[Variant, ...]
    task: str = "classification"
    confidence: ConfidenceKind = "logits"
    confidence_output: str | None = None
    #: output name -> role ("score", "boxes", "labels", "embedding", ...); additive, may be empty
    output_roles: dict[str, str] = field(default_factory=dict)
    labels: tuple[str, ...] = ()
    source_sha256: str = ""
    files: tuple[FileEntry, ...] = ()
    created: str = ""
    warmup: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION
    #: Optional calibration and tuned routing (``edgecloud tune``; see edgecloud/calibration.py).
    routing: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not _SAFE_NAME.match(self.name):
            raise PackageError(
                f"manifest: model name {self.name!r} must be letters, digits, '.', '_' or '-'"
            )
        if not _SAFE_NAME.match(self.version):
            raise PackageError(f"manifest: version {self.version!r} is not a safe identifier")
        if self.confidence not in ("logits", "probabilities", "none"):
            raise PackageError(f"manifest: unknown confidence kind {self.confidence!r}")
        if not self.inputs or not self.outputs:
            raise PackageError("manifest: a model needs at least one input and one output")
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            raise PackageError(f"manifest: duplicate variant names in {names}")
        outs = {t.name for t in self.outputs}
        if self.confidence_output is not None and self.confidence_output not in outs:
            raise PackageError(
                f"manifest: confidence output {self.confidence_output!r} is not an output "
                f"(outputs: {sorted(outs)})"
            )
        unknown = sorted(set(self.output_roles) - outs)
        if unknown:
            raise PackageError(f"manifest: output_roles names unknown outputs {unknown}")

    def variant(self, name: str) -> Variant:
        for v in self.variants:
            if v.name == name:
                return v
        known = ", ".join(v.name for v in self.variants) or "none"
        raise PackageError(f"package '{self.name}' has no variant '{name}' (it has: {known})")

    @property
    def score_output(self) -> str:
        """The output that confidence is read from (the first output unless one is named)."""
        return self.confidence_output or self.outputs[0].name

    def to_dict(self) -> dict[str, Any]:
        out = {
            "schema_version": self.schema_version,
            "name": self.name,
            "version": self.version,
            "created": self.created,
            "task": self.task,
            "confidence": {"kind": self.confidence, "output": self.score_output},
            "labels": list(self.labels),
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "source_sha256": self.source_sha256,
            "variants": [v.to_dict() for v in self.variants],
            "files": {f.path: f.to_dict() for f in sorted(self.files, key=lambda f: f.path)},
            "warmup": self.warmup,
            "metadata": self.metadata,
            **({"routing": self.routing} if self.routing else {}),  # absent: old bytes unchanged
        }
        if self.output_roles:  # only when known: older manifests stay byte-identical
            out["output_roles"] = dict(self.output_roles)
        return out

    def to_json(self) -> bytes:
        """Canonical bytes (sorted keys, fixed separators): what the signature covers."""
        return (json.dumps(self.to_dict(), sort_keys=True, indent=2) + "\n").encode()

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Manifest:
        if not isinstance(d, Mapping):
            raise PackageError("manifest: top level must be a JSON object")
        schema = d.get("schema_version")
        if not isinstance(schema, int) or schema < 1:
            raise PackageError(f"manifest: bad schema_version {schema!r}")
        if schema > SCHEMA_VERSION:
            raise PackageError(
                f"manifest: schema_version {schema} is newer than this edgecloud reads "
                f"({SCHEMA_VERSION}); upgrade edgecloud"
            )
        conf = d.get("confidence", {})
        if isinstance(conf, str):
            conf = {"kind": conf}
        files_raw = d.get("files", {})
        if not isinstance(files_raw, Mapping):
            raise PackageError("manifest: 'files' must be an object of path -> {size, sha256}")
        try:
            files = tuple(
                FileEntry(path=str(p), size=int(e["size"]), sha256=str(e["sha256"]))
                for p, e in files_raw.items()
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise PackageError(f"manifest: a 'files' entry is malformed: {exc}") from exc
        return cls(
            name=str(_need(d, "name", "the manifest")),
            version=str(_need(d, "version", "the manifest")),
            created=str(d.get("created", "")),
            task=str(d.get("task", "classification")),
            confidence=conf.get("kind", "logits"),
            confidence_output=conf.get("output"),
            output_roles=_roles(d.get("output_roles", {})),
            labels=tuple(str(x) for x in d.get("labels", [])),
            inputs=tuple(TensorSpec.from_dict(t) for t in _need(d, "inputs", "the manifest")),
            outputs=tuple(TensorSpec.from_dict(t) for t in _need(d, "outputs", "the manifest")),
            source_sha256=str(d.get("source_sha256", "")),
            variants=tuple(Variant.from_dict(v) for v in d.get("variants", [])),
            files=files,
            warmup=dict(d.get("warmup", {})),
            metadata=dict(d.get("metadata", {})),
            schema_version=schema,
            routing=_routing(d.get("routing")),
        )

    @classmethod
    def from_json(cls, data: bytes | str, *, where: str = "manifest.json") -> Manifest:
        try:
            raw = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise PackageError(f"{where} is not valid JSON: {exc}") from exc
        return cls.from_dict(raw)


def _routing(raw: Any) -> dict[str, Any]:
    if raw is not None and not isinstance(raw, Mapping):
        raise PackageError("manifest: 'routing' must be an object")
    return dict(raw or {})


def _roles(raw: Any) -> dict[str, str]:
    if not isinstance(raw, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in raw.items()
    ):
        raise PackageError("manifest: 'output_roles' must be an object of output name -> role")
    return dict(raw)


def shape_matches(spec: Sequence[Dim], shape: Sequence[int]) -> bool:
    """Whether a concrete shape fits a spec (symbolic dims match any size)."""
    if len(spec) != len(shape):
        return False
    return all(isinstance(s, str) or s == n for s, n in zip(spec, shape, strict=True))
