"""Reading and checking the source ONNX model before any conversion work starts.

Every check that can refuse a model runs here, first, so a bad model costs a second rather than a
calibration run: the file must parse as ONNX, carry its weights inside (not as external data) and
fit the 2 GB protobuf limit, and use a default-domain opset that the quantizer supports (>= 10).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgecloud.errors import ConversionError
from edgecloud.package import TensorSpec

__all__ = [
    "MAX_MODEL_BYTES",
    "MIN_QUANT_OPSET",
    "ModelInfo",
    "compact_names",
    "drop_zero_zero_points",
    "inspect_model",
    "name_unnamed_nodes",
    "onnx_dtype_name",
    "preprocess",
    "slim_variant",
]

log = logging.getLogger(__name__)

#: protobuf cannot serialise a message over 2 GiB; such models need external data.
MAX_MODEL_BYTES = 2**31 - 1
#: QuantizeLinear/DequantizeLinear exist from opset 10 on; per-channel QDQ needs 13 (upgraded).
MIN_QUANT_OPSET = 10


@dataclass(frozen=True)
class ModelInfo:
    """What the converter needs to know about the source model, read once."""

    path: Path
    opset: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    op_types: frozenset[str]
    sha256: str
    size: int

    def input(self, name: str) -> TensorSpec:
        for t in self.inputs:
            if t.name == name:
                return t
        raise KeyError(name)


def onnx_dtype_name(elem_type: int) -> str:
    import onnx

    try:
        return str(np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)).name)
    except (KeyError, TypeError, ValueError) as exc:
        raise ConversionError(f"unsupported ONNX tensor element type {elem_type}") from exc


def _specs(values: Any, initializers: set[str]) -> tuple[TensorSpec, ...]:
    out = []
    for v in values:
        if v.name in initializers:
            continue  # old exporters list initializers as graph inputs
        tt = v.type.tensor_type
        dims: list[int | str] = []
        for i, d in enumerate(tt.shape.dim):
            if d.HasField("dim_value"):
                dims.append(int(d.dim_value))
            elif d.HasField("dim_param") and d.dim_param:
                dims.append(str(d.dim_param))
            else:
                dims.append(f"{v.name}_dim{i}")
        out.append(TensorSpec(name=v.name, dtype=onnx_dtype_name(tt.elem_type), shape=tuple(dims)))
    return tuple(out)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def inspect_model(path: Path, *, need_quant_opset: bool = False) -> ModelInfo:
    """Load and check ``path``; raise ConversionError saying what is wrong and what to do."""
    import onnx
    from google.protobuf.message import DecodeError  # type: ignore[import-untyped]

    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path}: no such model file")
    size = path.stat().st_size
    if size > MAX_MODEL_BYTES:
        raise ConversionError(
            f"{path}: {size / 2**30:.2f} GiB is over the 2 GiB single-file ONNX limit; "
            "models this large keep weights as external data, which edgecloud convert does not "
            "support yet (quantize it with onnxruntime.quantization using "
            "use_external_data_format=True)"
        )
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, OSError, ValueError, RuntimeError) as exc:
        raise ConversionError(f"{path} is not an ONNX model: {exc}") from exc
    if not model.graph.node and not model.graph.output:
        # protobuf happily parses many non-ONNX byte strings into an empty message
        raise ConversionError(f"{path} is not an ONNX model (no graph, no nodes, no outputs)")
    external = [
        t.name for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
    ]
    if external:
        raise ConversionError(
            f"{path}: {len(external)} initializer(s) keep their weights as external data "
            f"(e.g. {external[0]!r}); edgecloud convert needs a single-file model under 2 GiB. "
            "Inline them with onnx.load(path) + onnx.save(model, out) if the model is small enough"
        )
    opset = next((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if need_quant_opset and opset < MIN_QUANT_OPSET:
        raise ConversionError(
            f"{path}: opset {opset} is too old to quantize (INT8 needs opset >= {MIN_QUANT_OPSET}, "
            "13 or later for per-channel); upgrade it first with "
            "onnx.version_converter.convert_version(model, 13)"
        )
    inits = {t.name for t in model.graph.initializer}
    inputs = _specs(model.graph.input, inits)
    outputs = _specs(model.graph.output, set())
    if not inputs or not outputs:
        raise ConversionError(f"{path}: the graph has no inputs or no outputs")
    return ModelInfo(
        path=path,
        opset=opset,
        inputs=inputs,
        outputs=outputs,
        op_types=frozenset(n.op_type for n in model.graph.node),
        sha256=_sha256(path),
        size=size,
    )


def name_unnamed_nodes(model: Any) -> Any:
    """Give every node a unique name so exclusions and reports can refer to it."""
    seen = {n.name for n in model.graph.node if n.name}
    for i, n in enumerate(model.graph.node):
        if not n.name:
            name = f"{n.op_type}_{i}"
            while name in seen:
                name += "_"
            n.name = name
            seen.add(name)
    return model


def preprocess(src: Path, dst: Path, *, optimize: bool = True) -> Path:
    """Shape inference and graph optimisation (Conv+BN fusion etc.) before quantization.

    Uses onnxruntime's ``quant_pre_process`` (symbolic shape inference, the basic-level graph
    optimiser, ONNX shape inference), which is what onnxruntime recommends before static
    quantization. The result is also the FP32 variant, so every variant shares one graph.
    """
    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    tmp = dst.with_name(dst.stem + ".pre.onnx")
    try:
        try:
            quant_pre_process(str(src), str(tmp), skip_optimization=not optimize)
        except Exception as exc:  # symbolic shape inference fails on some exotic graphs
            log.warning("symbolic shape inference failed (%s); retrying without it", exc)
            quant_pre_process(
                str(src), str(tmp), skip_optimization=not optimize, skip_symbolic_shape=True
            )
        model = onnx.load(str(tmp))
    except ConversionError:
        raise
    except Exception as exc:
        raise ConversionError(
            f"{src}: pre-processing (shape inference, optimisation) failed: {exc}"
        ) from exc
    finally:
        tmp.unlink(missing_ok=True)
    onnx.save(name_unnamed_nodes(model), str(dst))
    return dst


def compact_names(model: Any) -> Any:
    """Shorten internal tensor names and QuantizeLinear/DequantizeLinear node names in place.

    The quantizer names every scale, zero point and Q/DQ node after the tensor it belongs to
    (``ConvBnFusion_W_conv2.weight_quantized_scale``...). On a small model those names are a
    large share of the file, which matters on devices that download packages over slow links.
    Graph inputs/outputs and the names of the model's own nodes are kept (exclusions and error
    messages refer to them). Graphs with subgraphs (If/Loop/Scan) are left alone, since their
    bodies may refer to outer tensors by name.
    """
    import onnx

    graph = model.graph
    if any(
        a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
        for n in graph.node
        for a in n.attribute
    ):
        return model
    keep = {v.name for v in graph.input} | {v.name for v in graph.output}
    mapping: dict[str, str] = {}

    def short(name: str) -> str:
        if not name or name in keep:
            return name
        if name not in mapping:
            mapping[name] = f"t{len(mapping)}"
        return mapping[name]

    for t in graph.initializer:
        t.name = short(t.name)
        t.doc_string = ""
    for n in graph.node:
        n.input[:] = [short(x) for x in n.input]
        n.output[:] = [short(x) for x in n.output]
        n.doc_string = ""
    for n in graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            n.name = ""  # optional in ONNX; onnxruntime names them itself
    for v in graph.value_info:
        v.name = short(v.name)
    del graph.value_info[:]  # onnxruntime re-infers shapes on load
    return model


def drop_zero_zero_points(model: Any) -> Any:
    """Remove all-zero int8/int32 zero points of DequantizeLinear (the spec's default is 0).

    Symmetric int8 weights and int32 biases always have zero zero points; storing one per channel
    is dead weight in a file whose point is to be small. Only where onnxruntime's QDQ fusion does
    not need it (measured with onnxruntime 1.32): Conv weights and int32 biases lose it and still
    become QLinearConv, while a Gemm/MatMul weight without one is no longer fused into QGemm.
    """
    import onnx
    from onnx import numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    dropped: set[str] = set()
    for n in graph.node:
        if n.op_type != "DequantizeLinear" or len(n.input) < 3 or n.input[2] not in inits:
            continue
        zp = inits[n.input[2]]
        if zp.data_type not in (onnx.TensorProto.INT8, onnx.TensorProto.INT32):
            continue
        x = inits.get(n.input[0])
        if x is None or x.data_type != zp.data_type:
            continue  # activations: keep (the type of x must stay pinned by the zero point)
        users = [m.op_type for m in graph.node if n.output[0] in m.input]
        if zp.data_type == onnx.TensorProto.INT8 and (not users or set(users) != {"Conv"}):
            continue
        if numpy_helper.to_array(zp).any():
            continue
        dropped.add(zp.name)
        del n.input[2]
    still_used = {i for n in graph.node for i in n.input}
    keep = [t for t in graph.initializer if t.name not in dropped or t.name in still_used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    return model


def slim_variant(path: Path) -> dict[str, str]:
    """Make a variant file small; return the metadata_props it carried (for the manifest)."""
    import onnx

    model = onnx.load(str(path))
    meta = {p.key: p.value for p in model.metadata_props}
    if model.doc_string:
        meta["doc_string"] = model.doc_string
    # The manifest carries these once for every variant (metadata.onnx_metadata).
    del model.metadata_props[:]
    model.doc_string = ""
    model.graph.doc_string = ""
    compact_names(model)
    drop_zero_zero_points(model)
    onnx.save(model, str(path))
    return meta
