"""``edgecloud tune``: calibrate an edge package and pick its threshold from targets.

Inputs: the edge model's logits and the cloud model's answers on labelled validation rows.
Steps (each exact on the rows given, so the same call gives the same package):

1. Split the rows (seeded, stratification not needed: a permutation) into a *fit* part and a
   *threshold* part. The temperature is fitted on the first, so that the threshold part is
   untouched by it: split-conformal's guarantee needs the score function fixed before the
   calibration rows are seen.
2. ECE before/after on the threshold part; the accuracy-vs-offload curve for raw and calibrated
   confidence.
3. One threshold per target (edgecloud.calibration); the one named by ``use`` goes live.
4. A new manifest: same files, a new version, ``routing`` = temperature, threshold, targets,
   curve and the drift reference; ``metadata.confidence_threshold`` = the chosen threshold (what
   ``HybridClient`` reads when no threshold is configured). Signed with the publisher's key.

The cloud side is a callable ``inputs -> predicted labels``: an ONNX file run in-process, or a
region over its transport (``cloud_from_onnx``, ``cloud_from_region``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgecloud import calibration as cal
from edgecloud.errors import ConfigError, DataError

__all__ = [
    "CloudPredictor",
    "TargetResult",
    "TuneResult",
    "cloud_from_onnx",
    "cloud_from_region",
    "load_rows",
    "run_batches",
    "tune",
    "tune_package",
]

CloudPredictor = Callable[[Mapping[str, np.ndarray]], np.ndarray]


@dataclass(frozen=True)
class TargetResult:
    target: cal.Target
    threshold: float
    offload: (
        float  # on the rows it was picked on (every row for offload=, else the threshold split)
    )
    accuracy: float


@dataclass
class TuneResult:
    temperature: float
    measure: str
    ece_before: float
    ece_after: float
    nll_before: float
    nll_after: float
    edge_accuracy: float
    cloud_accuracy: float
    n_fit: int
    n_threshold: int
    targets: list[TargetResult]
    chosen: TargetResult
    curve_raw: cal.Curve
    curve_calibrated: cal.Curve
    reference: dict[str, Any]
    #: "temperature" or "vector" (per-class scaling won on the threshold rows, ``vector=True``)
    method: str = "temperature"
    vector: dict[str, list[float]] | None = None
    #: held-out (threshold rows) ECE/NLL of each candidate tried
    candidates: dict[str, dict[str, float]] = field(default_factory=dict)
    #: Per-variant comparison when several variants were evaluated (see ``variant_report``).
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)

    def routing(self) -> dict[str, Any]:
        """The manifest's ``routing`` object."""
        extra: dict[str, Any] = {}
        if self.method == "vector" and self.vector is not None:
            extra = {"method": "vector", "vector": self.vector}
        if self.candidates:
            extra["candidates"] = self.candidates
        return {
            **extra,
            "temperature": round(self.temperature, 6),
            "measure": self.measure,
            "threshold": round(self.chosen.threshold, 6),
            "target": self.chosen.target.to_dict(),
            "targets": [
                {
                    **r.target.to_dict(),
                    "threshold": round(r.threshold, 6),
                    "offload": round(r.offload, 6),
                    "accuracy": round(r.accuracy, 6),
                }
                for r in self.targets
            ],
            "ece_before": round(self.ece_before, 6),
            "ece_after": round(self.ece_after, 6),
            "rows": {"fit": self.n_fit, "threshold": self.n_threshold},
            "curve": self.curve_calibrated.to_dict(),
            "reference": self.reference,
        }


