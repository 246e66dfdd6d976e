"""Graph rewrites on loaded ONNX models: short names, topological order, dead zero points.

Pure functions of an ``onnx.ModelProto`` (no files): ``converters.model`` applies them when it
slims a variant, ``converters.quantize`` when it sorts an FP16 graph.
"""

from __future__ import annotations

from typing import Any

__all__ = ["compact_names", "drop_zero_zero_points", "topological_sort"]


def compact_names(model: Any, *, keep_value_info: bool = False) -> Any:
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
    if not keep_value_info:
        # onnxruntime re-infers shapes on load; but keep them for FP16 graphs: onnxruntime 1.32
        # crashes (segfault) re-inferring the types of an FP16 graph whose value_info was deleted
        del graph.value_info[:]
    return model


def topological_sort(model: Any) -> Any:
    """Order ``model``'s nodes so every node comes after the producers of its inputs.

    onnxruntime's FP16 converter appends its Cast nodes at the end of the graph, and of each
    subgraph (If/Loop bodies, as in a detector's NMS), where onnxruntime refuses them ("is not
    a graph input, initializer, or output of a previous node"). Subgraphs are sorted too; their
    references to outer tensors count as inputs of the node that owns them.
    """
    _move_misplaced(model.graph)
    _sort_graph(model.graph, set())
    return model


def _subgraphs(n: Any) -> list[Any]:
    import onnx

    out = []
    for a in n.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            out.append(a.g)
        elif a.type == onnx.AttributeProto.GRAPHS:
            out.extend(a.graphs)
    return out


def _move_misplaced(graph: Any) -> None:
    """Move nodes that read a tensor only a subgraph makes into that subgraph.

    onnxruntime's FP16 converter puts the Cast it adds before a blocked op (NonMaxSuppression
    inside an If body, say) into the outer graph, where its input does not exist.
    """
    own = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    own |= {o for n in graph.node for o in n.output}
    for _ in range(len(graph.node)):
        made_in: dict[str, Any] = {}
        for n in graph.node:
            for g in _subgraphs(n):
                for m in g.node:
                    for o in m.output:
                        made_in[o] = g
        stray = next(
            (n for n in graph.node if any(i and i not in own and i in made_in for i in n.input)),
            None,
        )
        if stray is None:
            break
        target = next(made_in[i] for i in stray.input if i and i not in own and i in made_in)
        moved = target.node.add()
        moved.CopyFrom(stray)
        graph.node.remove(stray)
        own -= set(stray.output)
    for n in graph.node:
        for g in _subgraphs(n):
            _move_misplaced(g)


def _sort_graph(graph: Any, outer: set[str]) -> None:
    import onnx

    ready = set(outer) | {v.name for v in graph.input} | {t.name for t in graph.initializer}
    ready.add("")
    produced = {o for n in graph.node for o in n.output}

    def subgraphs(n: Any) -> list[Any]:
        out = []
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                out.append(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                out.extend(a.graphs)
        return out

    def free_names(g: Any) -> set[str]:
        inner = {o for m in g.node for o in m.output} | {i.name for i in g.input}
        inner |= {t.name for t in g.initializer}
        names = set()
        for m in g.node:
            names |= {i for i in m.input if i not in inner}
            for sub in subgraphs(m):
                names |= {x for x in free_names(sub) if x not in inner}
        return names

    def needs(n: Any) -> set[str]:
        out = set(n.input)
        for g in subgraphs(n):
            out |= free_names(g)
        # only names this graph produces constrain the order; the rest come from outside
        return {x for x in out if x in produced}

    pending = list(graph.node)
    deps = [needs(n) for n in pending]
    ordered: list[Any] = []
    while pending:
        progress = False
        rest, rest_deps = [], []
        for n, d in zip(pending, deps, strict=True):
            if d <= ready:
                ordered.append(n)
                ready.update(n.output)
                progress = True
            else:
                rest.append(n)
                rest_deps.append(d)
        if not progress:  # a cycle or a dangling input: keep the remaining order as it was
            ordered += rest
            break
        pending, deps = rest, rest_deps
    copies = [onnx.NodeProto() for _ in ordered]
    for c, n in zip(copies, ordered, strict=True):
        c.CopyFrom(n)
    del graph.node[:]
    graph.node.extend(copies)
    visible = set(outer) | ready
    for n in graph.node:
        for g in subgraphs(n):
            _sort_graph(g, visible)


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
