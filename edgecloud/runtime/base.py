"""The local inference seam: backends implement ``_infer_impl`` only.

As in Polygraphy's runners, the public ``infer`` owns the lifecycle and input validation, so every
backend (onnxruntime, TensorRT, a user's own) refuses bad input the same way and with the same
messages, and a backend author cannot forget a check.

Validation runs on every request, so everything it can decide ahead of time is decided in
``__init__`` (expected dtypes, ranks, which dims are fixed, whether a finite check is needed) and
the per-call work is a handful of attribute reads and comparisons. The checks, in order, for each
input: present and known (``InputError``), dtype (``DTypeError``; casts only when lossless or
configured), rank and fixed dims (``ShapeError``; symbolic dims accept any size), NaN/Inf
(``NonFiniteError`` when the policy refuses them). Every message names the input, what was
expected and what came.

The checks are one; their words are not: a device reports numpy dtypes and ranks to the
application that called it, a cloud region reports V2 datatypes to a remote client (KServe's
wording, which V2 clients match on). ``InputMessages`` holds the words, so the region
(``edgecloud.cloud.core``) runs this same validator with its own ``InputMessages`` subclass.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal

import numpy as np

from edgecloud.errors import (
    ConfigError,
    DTypeError,
    InputError,
    NonFiniteError,
    RuntimeBackendError,
    ShapeError,
)
from edgecloud.package.manifest import Manifest, TensorSpec, Variant

__all__ = ["Backend", "InputMessages", "InputPolicy"]

_isfinite = np.isfinite
_MISSING: Any = object()


@dataclass(frozen=True)
class InputPolicy:
    """How strictly inputs are checked.

    ``allow_cast`` permits a dtype cast of the same kind that may round (float64 -> float32,
    int64 -> int32) as well as every lossless one; ``allow_int_to_float`` permits integer or bool
    inputs for a float model (pixels as uint8, say) without allowing float narrowing. By default
    the dtype must match exactly: a silent float64 -> float32 cast hides a caller's mistake and
    costs a copy on every request. ``nonfinite="refuse"`` rejects NaN/Inf in float inputs before
    they reach the model, where they would come back as a confident-looking garbage answer.
    """

    allow_cast: bool = False
    allow_int_to_float: bool = False
    nonfinite: Literal["refuse", "allow"] = "refuse"

    def __post_init__(self) -> None:
        if self.nonfinite not in ("refuse", "allow"):
            raise ConfigError(f"nonfinite must be 'refuse' or 'allow', got {self.nonfinite!r}")


class InputMessages:
    """The words of the validator's errors (the checks themselves live in ``Backend.validate``).

    Each method returns the error to raise, so a subclass changes wording only: what is
    checked, in which order, and which error class says so stay the same for every backend.
    """

    def names(self, missing: list[str], unknown: list[str], expected: list[str]) -> InputError:
        """Inputs missing or not known to the model (at least one list is non-empty)."""
        parts = []
        if missing:
            parts.append(f"missing input(s) {missing}")
        if unknown:
            parts.append(f"unknown input(s) {unknown}")
        name = missing[0] if missing else (unknown[0] if unknown else None)
        return InputError(f"{'; '.join(parts)}: the model expects {expected}", input_name=name)

    def dtype(self, spec: TensorSpec, got: np.dtype[Any], *, cast_hint: bool) -> DTypeError:
        """The input's dtype is not the model's and the policy allows no cast from it."""
        hint = " (set allow_cast=True to cast; it may round)" if cast_hint else ""
        return DTypeError(
            f"input '{spec.name}': expected dtype {np.dtype(spec.dtype)}, got {got}{hint}",
            input_name=spec.name,
        )

    def rank(self, spec: TensorSpec, shape: tuple[int, ...]) -> ShapeError:
        return ShapeError(
            f"input '{spec.name}': expected rank {len(spec.shape)} {_shape_text(spec)}, "
            f"got rank {len(shape)} {list(shape)}",
            input_name=spec.name,
        )

    def dim(self, spec: TensorSpec, shape: tuple[int, ...], index: int) -> ShapeError:
        """A fixed dim (``spec.shape[index]`` is an int) has another size."""
        return ShapeError(
            f"input '{spec.name}': expected shape {_shape_text(spec)}, got {list(shape)} "
            f"(dim {index} must be {spec.shape[index]})",
            input_name=spec.name,
        )


def _shape_text(spec: TensorSpec) -> str:
    return "[" + ", ".join(str(d) for d in spec.shape) + "]"


class _InputCheck:
    """Precomputed facts about one input, so the per-call check is only comparisons."""

    __slots__ = (
        "dtype",
        "fixed",
        "float_kind",
        "messages",
        "name",
        "policy",
        "rank",
        "spec",
    )

    def __init__(
        self, spec: TensorSpec, policy: InputPolicy, messages: InputMessages | None = None
    ) -> None:
        self.spec = spec
        self.name = spec.name
        self.dtype = np.dtype(spec.dtype)
        self.rank = len(spec.shape)
        self.fixed = tuple((i, d) for i, d in enumerate(spec.shape) if isinstance(d, int))
        self.float_kind = self.dtype.kind == "f" and policy.nonfinite == "refuse"
        self.policy = policy
        self.messages = messages or InputMessages()

    def check(self, value: Any) -> np.ndarray:
        arr = value if type(value) is np.ndarray else self._as_array(value)
        if arr.dtype != self.dtype:
            arr = self._cast(arr)
        shape = arr.shape
        if len(shape) != self.rank:
            raise self.messages.rank(self.spec, shape)
        for i, d in self.fixed:
            if shape[i] != d:
                raise self.messages.dim(self.spec, shape, i)
        if self.float_kind and not self._finite(arr):
            bad = ~np.isfinite(arr)
            if bad.any():
                n = int(bad.sum())
                raise NonFiniteError(
                    f"input '{self.name}': {n} NaN/Inf value(s) (first at index "
                    f"{tuple(int(i) for i in np.argwhere(bad)[0])}); the input policy refuses "
                    "non-finite values",
                    input_name=self.name,
                )
        return arr

    def _finite(self, arr: np.ndarray) -> bool:
        # isfinite().all() raises no floating-point warnings; a sum or a dot with zeros is a
        # little cheaper but warns on overflow or on inf * 0, which callers would then see.
        return bool(_isfinite(arr).all())

    def _as_array(self, value: Any) -> np.ndarray:
        try:
            return np.asarray(value)
        except (ValueError, TypeError) as exc:
            raise InputError(
                f"input '{self.name}': cannot be read as an array ({exc})", input_name=self.name
            ) from exc

    def _cast(self, arr: np.ndarray) -> np.ndarray:
        src, dst = arr.dtype, self.dtype
        ok = np.can_cast(src, dst, "same_kind") if self.policy.allow_cast else False
        if not ok and self.policy.allow_int_to_float and dst.kind == "f":
            ok = src.kind in "biu"
        if not ok:
            raise self.messages.dtype(self.spec, src, cast_hint=not self.policy.allow_cast)
        return arr.astype(dst)


class Backend(ABC):
    """Runs one model variant locally.

    Subclasses call ``super().__init__`` with the model's input/output specs and implement
    ``_infer_impl``; ``infer`` validates once, here, before any backend sees the data.
    ``messages`` words the validation errors (default: the device's wording).
    """

    #: Name of the backend ("onnxruntime", "tensorrt") for results and metrics.
    kind: str = ""

    def __init__(
        self,
        inputs: tuple[TensorSpec, ...],
        outputs: tuple[TensorSpec, ...],
        *,
        policy: InputPolicy | None = None,
        messages: InputMessages | None = None,
    ) -> None:
        self.input_specs = inputs
        self.output_specs = outputs
        self.policy = policy or InputPolicy()
        self.messages = messages or InputMessages()
        self._checks = tuple(_InputCheck(s, self.policy, self.messages) for s in inputs)
        self._input_names = frozenset(s.name for s in inputs)
        self._closed = False
        #: Set by ``load_backend``: the package's manifest and the variant this backend runs.
        self.manifest: Manifest | None = None
        self.variant: Variant | None = None
        self.loaded: Any = None

    def infer(self, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Validate ``inputs`` against the model and run it."""
        if self._closed:
            raise RuntimeBackendError(f"{self.kind} backend is closed")
        return self._infer_impl(self.validate(inputs))

    def validate(self, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Check names, ranks, shapes, dtypes and NaN/Inf; return arrays ready to run."""
        if type(inputs) is not dict and not isinstance(inputs, Mapping):
            raise InputError(
                f"inputs must be a mapping of input name -> array, got {type(inputs).__name__}"
            )
        checks = self._checks
        if len(inputs) != len(checks):
            self._name_error(inputs)
        out = {}
        for c in checks:
            # Same count and every expected name present means no unknown names either.
            value = inputs.get(c.name, _MISSING)
            if value is _MISSING:
                self._name_error(inputs)
            out[c.name] = c.check(value)
        return out

    def run_validated(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run inputs that ``validate`` already returned (the router validates once, up front)."""
        if self._closed:
            raise RuntimeBackendError(f"{self.kind} backend is closed")
        return self._infer_impl(inputs)

    def _name_error(self, inputs: Mapping[str, Any]) -> None:
        got = set(inputs.keys())
        missing = sorted(self._input_names - got)
        unknown = sorted(str(k) for k in got - self._input_names)
        raise self.messages.names(missing, unknown, [s.name for s in self.input_specs])

    @abstractmethod
    def _infer_impl(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the model on already validated inputs."""

    def close(self) -> None:
        self._closed = True

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> Backend:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