def tune(
    edge_logits: np.ndarray,
    cloud_pred: np.ndarray,
    labels: np.ndarray,
    *,
    targets: Sequence[cal.Target],
    use: int = 0,
    measure: str = "max_probability",
    fit_fraction: float = 0.5,
    seed: int = 0,
    calibrate: bool = True,
    vector: bool = False,
) -> TuneResult:
    """Fit, sweep and pick (see the module docstring); pure numpy, no files."""
    x = np.asarray(edge_logits, dtype=np.float64)
    x = x.reshape(len(x), -1)
    y = np.asarray(labels)
    cp = np.asarray(cloud_pred)
    if not len(x) == len(y) == len(cp):
        raise DataError(
            f"edge logits ({len(x)}), cloud answers ({len(cp)}) and labels ({len(y)}) must have "
            "one row each per example"
        )
    if not targets:
        raise ConfigError("tune needs at least one target (e.g. offload=0.2)")
    if not 0 <= use < len(targets):
        raise ConfigError(f"use must index one of the {len(targets)} targets, got {use}")
    if not 0.0 < fit_fraction < 1.0:
        raise ConfigError(f"fit_fraction must be in (0, 1), got {fit_fraction}")
    if len(x) < 20:
        raise DataError(f"tune needs at least 20 labelled rows, got {len(x)}")
    perm = np.random.default_rng(seed).permutation(len(x))
    n_fit = round(len(x) * fit_fraction)
    a, b = perm[:n_fit], perm[n_fit:]
    t = cal.fit_temperature(x[a], y[a]) if calibrate else 1.0
    p_raw = cal.softmax(x[b])
    p_cal = cal.softmax(x[b], t)
    yb = y[b]
    edge_ok = p_raw.argmax(1) == yb
    cloud_ok = cp[b] == yb
    conf_raw = cal.measure_scores(p_raw, measure)
    conf_cal = cal.measure_scores(p_cal, measure)
    # the offload target reads no label and no cloud answer: every row estimates its quantile
    # (the fit rows too; a temperature fitted on NLL is not fitted to this quantile)
    conf_every = cal.measure_scores(cal.softmax(x, t), measure)
    ece_after, nll_after = cal.ece(p_cal, yb), cal.nll(x[b], yb, t)
    method, vec, candidates = "temperature", None, {}
    if vector and calibrate:
        if measure != "max_probability":
            raise ConfigError("vector scaling routes on max_probability only")
        scale, bias = cal.fit_vector(x[a], y[a])
        v_conf = cal.vector_confidence(x[b], scale, bias)
        pv = cal.vector_probs(x[b], scale, bias)
        v_ece = cal.ece_of(v_conf, edge_ok)
        v_nll = float(-np.log(np.clip(pv[np.arange(len(b)), yb], 1e-300, 1.0)).mean())
        candidates = {
            "temperature": {"ece": round(ece_after, 6), "nll": round(nll_after, 6)},
            "vector": {"ece": round(v_ece, 6), "nll": round(v_nll, 6)},
        }
        if v_ece < ece_after and v_nll < nll_after:  # chosen only when it beats T on both
            method = "vector"
            vec = {"scale": [round(float(v), 6) for v in scale],
                   "bias": [round(float(v), 6) for v in bias]}  # fmt: skip
            conf_cal, ece_after, nll_after = v_conf, v_ece, v_nll
            conf_every = cal.vector_confidence(x, scale, bias)
    results = []
    for tg in targets:
        if tg.kind == "offload":  # reported on the rows it was picked on: all of them
            th = cal.pick_offload(conf_every, tg.value)
            acc, off = cal.hybrid(conf_every, th, x.argmax(1) == y, cp == y)
        else:
            th = cal.pick(tg, conf_cal, edge_ok, cloud_ok)
            acc, off = cal.hybrid(conf_cal, th, edge_ok, cloud_ok)
        results.append(TargetResult(tg, th, off, acc))
    chosen = results[use]
    return TuneResult(
        temperature=t,
        measure=measure,
        ece_before=cal.ece(p_raw, yb),
        ece_after=ece_after,
        nll_before=cal.nll(x[b], yb),
        nll_after=nll_after,
        edge_accuracy=float(edge_ok.mean()),
        cloud_accuracy=float(cloud_ok.mean()),
        n_fit=len(a),
        n_threshold=len(b),
        targets=results,
        chosen=chosen,
        curve_raw=cal.sweep(conf_raw, edge_ok, cloud_ok),
        curve_calibrated=cal.sweep(conf_cal, edge_ok, cloud_ok),
        # the same definition convert uses (edgecloud.calibration.drift_reference); the offload
        # is the chosen target's, measured on the rows that target was picked on
        reference=cal.drift_reference(conf_cal, chosen.threshold, offload=chosen.offload),
        method=method,
        vector=vec,
        candidates=candidates,
    )


