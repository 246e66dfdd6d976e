"""Per-layer quantization sensitivity: which nodes cost the accuracy, and why.

Two measurements per quantizable node, both against the FP32 model on validation data:

* **SQNR** (static QDQ only), in the spirit of onnxruntime's QDQ loss debugging
  (``onnxruntime.quantization.qdq_loss_debug``): the fully quantized model and the FP32 model
  are both run with every intermediate tensor exposed; for each node, the noise its own
  quantization adds is the SQNR of its weight (float vs dequantized) combined with the SQNR of
  its activation inputs across their Q/DQ pair, and ``output_sqnr_db`` is how far its output has
  drifted from FP32 in the quantized model (the noise accumulated up to there). One run of each
  model, so it scales to large graphs.
* **Isolated error**: the model with *only this node* quantized, scored by the relative L2 error
  of the output against FP32 and by the converter's gate metric. One quantization per node, so
  it is capped (``max_isolated``); it is what the accuracy search ranks by, because it measures
  the effect on the output, which a tensor's SQNR only suggests.

Ranking: isolated error, largest first; nodes without one follow, by SQNR, worst first.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from converters.data import ArrayCalibrationReader, Dataset
from converters.progress import NullReporter, Reporter
from converters.search_space import Candidate, Family
from converters.validate import Task
from edgecloud.errors import ConfigError

__all__ = [
    "NodeSensitivity",
    "SensitivityReport",
    "inspect_quant",
    "measure_sensitivity",
    "quantizable_nodes",
]


@dataclass(frozen=True)
class NodeSensitivity:
    """One node's figures; ``None`` where that measurement was not made."""

    name: str
    op_type: str
    sqnr_db: float | None = None
    weight_sqnr_db: float | None = None
    output_sqnr_db: float | None = None
    isolated_error: float | None = None
    isolated_loss_pct: float | None = None

    def sort_key(self) -> tuple[int, float, float]:
        sq = self.sqnr_db if self.sqnr_db is not None else math.inf
        if self.isolated_error is not None:
            return (0, -self.isolated_error, sq)
        return (1, sq, 0.0)


@dataclass
class SensitivityReport:
    """Nodes ranked most sensitive first, with the setting they were measured under."""

    model: str
    family: Family
    settings: dict[str, Any]
    task: str
    metric: str
    full_loss_pct: float | None
    nodes: list[NodeSensitivity] = field(default_factory=list)
    seconds: float = 0.0
    complete: bool = True  # False when a budget cut the isolated measurements short

    def ranked_names(self) -> list[str]:
        return [n.name for n in self.nodes]

    def worst(self, k: int = 5) -> list[NodeSensitivity]:
        return self.nodes[:k]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["nodes"] = [asdict(n) for n in self.nodes]
        return d

    def table(self, limit: int | None = 30) -> Any:
        from rich.table import Table

        t = Table(
            title=f"Quantization sensitivity of {Path(self.model).name} ({self.settings_label()})",
            caption=(
                "isolated: only this node quantized, output rel. L2 vs FP32 and gate loss; "
                "SQNR: noise the node's own Q/DQ adds (higher is better)"
            ),
        )
        for col, just in (
            ("#", "right"),
            ("node", "left"),
            ("op", "left"),
            ("isolated rel.L2", "right"),
            (f"isolated loss % ({self.metric})", "right"),
            ("SQNR dB", "right"),
            ("weight dB", "right"),
            ("output dB", "right"),
        ):
            t.add_column(col, justify=just)  # type: ignore[arg-type]

        def f(x: float | None, fmt: str) -> str:
            return "-" if x is None else format(x, fmt)

        for i, n in enumerate(self.nodes[:limit] if limit else self.nodes, 1):
            t.add_row(
                str(i),
                n.name,
                n.op_type,
                f(n.isolated_error, ".4f"),
                f(n.isolated_loss_pct, ".2f"),
                f(n.sqnr_db, ".1f"),
                f(n.weight_sqnr_db, ".1f"),
                f(n.output_sqnr_db, ".1f"),
            )
        return t

    def settings_label(self) -> str:
        s = self.settings
        bits: list[str] = [self.family]
        if self.family == "static":
            bits.append(str(s.get("calib_method")))
        bits.append("per-channel" if s.get("per_channel") else "per-tensor")
        return " ".join(bits)


