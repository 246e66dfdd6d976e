"""The agent's TOML configuration, validated once at start-up (every key in docs/agent.md).

A device is configured once and then runs unattended for months, so a typo must stop the agent at
start with a message naming the key (``store.min_free_mb: expected a number >= 0, got 'lots'``)
instead of surfacing as a strange failure in the middle of a deployment. Unknown keys are errors
for the same reason. Relative paths are resolved against the config file's folder, so a config
and its keys can be moved together.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from edgecloud.errors import ConfigError
from edgecloud.settings import RegionConfig, check_threshold
from edgecloud.topics import DEFAULT_PREFIX, Topics, check_segment
from edgecloud.transport.compact import check_settings as check_upstream_settings
from edgecloud.transport.compact import is_region_setting, unknown_regions

__all__ = [
    "AgentConfig",
    "BrokerConfig",
    "CaptureConfig",
    "DeviceConfig",
    "EndpointConfig",
    "PolicyConfig",
    "QueueConfig",
    "RegionConfig",
    "StoreConfig",
    "load_config",
]

_MB = 1024 * 1024
_MODES = ("edge_first", "edge_only", "cloud_only", "cloud_first")


@dataclass(frozen=True)
class DeviceConfig:
    id: str
    group: str = "default"
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class BrokerConfig:
    url: str
    username: str | None = None
    password: str | None = None
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    keepalive: int = 30
    topic_prefix: str = DEFAULT_PREFIX
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 30.0

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or "127.0.0.1"

    @property
    def port(self) -> int:
        u = urlsplit(self.url)
        return u.port or (8883 if self.tls else 1883)

    @property
    def tls(self) -> bool:
        return urlsplit(self.url).scheme == "mqtts" or self.ca is not None


@dataclass(frozen=True)
class StoreConfig:
    path: Path
    public_key: Path
    min_free_bytes: int = 50 * _MB
    download_timeout_s: float = 60.0


@dataclass(frozen=True)
class PolicyConfig:
    mode: str = "edge_first"
    threshold: float | None = None
    deadline_s: float | None = 1.0
    max_concurrency: int = 1
    #: FP16 / INT8 tensors upstream, to every region (True) or those named (docs/routing.md).
    upstream_fp16: bool | tuple[str, ...] = False
    upstream_int8: bool | tuple[str, ...] = False


@dataclass(frozen=True)
class EndpointConfig:
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 8765
    socket: Path | None = None
    max_body_bytes: int = 16 * _MB
    timeout_s: float = 30.0


@dataclass(frozen=True)
class QueueConfig:
    max_rows: int = 10_000
    max_bytes: int = 16 * _MB
    hard_cap_rows: int = 50_000
    inflight: int = 100


@dataclass(frozen=True)
class CaptureConfig:
    enabled: bool = False
    threshold: float = 0.6
    sample_rate: float = 1.0
    max_count: int = 1000
    max_bytes: int = 64 * _MB


@dataclass(frozen=True)
class AgentConfig:
    device: DeviceConfig
    broker: BrokerConfig
    store: StoreConfig
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    regions: tuple[RegionConfig, ...] = ()
    telemetry_interval_s: float = 30.0
    endpoint: EndpointConfig = field(default_factory=EndpointConfig)
    queue: QueueConfig = field(default_factory=QueueConfig)
    capture: CaptureConfig = field(default_factory=CaptureConfig)
    job_step_timeout_s: float = 300.0
    #: A desired-state model version that failed is tried again this many times (0: never),
    #: after ``desired_retry_delay_s`` then growing by ``desired_retry_backoff`` each time.
    desired_retries: int = 3
    desired_retry_delay_s: float = 30.0
    desired_retry_backoff: float = 2.0
    source: Path | None = None

    @property
    def topics(self) -> Topics:
        return Topics(self.broker.topic_prefix)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, base_dir: Path | None = None) -> AgentConfig:
        """Build from a parsed TOML mapping; raises ``ConfigError`` naming the key."""
        base = base_dir or Path.cwd()
        r = _Reader(d, "", base)
        r.known(
            "device",
            "broker",
            "store",
            "policy",
            "regions",
            "telemetry",
            "endpoint",
            "queue",
            "capture",
            "jobs",
        )
        dev = r.section("device")
        dev.known("id", "group", "labels")
        device_id = dev.string("id")
        _segment(device_id, "device.id")
        labels = dev.table("labels", {})
        for k, v in labels.items():
            if not isinstance(v, str):
                raise ConfigError(f"device.labels.{k}: expected a string, got {v!r}")
        device = DeviceConfig(id=device_id, group=dev.string("group", "default"), labels=labels)

        br = r.section("broker")
        br.known(
            "url",
            "username",
            "password",
            "ca",
            "cert",
            "key",
            "keepalive",
            "topic_prefix",
            "reconnect_min_s",
            "reconnect_max_s",
        )
        url = br.string("url")
        u = urlsplit(url)
        if u.scheme not in ("mqtt", "mqtts") or not u.hostname:
            raise ConfigError(
                f"broker.url: expected mqtt://host:port or mqtts://host:port, got {url!r}"
            )
        try:
            _ = u.port
        except ValueError as exc:
            raise ConfigError(f"broker.url: bad port in {url!r}") from exc
        if u.username or u.password:
            raise ConfigError("broker.url: put credentials in broker.username/password")
        cert, key = br.path("cert", must_exist=True), br.path("key", must_exist=True)
        if (cert is None) != (key is None):
            raise ConfigError("broker.cert and broker.key must be given together")
        prefix = br.string("topic_prefix", DEFAULT_PREFIX)
        try:
            Topics(prefix)
        except ConfigError as exc:
            raise ConfigError(f"broker.topic_prefix: {exc}") from exc
        broker = BrokerConfig(
            url=url,
            username=br.opt_string("username"),
            password=br.opt_string("password"),
            ca=br.path("ca", must_exist=True),
            cert=cert,
            key=key,
            keepalive=int(br.number("keepalive", 30, lo=5, integer=True)),
            topic_prefix=prefix,
            reconnect_min_s=br.number("reconnect_min_s", 0.5, lo=0.01),
            reconnect_max_s=br.number("reconnect_max_s", 30.0, lo=0.1),
        )

        st = r.section("store")
        st.known("path", "public_key", "min_free_mb", "download_timeout_s")
        store_path = st.path("path")
        pub = st.path("public_key", must_exist=True)
        if store_path is None or pub is None:
            raise ConfigError("store.path and store.public_key are required")
        store = StoreConfig(
            path=store_path,
            public_key=pub,
            min_free_bytes=int(st.number("min_free_mb", 50, lo=0) * _MB),
            download_timeout_s=st.number("download_timeout_s", 60.0, lo=0.1),
        )

        po = r.section("policy", required=False)
        po.known(
            "mode", "threshold", "deadline_s", "max_concurrency", "upstream_fp16", "upstream_int8"
        )
        mode = po.string("mode", "edge_first")
        if mode not in _MODES:
            raise ConfigError(f"policy.mode: expected one of {list(_MODES)}, got {mode!r}")
        policy = PolicyConfig(
            mode=mode,
            threshold=_threshold(po.d["threshold"]) if "threshold" in po.d else None,
            deadline_s=po.number("deadline_s", 1.0, lo=0.001) if "deadline_s" in po.d else 1.0,
            max_concurrency=int(po.number("max_concurrency", 1, lo=1, hi=1024, integer=True)),
            upstream_fp16=po.regions("upstream_fp16"),
            upstream_int8=po.regions("upstream_int8"),
        )
        try:  # the client's own check: one region is sent FP16 or INT8, not both
            check_upstream_settings(policy.upstream_fp16, policy.upstream_int8)
        except ConfigError as exc:
            raise ConfigError(f"policy: {exc}") from None

        regions: list[RegionConfig] = []
        raw_regions = d.get("regions", [])
        if not isinstance(raw_regions, list):
            raise ConfigError("regions: expected an array of tables ([[regions]])")
        for i, reg in enumerate(raw_regions):
            # The client's own region schema (edgecloud.settings): the same keys and checks.
            region = RegionConfig.from_mapping(reg, f"regions[{i}]")
            _segment(region.name, f"regions[{i}].name")
            regions.append(region)
        names = [x.name for x in regions]
        if len(set(names)) != len(names):
            raise ConfigError(f"regions: duplicate region names in {names}")
        for upstream in ("upstream_fp16", "upstream_int8"):  # a typo would silently send FP32
            unknown = unknown_regions(getattr(policy, upstream), names)
            if unknown:
                raise ConfigError(
                    f"policy.{upstream}: region(s) {unknown} are not among the [[regions]] "
                    f"({', '.join(names) or 'none'})"
                )

        te = r.section("telemetry", required=False)
        te.known("interval_s")
        ep = r.section("endpoint", required=False)
        ep.known("enabled", "host", "port", "socket", "max_body_mb", "timeout_s")
        host = ep.string("host", "127.0.0.1")
        if host not in ("127.0.0.1", "::1", "localhost"):
            raise ConfigError(
                f"endpoint.host: the local endpoint binds to loopback only "
                f"(127.0.0.1, ::1 or localhost), got {host!r}"
            )
        endpoint_cfg = EndpointConfig(
            enabled=ep.boolean("enabled", True),
            host=host,
            port=int(ep.number("port", 8765, lo=0, hi=65535, integer=True)),
            socket=ep.path("socket"),
            max_body_bytes=int(ep.number("max_body_mb", 16, lo=0.001) * _MB),
            timeout_s=ep.number("timeout_s", 30.0, lo=0.1),
        )
        qu = r.section("queue", required=False)
        qu.known("max_rows", "max_mb", "hard_cap_rows", "inflight")
        queue = QueueConfig(
            max_rows=int(qu.number("max_rows", 10_000, lo=10, integer=True)),
            max_bytes=int(qu.number("max_mb", 16, lo=0.01) * _MB),
            hard_cap_rows=int(qu.number("hard_cap_rows", 50_000, lo=10, integer=True)),
            inflight=int(qu.number("inflight", 100, lo=1, hi=10_000, integer=True)),
        )
        if queue.hard_cap_rows < queue.max_rows:
            raise ConfigError(
                f"queue.hard_cap_rows ({queue.hard_cap_rows}) must be >= queue.max_rows "
                f"({queue.max_rows})"
            )
        ca = r.section("capture", required=False)
        ca.known("enabled", "threshold", "sample_rate", "max_count", "max_mb")
        capture = CaptureConfig(
            enabled=ca.boolean("enabled", False),
            threshold=ca.number("threshold", 0.6, lo=0.0, hi=1.0),
            sample_rate=ca.number("sample_rate", 1.0, lo=0.0, hi=1.0),
            max_count=int(ca.number("max_count", 1000, lo=1, integer=True)),
            max_bytes=int(ca.number("max_mb", 64, lo=0.001) * _MB),
        )
        jo = r.section("jobs", required=False)
        jo.known(
            "step_timeout_s", "desired_retries", "desired_retry_delay_s", "desired_retry_backoff"
        )
        return cls(
            device=device,
            broker=broker,
            store=store,
            policy=policy,
            regions=tuple(sorted(regions, key=lambda x: x.priority)),
            telemetry_interval_s=te.number("interval_s", 30.0, lo=0.05),
            endpoint=endpoint_cfg,
            queue=queue,
            capture=capture,
            job_step_timeout_s=jo.number("step_timeout_s", 300.0, lo=0.1),
            desired_retries=int(jo.number("desired_retries", 3, lo=0, hi=100, integer=True)),
            desired_retry_delay_s=jo.number("desired_retry_delay_s", 30.0, lo=0.01),
            desired_retry_backoff=jo.number("desired_retry_backoff", 2.0, lo=1.0, hi=100.0),
        )


def load_config(path: Path | str) -> AgentConfig:
    """Read and validate ``agent.toml``."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read agent config {p}: {exc.strerror or exc}") from exc
    try:
        d = tomllib.loads(raw.decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p} is not valid TOML: {exc}") from exc
    cfg = AgentConfig.from_dict(d, base_dir=p.resolve().parent)
    return AgentConfig(**{**cfg.__dict__, "source": p.resolve()})


