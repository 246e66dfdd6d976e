"""Batches: many samples stacked into one request, and one result per row out of it.

``HybridClient.infer_batch`` stacks what the caller gives (``stack_batch``); ``EdgeFirst`` runs
the stack once and sends only its unsure rows on (``row_result`` per row); every other mode
routes the stack as one request and splits the answer (``split_result``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from edgecloud.errors import InputError
from edgecloud.routing.modes import Reason
from edgecloud.routing.result import HybridResult, ModelSlot

if TYPE_CHECKING:
    from edgecloud.routing.engine import Router

__all__ = ["row_result", "split_result", "stack_batch"]


def stack_batch(
    slot: ModelSlot | None, batch: Sequence[Mapping[str, Any]] | Mapping[str, Any] | np.ndarray
) -> dict[str, np.ndarray]:
    """One batched array per input, from per-sample mappings, batched arrays or one array."""
    specs = {s.name: s for s in slot.manifest.inputs} if slot is not None else {}
    if isinstance(batch, np.ndarray):
        if len(specs) != 1:
            raise InputError(
                "a bare array needs a one-input model; pass a mapping of input name -> array"
            )
        return {next(iter(specs)): batch}
    if isinstance(batch, Mapping):
        return {str(k): np.asarray(v) for k, v in batch.items()}
    items = list(batch)
    if not items:
        return {}
    names = list(items[0].keys())
    out = {}
    for name in names:
        arrs = []
        for i, item in enumerate(items):
            if not isinstance(item, Mapping) or name not in item:
                raise InputError(f"batch item {i}: missing input '{name}'", input_name=name)
            arrs.append(np.asarray(item[name]))
        rank = len(specs[name].shape) if name in specs else arrs[0].ndim + 1
        if all(a.ndim == rank - 1 for a in arrs):
            out[name] = np.stack(arrs)
        else:
            try:
                out[name] = np.concatenate(arrs)
            except ValueError as exc:
                raise InputError(
                    f"input '{name}': batch items have incompatible shapes "
                    f"{[list(a.shape) for a in arrs]}",
                    input_name=name,
                ) from exc
    return out


def row_result(
    router: Router,
    slot: ModelSlot,
    outputs: Mapping[str, np.ndarray],
    i: int,
    source: str,
    reason: Reason,
    conf: np.ndarray | None,
    **kw: Any,
) -> HybridResult:
    """Row ``i`` of a batched answer as its own result."""
    row = {k: v[i : i + 1] for k, v in outputs.items()}
    c = None if conf is None else conf[i : i + 1]
    return router.result(slot, row, source, reason, c, **kw)


def split_result(result: HybridResult, n: int) -> list[HybridResult]:
    """One result per row of a result for ``n`` rows (local time shared out evenly)."""
    if n == 1:
        return [result]
    out = []
    for i in range(n):
        c = None if result.confidences is None else result.confidences[i : i + 1]
        out.append(
            HybridResult(
                outputs={k: v[i : i + 1] for k, v in result.outputs.items()},
                source=result.source,
                reason=result.reason,
                confidence=None if c is None else float(c[0]),
                degraded=result.degraded,
                local_time=result.local_time / n,
                cloud_time=result.cloud_time,
                errors=result.errors,
                confidences=c,
                model=result.model,
                labels=result.labels,
                score_output=result.score_output,
                score_kind=result.score_kind,
                version=result.version,
                local_outputs=None
                if result.local_outputs is None
                else {k: v[i : i + 1] for k, v in result.local_outputs.items()},
            )
        )
    return out