def _registry(family: Family) -> set[str]:
    from onnxruntime.quantization.registry import (
        IntegerOpsRegistry,
        QDQRegistry,
        QLinearOpsRegistry,
    )

    if family == "dynamic":
        # Gemm too: the dynamic quantizer rewrites it to MatMul + Add and quantizes the MatMul
        return set(IntegerOpsRegistry) | {"Gemm"}
    return set(QDQRegistry) | set(QLinearOpsRegistry)


def quantizable_nodes(model_path: Path, family: Family) -> list[tuple[str, str]]:
    """``(name, op_type)`` of every node the quantizer of ``family`` may quantize, graph order."""
    import onnx

    ops = _registry(family)
    graph = onnx.load(str(model_path), load_external_data=False).graph
    return [(n.name, n.op_type) for n in graph.node if n.op_type in ops and n.name]


def _sqnr(x: Sequence[np.ndarray] | np.ndarray, y: Sequence[np.ndarray] | np.ndarray) -> float:
    from onnxruntime.quantization.qdq_loss_debug import (
        compute_signal_to_quantization_noice_ratio,
    )

    return float(compute_signal_to_quantization_noice_ratio(x, y))


def _combine_db(values: list[float]) -> float | None:
    """SQNR of independent noises added together: their noise powers sum."""
    if not values:
        return None
    power = sum(10.0 ** (-v / 10.0) for v in values)
    return -10.0 * math.log10(power) if power > 0 else math.inf


def _activation_qparams(qdq_model: Any) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """float tensor name -> (scale, zero point) of the Q/DQ pair the quantizer put on it."""
    from onnx import numpy_helper

    inits = {t.name: t for t in qdq_model.graph.initializer}
    suffix = "_DequantizeLinear_Output"
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for n in qdq_model.graph.node:
        if n.op_type != "DequantizeLinear" or not n.output[0].endswith(suffix):
            continue
        if n.input[0] in inits or len(n.input) < 3:  # weights are matched separately
            continue
        scale, zp = inits.get(n.input[1]), inits.get(n.input[2])
        if scale is None or zp is None:
            continue
        out[n.output[0][: -len(suffix)]] = (numpy_helper.to_array(scale), numpy_helper.to_array(zp))
    return out


def _fake_quant(x: np.ndarray, scale: np.ndarray, zp: np.ndarray) -> np.ndarray:
    info = np.iinfo(zp.dtype)
    q = np.clip(np.rint(x / scale) + zp.astype(np.float64), info.min, info.max)
    deq: np.ndarray = ((q - zp.astype(np.float64)) * scale).astype(np.float32)
    return deq


