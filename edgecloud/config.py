"""The HybridClient's TOML config file (format in docs/routing.md).

Read once, checked whole: an unknown key, a wrong type or a bad value is a ``ConfigError`` naming
the section and key, so a typo ("treshold") fails at start-up instead of silently using a default.
Relative paths (package, public key) are resolved against the config file's directory, so a config
works from any working directory.

    [model]
    package = "models/digits_edge"        # a package directory (verified on load)
    public_key = "keys/publisher.pub"     # Ed25519 public key (PEM) the package must be signed by
    variant = "auto"                      # or a variant name / precision ("int8")
    threads = 1

    [routing]
    mode = "edge_first"
    threshold = 0.9
    deadline = 0.5
    upstream_int8 = ["eu-west"]           # or upstream_fp16; true: every region

    [[regions]]
    name = "eu-west"
    endpoint = "http://10.0.0.5:8000"
    model = "digits_cloud"
    cloud_input_shape = [1, 8, 8]
    [regions.options]
    token = "..."
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgecloud.errors import ConfigError
from edgecloud.runtime.base import InputPolicy
from edgecloud.settings import ClientSettings, EscalationSettings, RegionConfig, check_threshold
from edgecloud.transport.compact import is_region_setting, unknown_regions

__all__ = ["ClientConfig", "RegionConfig", "load_config", "parse_config"]

Shape = tuple[int, ...]


@dataclass(frozen=True)
class ClientConfig:
    """What a config file says: the model to load, the settings and the regions."""

    package: Path | None = None
    public_key: Path | None = None
    settings: ClientSettings = field(default_factory=ClientSettings)
    regions: tuple[RegionConfig, ...] = ()


#: [model] keys that make the input policy rather than a ``LocalSettings`` field of their name.
_INPUT_POLICY_KEYS = ("allow_cast", "allow_int_to_float", "nonfinite")
#: [routing] keys of the escalation settings, and the field each one sets.
_ESCALATION_KEYS = {
    "escalate": "escalate",
    "audit_rate": "audit_rate",
    "escalation_rate_limit": "rate_limit",
}


_MODEL_KEYS = {
    "package": "path",
    "public_key": "path",
    "require_signature": bool,
    "variant": str,
    "providers": "strlist",
    "threads": int,
    "inter_op_threads": int,
    "allow_cast": bool,
    "allow_int_to_float": bool,
    "nonfinite": str,
}
_ROUTING_KEYS = {
    "mode": str,
    "threshold": "threshold",
    "confidence": str,
    "deadline": "posfloat",
    "max_concurrency": int,
    "max_queue": int,
    "max_wait": "float",
    "max_cpu_percent": "float",
    "probe_interval": "posfloat",
    "probe_timeout": "posfloat",
    "failure_threshold": int,
    "cooldown": "float",
    "cloud_input_shape": "shape",
    "escalate": str,
    "audit_rate": "float",
    "escalation_rate_limit": "float",
    "upstream_fp16": "regions",
    "upstream_int8": "regions",
}


def _shape(value: Any, where: str) -> Shape:
    if not isinstance(value, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in value
    ):
        raise ConfigError(f"{where}: expected a list of positive integers, got {value!r}")
    return tuple(value)


def _value(kind: Any, value: Any, where: str, base: Path) -> Any:
    if kind == "path":
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a path string, got {value!r}")
        p = Path(value).expanduser()
        return p if p.is_absolute() else base / p
    if kind == "strlist":
        if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
            raise ConfigError(f"{where}: expected a list of strings, got {value!r}")
        return tuple(value)
    if kind in ("float", "posfloat"):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if kind == "posfloat" and not value > 0:
            raise ConfigError(f"{where}: expected a number > 0, got {value!r}")
        if value < 0:
            raise ConfigError(f"{where}: expected a number >= 0, got {value!r}")
        return float(value)
    if kind == "threshold":  # the type here, the range in the one threshold check
        for k, v in value.items() if isinstance(value, dict) else [("", value)]:
            if isinstance(v, bool) or not isinstance(v, int | float):
                raise ConfigError(f"{where}{'.' + k if k else ''}: expected a number, got {v!r}")
        return check_threshold(value, where)
    if kind == "regions":  # upstream_fp16 / upstream_int8: true/false or region names
        if isinstance(value, bool | list) and is_region_setting(value):
            return value
        raise ConfigError(f"{where}: expected true/false or a list of region names, got {value!r}")
    if kind == "shape":
        if isinstance(value, dict):
            return {str(k): _shape(v, f"{where}.{k}") for k, v in value.items()}
        return _shape(value, where)
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if kind is bool and not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if kind is str and not isinstance(value, str):
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if kind is dict and not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a table, got {value!r}")
    return value


def _section(raw: Any, keys: Mapping[str, Any], where: str, base: Path) -> dict[str, Any]:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: expected a table, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(keys))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown} (known: {sorted(keys)})")
    return {k: _value(keys[k], v, f"{where}.{k}", base) for k, v in raw.items()}


def parse_config(
    data: Mapping[str, Any], *, base: Path | None = None, where: str = "config"
) -> ClientConfig:
    """Check a parsed TOML document and build the config (paths relative to ``base``)."""
    base = base or Path.cwd()
    unknown = sorted(set(data) - {"model", "routing", "regions"})
    if unknown:
        raise ConfigError(f"{where}: unknown section(s) {unknown} (known: model, routing, regions)")
    model = _section(data.get("model", {}), _MODEL_KEYS, f"{where} [model]", base)
    routing = _section(data.get("routing", {}), _ROUTING_KEYS, f"{where} [routing]", base)
    package, public_key = model.pop("package", None), model.pop("public_key", None)
    policy = {k: model.pop(k) for k in _INPUT_POLICY_KEYS if k in model}
    escalation = {f: routing.pop(k) for k, f in _ESCALATION_KEYS.items() if k in routing}
    try:
        settings = ClientSettings(escalation=EscalationSettings(**escalation)).with_options(
            input_policy=InputPolicy(**policy), **model, **routing
        )
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    _check_escalation(settings.escalation, f"{where} [routing]")
    regions_raw = data.get("regions", [])
    if not isinstance(regions_raw, list):
        raise ConfigError(f"{where}: 'regions' must be an array of tables ([[regions]])")
    regions = [
        RegionConfig.from_mapping(r, f"{where} [[regions]] #{i + 1}")
        for i, r in enumerate(regions_raw)
    ]
    names = [r.name for r in regions]
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}: region names must be unique, got {names}")
    if names:  # a typo in a region name would silently send FP32
        for key in ("upstream_fp16", "upstream_int8"):
            unknown = unknown_regions(getattr(settings.routing, key), names)
            if unknown:
                raise ConfigError(
                    f"{where} [routing].{key}: region(s) {unknown} are not among the "
                    f"[[regions]] ({', '.join(names)})"
                )
    return ClientConfig(
        package=package, public_key=public_key, settings=settings, regions=tuple(regions)
    )


def _check_escalation(settings: EscalationSettings, where: str) -> None:
    from edgecloud.routing.escalation import Escalation

    try:  # the same checks the client runs, so load_config alone catches a bad value
        Escalation.from_settings(settings).close()
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def load_config(path: Path | str) -> ClientConfig:
    """Read and check a TOML config file."""
    import tomllib

    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {p}: {exc}") from exc
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p} is not valid TOML: {exc}") from exc
    return parse_config(data, base=p.resolve().parent, where=str(p))
