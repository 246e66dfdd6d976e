"""The converter's shape: no import circle in ``converters/``, modules of a readable size, and one
static INT8 quantizer (``--int8 static`` and the search's static trials make the same graph)."""

from __future__ import annotations

import ast
import hashlib
from pathlib import Path

import onnx
import pytest
from onnx import numpy_helper

from converters import ConvertOptions, convert
from converters.model import slim_variant
from converters.quantize import StaticInt8Settings
from converters.search_runner import prepare
from converters.search_space import Candidate

ROOT = Path(__file__).resolve().parents[2]
MAX_LINES = 500


def _imports(path: Path) -> set[str]:
    """Every ``converters.*`` module ``path`` imports, at top level, in functions, or for typing."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "converters":
                out |= {f"converters.{a.name}" for a in node.names}
            elif node.module.startswith("converters."):
                out.add(node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("converters.")}
    return out


def _graph() -> dict[str, set[str]]:
    mods = {f"converters.{p.stem}": p for p in (ROOT / "converters").glob("*.py")}
    mods.pop("converters.__init__")
    return {m: {d for d in _imports(p) if d in mods and d != m} for m, p in mods.items()}


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                return [*stack[stack.index(d) :], d]
            if d not in state and (found := visit(d)) is not None:
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)) is not None:
            return found
    return None


def test_no_import_circle_in_converters() -> None:
    graph = _graph()
    assert {"converters.pipeline", "converters.tensorrt", "converters.autotune"} <= set(graph)
    assert _find_cycle(graph) is None, " -> ".join(_find_cycle(graph) or [])


def test_no_private_module_of_another_package() -> None:
    """``converters`` uses ``edgecloud``'s public modules only (no ``edgecloud._x``)."""
    private = {
        f"{p.name}: {m}"
        for p in (ROOT / "converters").glob("*.py")
        for node in ast.walk(ast.parse(p.read_text()))
        if isinstance(node, ast.ImportFrom | ast.Import)
        for m in (
            [node.module or ""]
            if isinstance(node, ast.ImportFrom)
            else [a.name for a in node.names]
        )
        if m.startswith("edgecloud") and any(part.startswith("_") for part in m.split("."))
    }
    assert private == set()


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def test_modules_stay_readable() -> None:
    """No module over ~500 lines without a one-line reason at its top (``# size: ...``)."""
    paths = [*(ROOT / "converters").glob("*.py"), ROOT / "edgecloud/cli/convert.py"]
    long = [
        p.name
        for p in paths
        if len(p.read_text().splitlines()) > MAX_LINES and not p.read_text().startswith("# size:")
    ]
    assert long == []


def _content(path: Path) -> tuple[list[tuple[str, tuple[str, ...]]], list[tuple[int, str]]]:
    """The graph without names: op types with attributes, and initializers by dtype and bytes."""
    g = onnx.load(str(path)).graph
    nodes = [
        (n.op_type, tuple(sorted(a.SerializeToString().hex() for a in n.attribute))) for n in g.node
    ]
    inits = sorted(
        (t.data_type, hashlib.sha256(numpy_helper.to_array(t).tobytes()).hexdigest())
        for t in g.initializer
    )
    return nodes, inits


@pytest.mark.slow
def test_int8_static_and_the_search_make_the_same_graph(tmp_path: Path) -> None:
    """Same ``StaticInt8Settings()``, same file: biases stay float in both (none are int32)."""
    data = ROOT / "samples/data"
    model = ROOT / "samples/models/digits_cloud.onnx"
    report = convert(
        model,
        tmp_path / "pkg",
        ConvertOptions(
            int8=("static",),
            calib=data / "cloud_calib.npz",
            val=data / "cloud_val.npz",
            latency_runs=2,
            search_on_failure=False,
        ),
    )
    assert report.variant("int8_static").settings == StaticInt8Settings().describe()
    ctx = prepare(
        model,
        data / "cloud_calib.npz",
        data / "cloud_val.npz",
        work_dir=tmp_path / "search",
        int8="static",
    )
    trial = ctx.quantizer.quantize(
        Candidate("static", StaticInt8Settings(), "default"), tmp_path / "trial.onnx"
    )
    slim_variant(trial)  # what convert does to every variant before it is packaged
    ours, theirs = _content(tmp_path / "pkg/int8_static.onnx"), _content(trial)
    assert ours == theirs
    int32 = [t for t in onnx.load(str(trial)).graph.initializer if t.data_type == 6]
    assert int32 == []  # quantize_bias=False: no int32 bias initializers
    qdq = [op for op, _ in ours[0] if op in ("QuantizeLinear", "DequantizeLinear")]
    assert qdq  # and it is really quantized
    biased = StaticInt8Settings(quantize_bias=True)
    ctx.quantizer.quantize(Candidate("static", biased, "bias"), tmp_path / "bias.onnx")
    assert any(t.data_type == 6 for t in onnx.load(str(tmp_path / "bias.onnx")).graph.initializer)