def sqnr_by_node(
    fp32: Path, qdq: Path, data: Dataset, work_dir: Path, *, samples: int = 16
) -> dict[str, tuple[float | None, float | None, float | None]]:
    """node name -> (node SQNR dB, weight SQNR dB, output SQNR dB) for a static QDQ model.

    A node's own noise is measured on the FP32 model's tensors: its weight against the
    dequantized weight, and each activation input against itself passed through the Q/DQ
    parameters the quantizer chose for it. Comparing the QDQ model's tensors before and after
    their Q/DQ pair instead would mistake a Relu folded into the quantization range for noise.
    ``output`` is the drift of the node's output in the quantized model (accumulated noise).
    """
    import onnx
    from onnxruntime.quantization.qdq_loss_debug import (
        collect_activations,
        create_weight_matching,
        modify_model_output_intermediate_tensors,
    )

    aug_f = work_dir / "sqnr-fp32.onnx"
    aug_q = work_dir / "sqnr-qdq.onnx"
    modify_model_output_intermediate_tensors(str(fp32), str(aug_f))
    modify_model_output_intermediate_tensors(str(qdq), str(aug_q))
    reader = ArrayCalibrationReader(data, batch_size=8, limit=samples)
    float_acts = collect_activations(str(aug_f), reader.as_ort_reader())
    reader.rewind()
    qdq_acts = collect_activations(str(aug_q), reader.as_ort_reader())
    weights = create_weight_matching(str(fp32), str(qdq))
    qparams = _activation_qparams(onnx.load(str(qdq), load_external_data=False))
    graph = onnx.load(str(fp32), load_external_data=False).graph
    out: dict[str, tuple[float | None, float | None, float | None]] = {}
    for n in graph.node:
        w_db: list[float] = []
        x_db: list[float] = []
        for name in n.input:
            if name in weights:
                w_db.append(_sqnr(weights[name]["float"], weights[name]["dequantized"]))
            elif name in qparams and name in float_acts:
                scale, zp = qparams[name]
                xs = float_acts[name]
                x_db.append(_sqnr(xs, [_fake_quant(x, scale, zp) for x in xs]))
        if not w_db and not x_db:
            continue
        res = n.output[0] if n.output else ""
        out_db = None
        post = qdq_acts.get(res + "_DequantizeLinear_Output") or qdq_acts.get(res)
        if res in float_acts and post is not None:
            out_db = _sqnr(float_acts[res], post)
        out[n.name] = (_combine_db(w_db + x_db), _combine_db(w_db), out_db)
    for p in (aug_f, aug_q):
        p.unlink(missing_ok=True)
    return out


def _sqnr_samples(data: Dataset) -> int:
    """Samples for the SQNR pass: every intermediate tensor of both models is held in memory,
    so large inputs (a 224x224 image: 150k values) get 4 samples, small ones 16."""
    per_sample = sum(int(np.prod(v.shape[1:])) for v in data.inputs.values())
    return 16 if per_sample < 50_000 else 4