def _threshold(value: object) -> float:
    """One number here (the fleet's policy documents send one): the client's threshold check."""
    if isinstance(value, Mapping):
        raise ConfigError(f"policy.threshold: expected a number, got {value!r}")
    checked = check_threshold(value, "policy.threshold")
    assert isinstance(checked, float)
    return checked


def _segment(value: str, key: str) -> None:
    try:
        check_segment(value, key)
    except ConfigError as exc:
        raise ConfigError(f"{key}: {exc}") from exc


class _Reader:
    """Typed access to one TOML table that names the full key in every error."""

    def __init__(self, d: Mapping[str, Any], prefix: str, base: Path) -> None:
        self.d = d
        self.prefix = prefix
        self.base = base

    def known(self, *keys: str) -> None:
        unknown = sorted(set(self.d) - set(keys))
        if unknown:
            raise ConfigError(
                f"{self.prefix}{unknown[0]}: unknown key (known keys here: {', '.join(keys)})"
            )

    def section(self, name: str, required: bool = True) -> _Reader:
        v = self.d.get(name)
        if v is None:
            if required:
                raise ConfigError(f"[{self.prefix}{name}]: missing required section")
            v = {}
        if not isinstance(v, Mapping):
            raise ConfigError(f"{self.prefix}{name}: expected a table, got {v!r}")
        return _Reader(v, f"{self.prefix}{name}.", self.base)

    def string(self, key: str, default: str | None = None) -> str:
        v = self.d.get(key, default)
        if v is None:
            raise ConfigError(f"{self.prefix}{key}: missing required key")
        if not isinstance(v, str) or not v:
            raise ConfigError(f"{self.prefix}{key}: expected a non-empty string, got {v!r}")
        return v

    def opt_string(self, key: str) -> str | None:
        return self.string(key) if key in self.d else None

    def boolean(self, key: str, default: bool) -> bool:
        v = self.d.get(key, default)
        if not isinstance(v, bool):
            raise ConfigError(f"{self.prefix}{key}: expected true or false, got {v!r}")
        return v

    def regions(self, key: str) -> bool | tuple[str, ...]:
        """True/false or a list of region names (``upstream_fp16`` / ``upstream_int8``)."""
        v = self.d.get(key, False)
        if isinstance(v, bool | list) and is_region_setting(v):
            return v if isinstance(v, bool) else tuple(v)
        raise ConfigError(
            f"{self.prefix}{key}: expected true/false or a list of region names, got {v!r}"
        )

    def table(self, key: str, default: dict[str, Any]) -> dict[str, Any]:
        v = self.d.get(key, default)
        if not isinstance(v, Mapping):
            raise ConfigError(f"{self.prefix}{key}: expected a table, got {v!r}")
        return dict(v)

    def number(
        self,
        key: str,
        default: float,
        *,
        lo: float | None = None,
        hi: float | None = None,
        integer: bool = False,
    ) -> float:
        v = self.d.get(key, default)
        ok = isinstance(v, int | float) and not isinstance(v, bool)
        if ok and integer and not float(v).is_integer():
            ok = False
        kind = "an integer" if integer else "a number"
        bounds = ""
        if lo is not None and hi is not None:
            bounds = f" in [{lo}, {hi}]"
        elif lo is not None:
            bounds = f" >= {lo}"
        if not ok or (lo is not None and v < lo) or (hi is not None and v > hi) or v != v:
            raise ConfigError(f"{self.prefix}{key}: expected {kind}{bounds}, got {v!r}")
        return float(v)

    def path(self, key: str, must_exist: bool = False) -> Path | None:
        if key not in self.d:
            return None
        s = self.string(key)
        p = Path(s).expanduser()
        if not p.is_absolute():
            p = self.base / p
        if must_exist and not p.exists():
            raise ConfigError(f"{self.prefix}{key}: file {p} does not exist")
        return p
