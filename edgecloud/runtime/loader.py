"""Load a verified package's best-fitting variant into a backend.

Loading always verifies first (signature over the manifest, then every file's size and sha256), so
a device never runs bytes nobody signed; a ``ModelPackage`` can only come from ``verify_package``,
so passing one skips the second check.

Automatic variant choice, first that fits wins:

1. a TensorRT engine whose TensorRT version and compute capability match this GPU;
2. an INT8 ONNX variant (fast on CPUs with VNNI and on GPUs alike) — on a CPU-only device, not
   one that the converter measured slower than FP32 at batch 1 and 32 (tiny models), nor one
   whose compute is mostly still float (``extra.quantized_fraction`` below 0.25: an "int8" file
   that runs float kernels plus conversions);
3. an FP16 ONNX variant, only when a GPU execution provider is present (FP16 is slow on CPU);
4. an FP32 ONNX variant;
5. any ONNX variant left whose target does not demand a GPU we lack.

A variant whose ``target`` names a GPU ("gpu", "cuda", "jetson...") is skipped without one. A
variant marked ``extra.rejected`` (kept by ``edgecloud convert --keep-rejected`` for inspection)
is never chosen automatically, only by name.

``prefer="accuracy"`` is the order of a CPU cloud region, which is the accurate fallback of
every device: ONNX only (no engines), FP32, then INT8, then FP16 (slow on most CPUs), among
variants targeted at a CPU ("cpu", "any" or none), else among all ONNX variants, since
onnxruntime runs a GPU-targeted ONNX file on a CPU too, only slower.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edgecloud.errors import ConfigError, PackageError
from edgecloud.package.io import ModelPackage, verify_package
from edgecloud.package.manifest import Manifest, Variant
from edgecloud.package.signing import load_public_key
from edgecloud.runtime.base import Backend, InputPolicy
from edgecloud.runtime.ort import GPU_PROVIDERS, OnnxRuntimeBackend, available_providers

__all__ = ["LoadedModel", "explain_selection", "load_backend", "select_variant"]

#: an INT8 variant with less of its weights in int8 than this is mostly float: not preferred
MIN_QUANTIZED_FRACTION = 0.25

_GPU_TARGETS = ("gpu", "cuda", "jetson", "tensorrt", "nvidia")

#: ``prefer="accuracy"``: precision rank, full precision first (aliases as converters write them)
_ACCURACY_ORDER = {"fp32": 0, "float32": 0, "int8": 1, "fp16": 2, "float16": 2}
_CPU_TARGETS = ("cpu", "any", "")

Preference = Literal["speed", "accuracy"]


def _needs_gpu(v: Variant) -> bool:
    return v.format == "tensorrt" or v.target.lower().startswith(_GPU_TARGETS)


def _measured_slower_on_cpu(v: Variant) -> bool:
    if v.precision.lower() != "int8":
        return False
    speedups = [v.metrics.get(k) for k in ("speedup_b1", "speedup_b32")]
    known = [x for x in speedups if isinstance(x, int | float)]
    return bool(known) and all(x < 1.0 for x in known)


def _mostly_float(v: Variant) -> bool:
    frac = v.extra.get("quantized_fraction")
    return (
        v.precision.lower() == "int8"
        and isinstance(frac, int | float)
        and frac < MIN_QUANTIZED_FRACTION
    )


def select_variant(
    manifest: Manifest,
    variant: str = "auto",
    *,
    providers: Sequence[str] | None = None,
    trt_ok: bool | None = None,
    prefer: Preference = "speed",
) -> Variant:
    """The variant to load: by name or precision when given, else by the rules above.

    ``providers`` are the execution providers present (default: onnxruntime's); ``trt_ok`` says
    whether native TensorRT engines can run (default: probe lazily only when the package has one).
    ``prefer`` is "speed" on a device and "accuracy" on a cloud region (see the module doc).
    """
    return explain_selection(manifest, variant, providers=providers, trt_ok=trt_ok, prefer=prefer)[
        0
    ]


def explain_selection(
    manifest: Manifest,
    variant: str = "auto",
    *,
    providers: Sequence[str] | None = None,
    trt_ok: bool | None = None,
    prefer: Preference = "speed",
) -> tuple[Variant, str]:
    """``select_variant`` and the reason in words (for ``convert``'s report, ``inspect``)."""
    if not manifest.variants:
        raise PackageError(f"package '{manifest.name}' has no variants")
    if prefer not in ("speed", "accuracy"):
        raise ConfigError(f"prefer must be 'speed' or 'accuracy', got {prefer!r}")
    if variant != "auto":
        for v in manifest.variants:
            if v.name == variant:
                return v, f"asked for by name ({variant!r})"
        by_precision = [v for v in manifest.variants if v.precision == variant]
        if len(by_precision) == 1:
            return by_precision[0], f"the only {variant} variant, asked for by precision"
        known = ", ".join(f"{v.name} ({v.precision}, {v.format})" for v in manifest.variants)
        why = "several match that precision" if by_precision else "none is named so"
        raise PackageError(
            f"package '{manifest.name}': cannot pick variant {variant!r}, {why} (it has: {known})"
        )
    if prefer == "accuracy" and variant == "auto":
        return _most_accurate(manifest)
    avail = list(providers) if providers is not None else available_providers()
    has_gpu = bool(GPU_PROVIDERS.intersection(avail))
    # ``--keep-rejected`` ships refused variants for inspection only: never pick one unasked
    usable = [v for v in manifest.variants if not v.extra.get("rejected")]
    engines = [v for v in usable if v.format == "tensorrt"]
    if engines:
        if trt_ok is None:
            from edgecloud.runtime.tensorrt import engine_matches

            matching = [v for v in engines if engine_matches(v)[0]]
        else:
            matching = engines if trt_ok else []
        if matching:
            return matching[0], "a TensorRT engine built for this GPU and TensorRT version"
    onnx = [v for v in usable if v.format == "onnx" and (has_gpu or not _needs_gpu(v))]
    passed_over: list[str] = []
    if not has_gpu:
        # The converter times every variant against FP32 on the CPU; an INT8 variant it measured
        # slower at both batch sizes (tiny models, where quantize/dequantize costs more than the
        # integer kernels save) would only make the device slower: prefer the float one. So
        # would one whose weights are mostly still float.
        skip = [v for v in onnx if _measured_slower_on_cpu(v) or _mostly_float(v)]
        passed_over = [
            v.name
            + (" (measured slower than FP32)" if _measured_slower_on_cpu(v) else " (mostly float)")
            for v in skip
        ]
        onnx = [v for v in onnx if v not in skip] or onnx
    order = ["int8", "fp16", "fp32"] if has_gpu else ["int8", "fp32"]
    for precision in order:
        for v in onnx:
            if v.precision.lower() == precision:
                why = {
                    "int8": "INT8 comes first (integer kernels)",
                    "fp16": "FP16 on a GPU execution provider",
                    "fp32": "FP32: no faster variant fits this device",
                }[precision]
                if precision == "int8" and isinstance(v.metrics.get("speedup_b1"), int | float):
                    why += f", measured {v.metrics['speedup_b1']:.2f}x FP32 at batch 1"
                if passed_over:
                    why += "; passed over " + ", ".join(passed_over)
                return v, why
    if onnx:
        return onnx[0], "the first ONNX variant this device can run"
    known = ", ".join(f"{v.name} ({v.format}, target {v.target})" for v in manifest.variants)
    raise PackageError(
        f"package '{manifest.name}': no variant runs on this device (it has: {known}; "
        f"execution providers here: {avail})"
    )


def _most_accurate(manifest: Manifest) -> tuple[Variant, str]:
    usable = [v for v in manifest.variants if not v.extra.get("rejected")]
    onnx = [v for v in usable if v.format == "onnx"]
    cpu = [v for v in onnx if v.target.lower() in _CPU_TARGETS] or onnx
    if not cpu:
        raise PackageError(
            f"package '{manifest.name}' has no ONNX variant a CPU region can run "
            f"(variants: {', '.join(v.name for v in manifest.variants)})"
        )
    best = min(cpu, key=lambda v: _ACCURACY_ORDER.get(v.precision.lower(), 9))
    return best, f"{best.precision} ONNX: the most accurate variant a CPU region can run"


class LoadedModel:
    """What ``load_backend`` decided, kept on the backend for results, logs and the agent."""

    def __init__(self, package: ModelPackage, variant: Variant) -> None:
        self.package = package
        self.manifest = package.manifest
        self.variant = variant


def load_backend(
    package: Path | str | ModelPackage,
    *,
    public_key: Ed25519PublicKey | Path | str | None,
    variant: str = "auto",
    providers: Sequence[str] | None = None,
    threads: int | None = None,
    inter_op_threads: int | None = None,
    policy: InputPolicy | None = None,
    require_signature: bool = True,
    warmup: bool = True,
) -> Backend:
    """Verify ``package`` and load the variant that fits this device into a backend.

    The returned backend carries ``.manifest`` and ``.variant``. A package that fails verification
    raises ``SignatureError``/``IntegrityError`` and nothing is loaded.
    """
    if isinstance(package, ModelPackage):
        pkg = package
    else:
        key = public_key
        if isinstance(key, str | Path):
            key = load_public_key(Path(key))
        pkg = verify_package(Path(package), key, require_signature=require_signature)
    m = pkg.manifest
    chosen = select_variant(m, variant, providers=providers)
    path = pkg.path_of(chosen)
    backend: Backend
    if chosen.format == "tensorrt":
        from edgecloud.runtime.tensorrt import TensorRTBackend

        backend = TensorRTBackend(path, m.inputs, m.outputs, policy=policy)
    elif chosen.format == "onnx":
        backend = OnnxRuntimeBackend(
            path,
            m.inputs,
            m.outputs,
            providers=providers,
            threads=threads,
            inter_op_threads=inter_op_threads,
            policy=policy,
        )
        if warmup:
            runs = m.warmup.get("runs", 1)
            if not isinstance(runs, int) or isinstance(runs, bool) or runs < 0:
                raise ConfigError(f"manifest warmup.runs must be a non-negative int, got {runs!r}")
            backend.warmup(runs)
    else:  # pragma: no cover - Variant refuses other formats
        raise PackageError(f"variant '{chosen.name}' has unknown format {chosen.format!r}")
    backend.loaded = LoadedModel(pkg, chosen)
    backend.manifest = m
    backend.variant = chosen
    return backend