def measure_sensitivity(
    quantizer: Any,
    evaluator: Any,
    candidate: Candidate,
    work_dir: Path,
    *,
    full_variant: Path | None = None,
    full_loss_pct: float | None = None,
    isolated: bool = True,
    sqnr: bool = True,
    max_isolated: int = 64,
    sqnr_samples: int | None = None,
    deadline: float | None = None,
    reporter: Reporter | None = None,
) -> SensitivityReport:
    """Rank the quantizable nodes of ``candidate``'s model (see the module docstring).

    ``quantizer``/``evaluator`` are a ``TrialQuantizer``/``TrialEvaluator`` (shared with the
    search, so calibration and the FP32 reference are reused). ``deadline`` (monotonic seconds)
    stops the isolated measurements early; the report then says ``complete=False``.
    """
    reporter = reporter or NullReporter()
    started = time.monotonic()
    src: Path = quantizer.src
    nodes = quantizable_nodes(src, candidate.family)
    already = set(candidate.settings.exclude_nodes)
    nodes = [(n, op) for n, op in nodes if n not in already]
    if not nodes:
        raise ConfigError(f"{src}: no node that {candidate.family} INT8 quantizes")
    work_dir.mkdir(parents=True, exist_ok=True)
    sq: dict[str, tuple[float | None, float | None, float | None]] = {}
    if sqnr and candidate.family == "static":
        full = full_variant
        if full is None or not Path(full).is_file():
            full = quantizer.quantize(candidate, work_dir / "sens-full.onnx")
        with reporter.stage("SQNR per node (FP32 vs QDQ activations)", total=None):
            n = sqnr_samples if sqnr_samples is not None else _sqnr_samples(evaluator.val)
            sq = sqnr_by_node(src, Path(full), evaluator.val, work_dir, samples=n)
    order = [n for n, _ in nodes]
    if sq:  # measure the worst-SQNR nodes first, so a cap or a deadline keeps the likely culprits

        def worst_first(name: str) -> float:
            db = sq.get(name, (None, None, None))[0]
            return math.inf if db is None else db

        order.sort(key=worst_first)
    iso: dict[str, tuple[float, float]] = {}
    complete = True
    if isolated:
        todo = order[:max_isolated]
        complete = len(todo) == len(order)
        all_names = tuple(n for n, _ in nodes)
        with reporter.stage("isolated sensitivity (one node quantized)", total=len(todo)) as adv:
            for name in todo:
                if deadline is not None and time.monotonic() >= deadline:
                    complete = False
                    break
                others = tuple(x for x in all_names if x != name)
                probe = Candidate(
                    candidate.family,
                    replace(candidate.settings, exclude_nodes=tuple(already) + others),
                    f"only {name}",
                )
                path = quantizer.quantize(probe, work_dir / "sens-probe.onnx")
                ev = evaluator.evaluate(path, latency=False)
                iso[name] = (float(ev.metrics.rel_l2), ev.loss_pct)
                adv(1)
    ops = dict(nodes)
    result = []
    for name in order:
        s = sq.get(name, (None, None, None))
        i = iso.get(name)
        result.append(
            NodeSensitivity(
                name=name,
                op_type=ops[name],
                sqnr_db=s[0],
                weight_sqnr_db=s[1],
                output_sqnr_db=s[2],
                isolated_error=None if i is None else i[0],
                isolated_loss_pct=None if i is None else i[1],
            )
        )
    result.sort(key=NodeSensitivity.sort_key)
    gate_metric = (
        "rel_l2"
        if evaluator.task == "regression"
        else (
            "accuracy"
            if evaluator.val.labels is not None and evaluator.task == "classification"
            else ("top1_agreement" if evaluator.task == "classification" else "cosine")
        )
    )
    return SensitivityReport(
        model=str(src),
        family=candidate.family,
        settings=candidate.settings.describe(),
        task=evaluator.task,
        metric=gate_metric,
        full_loss_pct=full_loss_pct,
        nodes=result,
        seconds=time.monotonic() - started,
        complete=complete,
    )


def inspect_quant(
    model_path: Path,
    calib: Path | Dataset,
    val: Path | Dataset,
    *,
    family: Family | Literal["auto"] = "auto",
    task: Task | None = None,
    tolerance_pct: float = 1.0,
    isolated: bool = True,
    max_isolated: int = 64,
    work_dir: Path | None = None,
    reporter: Reporter | None = None,
) -> SensitivityReport:
    """Per-node sensitivity of ``model_path`` under the default INT8 setting of ``family``.

    ``auto`` picks the family as ``edgecloud convert --int8 auto`` would (static QDQ for
    Conv-heavy models, dynamic for MatMul-heavy ones). The model is pre-processed first, so node
    names are those the converter's ``--exclude-nodes`` and the search's report use.
    """
    from converters.search_runner import prepare
    from converters.search_space import candidates

    with tempfile.TemporaryDirectory(prefix="edgecloud-inspect-") as tmp:
        wd = Path(work_dir) if work_dir is not None else Path(tmp)
        ctx = prepare(
            model_path,
            calib,
            val,
            work_dir=wd,
            task=task,
            tolerance_pct=tolerance_pct,
            int8=family,
            preprocessed=False,
        )
        cand = candidates(ctx.profile, ctx.families)[0]
        full = ctx.quantizer.quantize(cand, wd / "inspect-full.onnx")
        full_eval = ctx.evaluator.evaluate(full, latency=False)
        report = measure_sensitivity(
            ctx.quantizer,
            ctx.evaluator,
            cand,
            wd,
            full_variant=full,
            full_loss_pct=full_eval.loss_pct,
            isolated=isolated,
            max_isolated=max_isolated,
            reporter=reporter,
        )
        report.model = str(model_path)
        return report
