"""``ConvertOptions``: everything ``edgecloud convert`` can be told, checked before any work."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from converters.quantize import CalibMethod, DynamicInt8Settings, StaticInt8Settings
from converters.validate import Task
from edgecloud.errors import ConfigError

__all__ = ["ConvertOptions"]


@dataclass(frozen=True)
class ConvertOptions:
    """Everything ``edgecloud convert`` can be told; the CLI maps flags one to one onto these."""

    name: str | None = None
    version: str = "1"
    fp16: bool = False
    int8: tuple[Literal["static", "dynamic", "auto"], ...] = ()
    calib: Path | None = None
    calib_method: CalibMethod = "minmax"
    calib_samples: int | None = None
    #: calibration batch size; capped at a fixed batch dimension (a batch-1-only model)
    calib_batch: int = 16
    #: per-channel weight scales; ``None``: the family's default (static yes, dynamic no)
    per_channel: bool | None = None
    activation_type: Literal["int8", "uint8"] = "uint8"
    weight_type: Literal["int8", "uint8"] = "int8"
    reduce_range: bool = False
    exclude_nodes: tuple[str, ...] = ()
    exclude_ops: tuple[str, ...] = ()
    tensorrt: bool = False
    trt_batch: tuple[int, int, int] = (1, 8, 32)
    trt_dims: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    trt_timing_cache: Path | None = None
    trt_hardware_compat: str = "none"
    trt_workspace_mb: int = 2048
    val: Path | None = None
    tolerance: float = 1.0
    sign: Path | None = None
    labels: tuple[str, ...] | None = None
    confidence: Literal["logits", "probabilities", "none"] | None = None
    task: Task | None = None
    #: the output confidence and the gate's main metric read (default: inferred by role)
    score_output: str | None = None
    force: bool = False
    keep_rejected: bool = False
    latency_runs: int = 20
    threads: int | None = None
    warmup_samples: int = 8
    optimize: bool = True
    #: the accuracy search (``--int8 auto``, and static/dynamic variants that fail the gate)
    #: a total a user accepts for ``--int8 auto``: 20 trials or 2 minutes, whichever first
    search_budget: str = "20,120s"
    search_report: Path | None = None
    search_on_failure: bool = True
    search_exhaustive: bool = False
    #: fit a temperature on labelled validation data (converters/calibrate.py)
    calibrate: bool = True

    def check(self) -> None:
        bad = [m for m in self.int8 if m not in ("static", "dynamic", "auto")]
        if bad:
            raise ConfigError(f"--int8 must be 'static', 'dynamic' or 'auto', got {bad}")
        for mode in ("static", "auto"):
            if mode in self.int8 and self.calib is None:
                raise ConfigError(f"--int8 {mode} needs calibration data: --calib DATA")
        if self.searches:
            from converters.search_space import parse_budget

            parse_budget(self.search_budget)  # a bad budget fails now, not after the first variant
        if self.tolerance < 0:
            raise ConfigError(f"--tolerance must be >= 0 (percent), got {self.tolerance}")
        if self.calib_samples is not None and self.calib_samples < 1:
            raise ConfigError(f"--calib-samples must be >= 1, got {self.calib_samples}")
        if self.calib_method not in ("minmax", "entropy", "percentile"):
            raise ConfigError(
                f"--calib-method must be minmax, entropy or percentile, got {self.calib_method!r}"
            )
        if self.val is None and self.calib is None:
            raise ConfigError(
                "edgecloud convert needs validation data to check variants and to write the "
                "warm-up file: --val DATA (or at least --calib DATA)"
            )
        if self.warmup_samples < 1:
            raise ConfigError(f"warmup_samples must be >= 1, got {self.warmup_samples}")
        if self.calib_batch < 1:
            raise ConfigError(f"--calib-batch must be >= 1, got {self.calib_batch}")

    @property
    def searches(self) -> bool:
        """Whether this run may start an accuracy search at all."""
        return "auto" in self.int8 or (self.search_on_failure and bool(self.int8))

    def static_settings(self) -> StaticInt8Settings:
        """The ``--int8 static`` quantizer settings (per-channel unless told otherwise)."""
        return StaticInt8Settings(
            calib_method=self.calib_method,
            per_channel=self.per_channel is not False,
            activation_type=self.activation_type,
            weight_type=self.weight_type,
            reduce_range=self.reduce_range,
            exclude_nodes=self.exclude_nodes,
            exclude_ops=self.exclude_ops,
        )

    def dynamic_settings(self) -> DynamicInt8Settings:
        """The ``--int8 dynamic`` quantizer settings (per-tensor unless told otherwise)."""
        return DynamicInt8Settings(
            per_channel=self.per_channel is True,
            weight_type=self.weight_type,
            reduce_range=self.reduce_range,
            exclude_nodes=self.exclude_nodes,
            exclude_ops=self.exclude_ops,
        )
