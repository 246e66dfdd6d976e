"""Reading and checking the source ONNX model before any conversion work starts.

Every check that can refuse a model runs here, first, so a bad model costs a second rather than a
calibration run: the file must parse as ONNX, its external data files (``model.onnx.data``, what
``torch.onnx.export`` writes by default) must be there, and it must use a default-domain opset that
the quantizer supports (>= 10).

External data is loaded transparently: a model whose weights fit the 2 GiB protobuf limit is
inlined into one file in the converter's temporary folder, a larger one keeps its weights as
external data through every step (``ModelInfo.large``). Outputs that are not tensors are only
accepted where they have a tensor form: scikit-learn's ZipMap (a list of {class: probability}
dicts) becomes the probability tensor it wraps.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from converters.graph import compact_names, drop_zero_zero_points, topological_sort
from edgecloud.errors import ConversionError, DataError
from edgecloud.package import TensorSpec

__all__ = [
    "INLINE_LIMIT",
    "MAX_MODEL_BYTES",
    "MIN_QUANT_OPSET",
    "ModelFileError",
    "ModelInfo",
    "compact_names",
    "drop_zero_zero_points",
    "external_files",
    "has_external_data",
    "inspect_model",
    "name_unnamed_nodes",
    "onnx_dtype_name",
    "preprocess",
    "remove_model",
    "save_model",
    "slim_variant",
    "topological_sort",
    "unzip_maps",
    "zipmap_outputs",
]

log = logging.getLogger(__name__)

#: protobuf cannot serialise a message over 2 GiB; such models need external data.
MAX_MODEL_BYTES = 2**31 - 1
#: weights up to this many bytes are inlined into one file; above, they stay external data
#: (a module variable so tests can exercise the large-model path with a small model)
INLINE_LIMIT = MAX_MODEL_BYTES - (64 << 20)
#: QuantizeLinear/DequantizeLinear exist from opset 10 on; per-channel QDQ needs 13 (upgraded).
MIN_QUANT_OPSET = 10


class ModelFileError(ConversionError, DataError):
    """The source model itself is unusable (bad input: ``edgecloud convert`` exits 2)."""


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
    #: bytes of weights stored in external data files (0: a single-file model)
    external_bytes: int = 0
    #: whether the weights stay external data through conversion (over ``INLINE_LIMIT``)
    large: bool = False
    #: output name -> what it was in the source (e.g. "ZipMap"): rewritten to a tensor
    rewritten_outputs: tuple[tuple[str, str], ...] = ()

    def input(self, name: str) -> TensorSpec:
        for t in self.inputs:
            if t.name == name:
                return t
        raise KeyError(name)

    def output(self, name: str) -> TensorSpec:
        for t in self.outputs:
            if t.name == name:
                return t
        raise KeyError(name)


def onnx_dtype_name(elem_type: int) -> str:
    import onnx

    try:
        return str(np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)).name)
    except (KeyError, TypeError, ValueError) as exc:
        raise ConversionError(f"unsupported ONNX tensor element type {elem_type}") from exc


def _dims(v: Any) -> list[int | str]:
    dims: list[int | str] = []
    for i, d in enumerate(v.type.tensor_type.shape.dim):
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param") and d.dim_param:
            dims.append(str(d.dim_param))
        else:
            dims.append(f"{v.name}_dim{i}")
    return dims


def _specs(values: Any, initializers: set[str]) -> tuple[TensorSpec, ...]:
    out = []
    for v in values:
        if v.name in initializers:
            continue  # old exporters list initializers as graph inputs
        if not v.type.HasField("tensor_type"):
            kind = v.type.WhichOneof("value") or "unknown"
            raise ConversionError(
                f"'{v.name}' is a {kind.replace('_type', '')}, not a tensor; edgecloud packages "
                "carry tensors only (a ZipMap output is converted automatically; for other "
                "outputs re-export the model with tensor outputs)"
            )
        tt = v.type.tensor_type
        out.append(
            TensorSpec(name=v.name, dtype=onnx_dtype_name(tt.elem_type), shape=tuple(_dims(v)))
        )
    return tuple(out)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def external_files(model: Any, base: Path) -> dict[str, Path]:
    """Initializer name -> the external data file it lives in (for ``model`` loaded from base)."""
    import onnx

    out: dict[str, Path] = {}
    for t in model.graph.initializer:
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        loc = next((e.value for e in t.external_data if e.key == "location"), "")
        out[t.name] = base / loc
    return out


def zipmap_outputs(model: Any) -> dict[str, Any]:
    """Graph outputs produced by a ZipMap node -> that node (scikit-learn's default output)."""
    producers = {o: n for n in model.graph.node for o in n.output}
    return {
        v.name: producers[v.name]
        for v in model.graph.output
        if v.name in producers and producers[v.name].op_type == "ZipMap"
    }


def unzip_maps(model: Any) -> list[str]:
    """Replace each ZipMap output with the probability tensor it wraps, under the same name.

    A list of ``{class: probability}`` maps is not a tensor: onnxruntime's sessions, the V2
    protocol and the router all need the ``[N, C]`` float tensor, which is the ZipMap's input.
    """
    import onnx

    found = zipmap_outputs(model)
    graph = model.graph
    for name, node in found.items():
        src = node.input[0]
        n_classes = next(
            (
                len(a.ints) or len(a.strings)
                for a in node.attribute
                if a.name in ("classlabels_int64s", "classlabels_strings")
            ),
            0,
        )
        graph.node.remove(node)
        ident = onnx.helper.make_node("Identity", [src], [name], name=f"{name}_tensor")
        graph.node.append(ident)
        for i, v in enumerate(graph.output):
            if v.name == name:
                first = graph.output[0] if graph.output[0].name != name else None
                batch: int | str = "N"
                if first is not None and first.type.HasField("tensor_type"):
                    d = first.type.tensor_type.shape.dim
                    if d and d[0].HasField("dim_value"):
                        batch = int(d[0].dim_value)
                    elif d and d[0].dim_param:
                        batch = str(d[0].dim_param)
                graph.output[i].CopyFrom(
                    onnx.helper.make_tensor_value_info(
                        name, onnx.TensorProto.FLOAT, [batch, n_classes or None]
                    )
                )
    return list(found)


def inspect_model(path: Path, *, need_quant_opset: bool = False) -> ModelInfo:
    """Load and check ``path``; raise ConversionError saying what is wrong and what to do."""
    import onnx
    from google.protobuf.message import DecodeError  # type: ignore[import-untyped]

    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such model file")
    size = path.stat().st_size
    if size > MAX_MODEL_BYTES:
        raise ModelFileError(
            f"{path}: {size / 2**30:.2f} GiB in one file is over protobuf's 2 GiB limit, so it "
            "cannot be a valid ONNX model; save it with external data "
            "(onnx.save(model, path, save_as_external_data=True))"
        )
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, OSError, ValueError, RuntimeError) as exc:
        raise ModelFileError(f"{path} is not an ONNX model: {exc}") from exc
    if not model.graph.node and not model.graph.output:
        # protobuf happily parses many non-ONNX byte strings into an empty message
        raise ModelFileError(f"{path} is not an ONNX model (no graph, no nodes, no outputs)")
    ext = external_files(model, path.parent)
    missing = sorted({str(p.name) for p in ext.values() if not p.is_file()})
    if missing:
        raise ModelFileError(
            f"{path}: its weights are stored as external data in {missing}, which is not next "
            "to the model; copy the .data file(s) beside it"
        )
    external_bytes = sum(p.stat().st_size for p in set(ext.values()))
    opset = next((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if need_quant_opset and opset < MIN_QUANT_OPSET:
        raise ModelFileError(
            f"{path}: opset {opset} is too old to quantize (INT8 needs opset >= {MIN_QUANT_OPSET}, "
            "13 or later for per-channel); upgrade it first with "
            "onnx.version_converter.convert_version(model, 13)"
        )
    rewritten = tuple((name, "ZipMap") for name in unzip_maps(model))
    inits = {t.name for t in model.graph.initializer}
    try:
        inputs = _specs(model.graph.input, inits)
        outputs = _specs(model.graph.output, set())
    except ConversionError as exc:
        raise ModelFileError(f"{path}: {exc}") from exc
    if not inputs or not outputs:
        raise ModelFileError(f"{path}: the graph has no inputs or no outputs")
    return ModelInfo(
        path=path,
        opset=opset,
        inputs=inputs,
        outputs=outputs,
        op_types=frozenset(n.op_type for n in model.graph.node),
        sha256=_sha256(path),
        size=size,
        external_bytes=external_bytes,
        large=size + external_bytes > INLINE_LIMIT,
        rewritten_outputs=rewritten,
    )


def has_external_data(path: Path) -> bool:
    """Whether the ONNX file at ``path`` keeps weights in external data files."""
    import onnx

    return bool(external_files(onnx.load(str(path), load_external_data=False), Path(path).parent))


def save_model(model: Any, path: Path, *, large: bool | None = None) -> Path:
    """Save ``model`` to ``path``; weights go to ``<name>.data`` beside it when ``large``.

    ``large=None``: decide from the model's size (protobuf refuses a message over 2 GiB).
    """
    import onnx

    path = Path(path)
    if large is None:
        try:
            large = model.ByteSize() > INLINE_LIMIT
        except ValueError:  # protobuf: message too large to measure
            large = True
    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)
    if large:
        onnx.save(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data.name,
            size_threshold=1024,
        )
    else:
        onnx.save(model, str(path))
    return path


def remove_model(path: Path) -> None:
    """Delete an ONNX file and its external data file, if any."""
    path = Path(path)
    path.unlink(missing_ok=True)
    path.with_name(path.name + ".data").unlink(missing_ok=True)


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


def preprocess(src: Path, dst: Path, *, optimize: bool = True, large: bool = False) -> Path:
    """Shape inference and graph optimisation (Conv+BN fusion etc.) before quantization.

    Uses onnxruntime's ``quant_pre_process`` (symbolic shape inference, the basic-level graph
    optimiser, ONNX shape inference), which is what onnxruntime recommends before static
    quantization. The result is also the FP32 variant, so every variant shares one graph.

    Everything runs inside ``dst``'s folder, also as the working directory: onnxruntime's
    symbolic shape inference, when it gives up, saves ``sym_shape_infer_temp.onnx`` and a
    ``<uuid>`` data file into the current directory, which must stay the user's, untouched.
    The source's external data is read from beside it; ZipMap outputs become tensors.
    """
    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    src, dst = Path(src).resolve(), Path(dst).resolve()
    staged = dst.with_name(dst.stem + ".src.onnx")
    tmp = dst.with_name(dst.stem + ".pre.onnx")
    ext: dict[str, Any] = {"save_as_external_data": large}
    if large:
        ext["all_tensors_to_one_file"] = True
        ext["external_data_location"] = tmp.name + ".data"
    with contextlib.chdir(dst.parent):
        try:
            model = onnx.load(str(src))  # external data, if any, comes along
            unzip_maps(model)
            save_model(model, staged, large=large)
            del model
            try:
                quant_pre_process(str(staged), str(tmp), skip_optimization=not optimize, **ext)
            except Exception as exc:  # symbolic shape inference fails on some exotic graphs
                log.warning("symbolic shape inference failed (%s); retrying without it", exc)
                quant_pre_process(
                    str(staged),
                    str(tmp),
                    skip_optimization=not optimize,
                    skip_symbolic_shape=True,
                    **ext,
                )
            model = onnx.load(str(tmp))
        except ConversionError:
            raise
        except Exception as exc:
            raise ConversionError(
                f"{src.name}: pre-processing (shape inference, optimisation) failed: {exc}"
            ) from exc
        finally:
            remove_model(staged)
            remove_model(tmp)
            for junk in dst.parent.glob("sym_shape_infer_temp.onnx*"):
                junk.unlink(missing_ok=True)
        save_model(name_unnamed_nodes(model), dst, large=large)
    return dst


def slim_variant(path: Path) -> dict[str, str]:
    """Make a variant file small; return the metadata_props it carried (for the manifest)."""
    import onnx

    large = has_external_data(path)
    model = onnx.load(str(path))
    meta = {p.key: p.value for p in model.metadata_props}
    if model.doc_string:
        meta["doc_string"] = model.doc_string
    # The manifest carries these once for every variant (metadata.onnx_metadata).
    del model.metadata_props[:]
    model.doc_string = ""
    model.graph.doc_string = ""
    fp16 = any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)
    compact_names(model, keep_value_info=fp16)
    drop_zero_zero_points(model)
    save_model(model, path, large=large)
    return meta