# -- data and models --------------------------------------------------------------------------


def load_rows(path: Path, names: Sequence[str]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Inputs (by the model's input names; a lone input may be stored as ``input``) and
    ``labels`` from an ``.npz`` file."""
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable .npz file: {exc}") from exc
    if "labels" not in data:
        raise DataError(f"{path}: has no 'labels' array (found {sorted(data)})")
    labels = data.pop("labels")
    if len(names) == 1 and names[0] not in data and "input" in data:
        data[names[0]] = data.pop("input")
    missing = [n for n in names if n not in data]
    if missing:
        raise DataError(f"{path}: missing input array(s) {missing} (found {sorted(data)})")
    inputs = {n: data[n] for n in names}
    for n, arr in inputs.items():
        if len(arr) != len(labels):
            raise DataError(f"{path}: '{n}' has {len(arr)} rows, 'labels' {len(labels)}")
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{path}: 'labels' must be 1-D integers, got {labels.shape} {labels.dtype}")
    return inputs, labels


def run_batches(
    fn: Callable[[dict[str, np.ndarray]], np.ndarray], inputs: Mapping[str, np.ndarray], batch: int
) -> np.ndarray:
    n = len(next(iter(inputs.values())))
    parts = [fn({k: v[i : i + batch] for k, v in inputs.items()}) for i in range(0, n, batch)]
    return np.concatenate(parts)


def cloud_from_onnx(path: Path, *, output: str | None = None) -> CloudPredictor:
    """Cloud answers from an ONNX file run in-process (arg-max of ``output``, default first)."""
    import onnxruntime as ort

    try:
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own unexported types
        raise DataError(f"{path}: cannot load the cloud model: {exc}") from exc
    names = [o.name for o in sess.get_outputs()]
    out = output or names[0]
    if out not in names:
        raise ConfigError(f"cloud model {path} has no output {out!r} (it has {names})")

    def predict(inputs: Mapping[str, np.ndarray]) -> np.ndarray:
        res = np.asarray(sess.run([out], dict(inputs))[0])
        return np.asarray(res.reshape(len(res), -1).argmax(1))

    return predict


def cloud_from_region(
    endpoint: str, *, model: str, version: str | None = None, timeout: float = 10.0, **opts: Any
) -> tuple[CloudPredictor, Callable[[], None]]:
    """Cloud answers from a live region (V2 over its transport); returns (predict, close)."""
    from edgecloud.transport import open_transport
    from edgecloud.transport.v2 import InferRequest

    transport = open_transport(endpoint, region="tune", **opts)

    def predict(inputs: Mapping[str, np.ndarray]) -> np.ndarray:
        r = transport.infer(
            InferRequest(model=model, inputs=dict(inputs), version=version), timeout=timeout
        )
        first = np.asarray(next(iter(r.outputs.values())))
        return np.asarray(first.reshape(len(first), -1).argmax(1))

    return predict, transport.close


def _reshape(inputs: Mapping[str, np.ndarray], shape: Sequence[int] | None) -> dict[str, Any]:
    if shape is None:
        return dict(inputs)
    return {k: v.reshape(len(v), *shape) for k, v in inputs.items()}


def tune_package(
    package: Path,
    out: Path,
    *,
    public_key: Any,
    signing_key: Any,
    inputs: Mapping[str, np.ndarray],
    labels: np.ndarray,
    cloud: CloudPredictor,
    targets: Sequence[cal.Target],
    use: int = 0,
    measure: str = "max_probability",
    version: str | None = None,
    cloud_inputs: Mapping[str, np.ndarray] | None = None,
    cloud_input_shape: Sequence[int] | None = None,
    variant: str = "auto",
    compare_variants: bool = True,
    fit_fraction: float = 0.5,
    seed: int = 0,
    batch: int = 256,
    force: bool = False,
    vector: bool = False,
) -> tuple[TuneResult, Any]:
    """Tune ``package`` and write the result as a new signed package at ``out``."""
    from edgecloud.package import write_package
    from edgecloud.runtime.loader import load_backend

    backend = load_backend(package, public_key=public_key, variant=variant, warmup=False)
    try:
        manifest = backend.manifest
        if manifest is None:
            raise ConfigError(f"{package}: the backend carries no manifest")
        if manifest.confidence == "none":
            raise ConfigError(f"package '{manifest.name}' defines no confidence: nothing to tune")
        score = manifest.score_output

        def edge(b: dict[str, np.ndarray]) -> np.ndarray:
            return np.asarray(backend.infer(b)[score])

        logits = run_batches(edge, inputs, batch)
        chosen_variant = backend.variant.name if backend.variant is not None else ""
    finally:
        backend.close()
    if manifest.confidence == "probabilities":
        logits = np.log(np.clip(logits.astype(np.float64), 1e-12, 1.0))
    cin = _reshape(cloud_inputs if cloud_inputs is not None else inputs, cloud_input_shape)
    cloud_pred = run_batches(cloud, cin, batch)
    res = tune(
        logits,
        cloud_pred,
        labels,
        targets=targets,
        use=use,
        measure=measure,
        fit_fraction=fit_fraction,
        seed=seed,
        vector=vector,
    )
    routing = res.routing()
    routing["variant"] = chosen_variant
    if compare_variants:
        res.variants = variant_report(
            package, public_key, inputs, labels, cloud_pred, targets[use], measure, seed, batch
        )
        if res.variants:
            routing["variants"] = res.variants
    new_version = version or f"{manifest.version}-tuned"
    new = dataclasses.replace(
        manifest,
        version=new_version,
        created="",
        routing=routing,
        metadata={**manifest.metadata, "confidence_threshold": routing["threshold"]},
    )
    root = Path(package)
    files = {f.path: root / f.path for f in manifest.files}
    written = write_package(out, new, files, signing_key=signing_key, force=force)
    return res, written


def variant_report(
    package: Path,
    public_key: Any,
    inputs: Mapping[str, np.ndarray],
    labels: np.ndarray,
    cloud_pred: np.ndarray,
    target: cal.Target,
    measure: str,
    seed: int,
    batch: int,
) -> dict[str, dict[str, Any]]:
    """Every ONNX variant tuned for the same target: the offload each needs, and which regress.

    A variant that needs more than 2 points more offload than the FP32 one for the same target
    costs cloud traffic its validation-gate figures do not show: flagged ``regression``.
    """
    from edgecloud.package import verify_package
    from edgecloud.runtime.loader import load_backend

    pkg = verify_package(package, public_key, require_signature=public_key is not None)
    onnx = [v for v in pkg.manifest.variants if v.format == "onnx"]
    if len(onnx) < 2:
        return {}
    score = pkg.manifest.score_output
    report: dict[str, dict[str, Any]] = {}
    for v in onnx:
        try:
            be = load_backend(pkg, public_key=None, variant=v.name, require_signature=False)
        except Exception as exc:  # a variant this machine cannot run (FP16 on CPU, ...)
            report[v.name] = {"error": str(exc)}
            continue
        try:

            def run(b: dict[str, np.ndarray], be: Any = be) -> np.ndarray:
                return np.asarray(be.infer(b)[score])

            logits = run_batches(run, inputs, batch)
        finally:
            be.close()
        r = tune(logits, cloud_pred, labels, targets=[target], measure=measure, seed=seed)
        report[v.name] = {
            "precision": v.precision,
            "temperature": round(r.temperature, 4),
            "threshold": round(r.chosen.threshold, 6),
            "offload": round(r.chosen.offload, 4),
            "accuracy": round(r.chosen.accuracy, 4),
            "edge_accuracy": round(r.edge_accuracy, 4),
        }
    base = next(
        (v.name for v in onnx if v.precision == "fp32" and "offload" in report[v.name]), None
    )
    if base is not None:
        for name, row in report.items():
            if "offload" in row and name != base:
                row["regression"] = bool(row["offload"] > report[base]["offload"] + 0.02)
    return report
