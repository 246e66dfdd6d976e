"""What the model's outputs are for: the task, the score output, and the outputs the gate checks.

Inferred from the graph and the names, because that is what a user's model carries (a torch
export has no ``task`` metadata) and a wrong guess silently picks the wrong gate metric:

1. ``--task`` / ``--score-output``, then the model's ``task`` / ``confidence_output`` metadata;
2. **detection**: an output named like boxes (``boxes``, ``bbox*``) beside one named like scores
   (``scores``, ``cls_logits``, ``logits``, ``conf*``);
3. **classification**: a Softmax/LogSoftmax/Sigmoid produces the output, or it is named like
   ``logits``/``probabilities``/``scores``, or it was a ZipMap (scikit-learn), or the data has
   labels, or labels/``--confidence`` were given;
4. **embedding**: a rank-2 float output named like an embedding (``embedding``, ``sentence*``,
   ``pooler*``, ``features``), or the graph L2-normalises at the end;
5. otherwise **regression** (relative L2), said so in the report with "use --task".

The score output (what confidence and the gate's main metric read) is never an integer tensor:
scikit-learn's ``label`` comes first, the probabilities second. Every ``Roles`` carries the
reason in words, for the report and the manifest.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from converters.model import ModelInfo
from converters.validate import Task
from edgecloud.errors import ConfigError

__all__ = ["Roles", "infer_roles"]

_BOX = re.compile(r"(^|[^a-z])(boxes|box|bboxes|bbox|bbox_regression|loc|locations)($|[^a-z])")
_SCORE = re.compile(r"(scores?|cls_logits|class_logits|conf|confidences?|logits|probs?)")
_CLASS = re.compile(r"(logits?|probabilit|probs?($|[^a-z])|scores?|class|softmax|output_prob)")
_EMBED = re.compile(r"(embed|sentence|pooler|pooled|features?($|[^a-z])|vector|encoding)")
_FLOAT = ("float32", "float16", "float64", "bfloat16")


@dataclass(frozen=True)
class Roles:
    """The task and the outputs that matter, with why."""

    task: Task
    task_reason: str
    score_output: str
    score_reason: str
    #: outputs the gate compares (the score output first); detectors: scores and boxes
    gated: tuple[str, ...]
    #: output name -> role ("score", "boxes", "labels", "embedding", ...), for the manifest
    output_roles: dict[str, str]
    #: the score output is already probabilities (softmax/ZipMap) rather than logits
    probabilities: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "task_reason": self.task_reason,
            "score_output": self.score_output,
            "score_reason": self.score_reason,
            "gated_outputs": list(self.gated),
            "output_roles": dict(self.output_roles),
        }


def _producers(path: Path) -> dict[str, Any]:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return {o: n for n in graph.node for o in n.output}


def _ends_in(prod: dict[str, Any], name: str, ops: set[str], depth: int = 4) -> str:
    """The op of ``ops`` that makes ``name``, looking through a few shape-only nodes, or ""."""
    passthrough = {"Identity", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Cast", "Transpose"}
    node = prod.get(name)
    for _ in range(depth):
        if node is None:
            return ""
        if node.op_type in ops:
            return str(node.op_type)
        if node.op_type not in passthrough or not node.input:
            return ""
        node = prod.get(node.input[0])
    return ""


def _l2_normalised(prod: dict[str, Any], name: str) -> bool:
    """Div(x, norm) where norm comes from ReduceL2/Sqrt/Norm ops, or LpNormalization."""
    if _ends_in(prod, name, {"LpNormalization"}):
        return True
    node = prod.get(name)
    if node is None or node.op_type != "Div" or len(node.input) < 2:
        return False
    stack, seen = [node.input[1]], 0
    while stack and seen < 12:
        n = prod.get(stack.pop())
        seen += 1
        if n is None:
            continue
        if n.op_type in ("ReduceL2", "Sqrt", "ReduceSumSquare", "LpNormalization"):
            return True
        stack.extend(n.input)
    return False


def infer_roles(
    info: ModelInfo,
    meta: dict[str, str],
    *,
    task: Task | None = None,
    score_output: str | None = None,
    has_labels: bool = False,
    labels_given: bool = False,
    confidence: str | None = None,
) -> Roles:
    """Decide the task and the outputs' roles for ``info`` (see the module docstring)."""
    prod = _producers(info.path)
    rewritten = dict(info.rewritten_outputs)
    outs = list(info.outputs)
    names = [o.name for o in outs]
    floats = [o for o in outs if o.dtype in _FLOAT]
    if score_output is not None and score_output not in names:
        raise ConfigError(f"--score-output {score_output!r}: the model's outputs are {names}")
    if score_output is not None and info.output(score_output).dtype not in _FLOAT:
        raise ConfigError(
            f"--score-output {score_output!r} is {info.output(score_output).dtype}; confidence "
            f"is read from a float output (the model's float outputs: "
            f"{[o.name for o in floats]})"
        )
    if not floats:
        raise ConfigError(
            f"the model has no float output ({[(o.name, o.dtype) for o in outs]}); edgecloud "
            "convert validates variants on float outputs"
        )
    lower = {o.name: o.name.lower() for o in outs}
    boxes = [o for o in floats if _BOX.search(lower[o.name])]
    score_like = [o for o in floats if _SCORE.search(lower[o.name]) and o not in boxes]
    softmaxed = [o for o in floats if _ends_in(prod, o.name, {"Softmax", "LogSoftmax", "Sigmoid"})]
    reason = ""
    inferred: Task
    if task is not None:
        inferred, reason = task, "--task"
    elif meta.get("task") in ("classification", "embedding", "regression", "detection"):
        inferred, reason = meta["task"], "the model's 'task' metadata"  # type: ignore[assignment]
    elif boxes and score_like:
        inferred = "detection"
        reason = f"outputs '{boxes[0].name}' (boxes) and '{score_like[0].name}' (scores)"
    elif rewritten:
        inferred = "classification"
        reason = f"output '{next(iter(rewritten))}' was a ZipMap of class probabilities"
    elif softmaxed:
        inferred = "classification"
        op = _ends_in(prod, softmaxed[0].name, {"Softmax", "LogSoftmax", "Sigmoid"})
        reason = f"output '{softmaxed[0].name}' comes out of a {op}"
    elif any(_CLASS.search(lower[o.name]) and len(o.shape) == 2 for o in floats):
        o = next(o for o in floats if _CLASS.search(lower[o.name]) and len(o.shape) == 2)
        inferred, reason = "classification", f"output '{o.name}' is named like class scores"
    elif any(_EMBED.search(lower[o.name]) and len(o.shape) == 2 for o in floats):
        o = next(o for o in floats if _EMBED.search(lower[o.name]) and len(o.shape) == 2)
        inferred, reason = "embedding", f"output '{o.name}' [N, D] is named like an embedding"
    elif any(_l2_normalised(prod, o.name) for o in floats):
        o = next(o for o in floats if _l2_normalised(prod, o.name))
        inferred, reason = "embedding", f"output '{o.name}' is L2-normalised at the end"
    elif has_labels or labels_given or confidence in ("logits", "probabilities"):
        inferred = "classification"
        reason = "the data has labels" if has_labels else "labels/--confidence were given"
    else:
        inferred = "regression"
        reason = (
            "no softmax, no class, box or embedding names, no labels: gated on relative L2 "
            "(use --task if this is wrong)"
        )

    # the score output
    if score_output is not None:
        score, score_reason = score_output, "--score-output"
    elif meta.get("confidence_output") in names:
        score, score_reason = meta["confidence_output"], "the model's metadata"
    else:
        pool: Sequence[Any]
        if inferred == "detection":
            pool = score_like or floats
        elif inferred == "classification":
            pool = (
                [o for o in floats if o.name in rewritten]
                or softmaxed
                or [o for o in floats if _CLASS.search(lower[o.name])]
                or floats
            )
        elif inferred == "embedding":
            pool = [o for o in floats if _EMBED.search(lower[o.name])] or floats
        else:
            pool = floats
        score = pool[0].name
        score_reason = (
            "the only float output"
            if len(floats) == 1
            else f"the first float output that fits {inferred}"
        )
        if outs[0].name != score:
            score_reason += f" (output 0, '{outs[0].name}', is {outs[0].dtype})"
    gated = [score]
    roles: dict[str, str] = {
        score: "score" if inferred in ("classification", "detection") else inferred
    }
    if inferred == "detection":
        for b in boxes:
            if b.name != score:
                gated.append(b.name)
                roles[b.name] = "boxes"
    for o in outs:
        if o.name not in roles and o.dtype.startswith(("int", "uint")):
            roles[o.name] = "labels"
    probs = score in rewritten or bool(_ends_in(prod, score, {"Softmax", "Sigmoid"}))
    return Roles(
        task=inferred,
        task_reason=reason,
        score_output=score,
        score_reason=score_reason,
        gated=tuple(gated),
        output_roles=roles,
        probabilities=probs,
    )
