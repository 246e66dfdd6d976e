"""One settings schema: the client's keywords, its TOML and the agent's TOML agree.

A region or a threshold written in either config file, or given in Python, goes through the same
checks (edgecloud/settings.py) and comes out as the same frozen value; a bad one is refused with
a message naming the field where it was written.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from device_agent.config import load_config as load_agent_config
from edgecloud.config import load_config, parse_config
from edgecloud.errors import ConfigError
from edgecloud.routing.modes import Mode
from edgecloud.runtime.base import InputPolicy
from edgecloud.settings import (
    ClientOptions,
    ClientSettings,
    EscalationSettings,
    FailoverSettings,
    LocalSettings,
    RegionConfig,
    RoutingSettings,
    check_threshold,
)
from tests.fixtures.agent_util import Keys, write_config

REGION = """
[[regions]]
name = "eu"
endpoint = "http://127.0.0.1:9000"
model = "digits_cloud"
version = "2"
priority = 1
{timeout} = 0.25
cloud_input_shape = [1, 8, 8]
"""


def _agent(tmp_path: Path, extra: str) -> Any:
    tmp_path.mkdir(parents=True, exist_ok=True)
    keys = Keys(tmp_path)
    path = write_config(
        tmp_path / "agent.toml",
        device="dev-1",
        broker_url="mqtt://127.0.0.1:1883",
        store=tmp_path / "store",
        public_key=keys.public,
        extra=extra,
    )
    return load_agent_config(path)


def _client(tmp_path: Path, text: str) -> Any:
    p = tmp_path / "client.toml"
    p.write_text(text)
    return load_config(p)


def test_agent_toml_client_toml_and_python_give_the_same_region(tmp_path: Path) -> None:
    agent = _agent(tmp_path, REGION.format(timeout="timeout_s"))
    client = _client(tmp_path, REGION.format(timeout="timeout"))
    also = _client(tmp_path, REGION.format(timeout="timeout_s"))  # either spelling, both files
    python = RegionConfig.from_mapping(
        {
            "name": "eu",
            "endpoint": "http://127.0.0.1:9000",
            "model": "digits_cloud",
            "version": "2",
            "priority": 1,
            "timeout": 0.25,
            "cloud_input_shape": [1, 8, 8],
            "options": None,  # None in a Python mapping: not set
        },
        "region",
        python=True,
    )
    expected = RegionConfig(
        name="eu",
        endpoint="http://127.0.0.1:9000",
        model="digits_cloud",
        version="2",
        priority=1,
        timeout=0.25,
        cloud_input_shape=(1, 8, 8),
    )
    assert agent.regions == client.regions == also.regions == (expected,)
    assert python == expected
    assert type(agent.regions[0]) is type(client.regions[0]) is RegionConfig
    assert expected.timeout_s == 0.25
    assert expected.as_client_region() is expected  # what the agent hands its client


@pytest.mark.parametrize(
    ("line", "value", "agent_names", "client_names"),
    [
        ("timeout", "0", "regions[0].timeout_s", "#1.timeout"),
        ("timeout", "'soon'", "regions[0].timeout_s", "#1.timeout"),
        ("priority", "'high'", "regions[0].priority", "#1.priority"),
        ("cloud_input_shape", "[0]", "regions[0].cloud_input_shape", "#1.cloud_input_shape"),
        ("endpoint", "'ftp://x'", "regions[0].endpoint", "#1.endpoint"),
        ("model", "''", "regions[0].model", "#1.model"),
        ("colour", "'red'", "regions[0]: unknown key", "#1: unknown key"),
    ],
)
def test_a_bad_region_value_names_its_field_in_both_files(
    tmp_path: Path, line: str, value: str, agent_names: str, client_names: str
) -> None:
    def table(timeout_key: str) -> str:
        key = timeout_key if line == "timeout" else line
        return f'\n[[regions]]\nname = "eu"\nendpoint = "http://127.0.0.1:9000"\n{key} = {value}\n'

    text = table("timeout_s")
    if line == "endpoint":
        text = f'\n[[regions]]\nname = "eu"\nendpoint = {value}\n'
    with pytest.raises(ConfigError, match=agent_names.replace("[", r"\[").replace("]", r"\]")):
        _agent(tmp_path, text)
    with pytest.raises(ConfigError) as exc:
        _client(tmp_path, text.replace("timeout_s", "timeout"))
    assert client_names in str(exc.value)
    assert "[[regions]]" in str(exc.value)


def test_region_config_in_python_checks_the_same_fields() -> None:
    with pytest.raises(ConfigError, match=r"region 'a': unknown endpoint scheme 'ftp'"):
        RegionConfig(name="a", endpoint="ftp://x")
    with pytest.raises(ConfigError, match=r"region 'a': timeout: expected a number > 0"):
        RegionConfig(name="a", endpoint="http://x:1", timeout=-1)
    with pytest.raises(ConfigError, match="needs an 'endpoint' or a 'transport'"):
        RegionConfig(name="a")
    with pytest.raises(ConfigError, match="non-empty 'name'"):
        RegionConfig(name="", endpoint="http://x:1")
    with pytest.raises(ConfigError, match="give timeout or timeout_s, not both"):
        RegionConfig.from_mapping(
            {"name": "a", "endpoint": "http://x:1", "timeout": 1, "timeout_s": 1}, "r"
        )
    # A Python mapping may carry a live transport instead of an endpoint; a file may not.
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['transport'\]"):
        RegionConfig.from_mapping({"name": "a", "transport": object()}, "r")


@pytest.mark.parametrize("bad", [1.5, -0.1, float("nan"), True, "high", None, [0.5]])
def test_one_threshold_check_everywhere(tmp_path: Path, bad: object) -> None:
    with pytest.raises(ConfigError, match=r"policy\.threshold must be a number in \[0, 1\]"):
        check_threshold(bad, "policy.threshold")
    if isinstance(bad, float) and bad == bad:  # numbers the TOML files can hold
        with pytest.raises(ConfigError, match=r"policy\.threshold must be a number in \[0, 1\]"):
            _agent(tmp_path, f"\n[policy]\nthreshold = {bad}\n")
        with pytest.raises(ConfigError, match=r"\[routing\]\.threshold must be a number in"):
            _client(tmp_path, f"[routing]\nthreshold = {bad}\n")
    with pytest.raises(ConfigError, match="threshold for 'm' must be a number in"):
        check_threshold({"m": bad, "*": 0.5})


def test_threshold_values_that_pass() -> None:
    assert check_threshold(1) == 1.0
    assert isinstance(check_threshold(1), float)
    assert check_threshold({"a": 0, "*": 1}) == {"a": 0.0, "*": 1.0}
    assert check_threshold(1.01, above_one=True) == 1.01  # the constructor's "never confident"
    assert RoutingSettings(threshold=1.01).threshold == 1.01
    with pytest.raises(ConfigError, match="must be a number >= 0"):
        RoutingSettings(threshold=-1)


def test_client_options_are_exactly_the_settings_fields() -> None:
    """The typed keyword surface and the schema cannot drift apart."""
    fields = {
        f.name
        for cls in (LocalSettings, RoutingSettings, FailoverSettings)
        for f in dataclasses.fields(cls)
    }
    assert set(ClientOptions.__optional_keys__) == fields
    assert not ClientOptions.__required_keys__
    names = [f.name for cls in (LocalSettings, RoutingSettings, FailoverSettings) for f in
             dataclasses.fields(cls)]  # fmt: skip
    assert len(names) == len(set(names)), "a keyword must belong to exactly one group"


def test_with_options_puts_each_keyword_in_its_group() -> None:
    s = ClientSettings().with_options(threshold=0.7, max_concurrency=3, cooldown=2.0, threads=2)
    assert s.routing.threshold == 0.7
    assert (s.local.max_concurrency, s.local.threads) == (3, 2)
    assert s.failover.cooldown == 2.0
    assert s.escalation == EscalationSettings()
    assert ClientSettings().with_options() == ClientSettings()
    with pytest.raises(ConfigError, match=r"unknown client option 'treshold'"):
        ClientSettings().with_options(treshold=0.5)
    with pytest.raises(ConfigError, match="mode must be one of"):
        ClientSettings().with_options(mode="fastest")
    with pytest.raises(ConfigError, match="deadline must be > 0 seconds or None"):
        ClientSettings().with_options(deadline=0)
    with pytest.raises(ConfigError, match="cloud_input_shape: expected a list of positive"):
        ClientSettings().with_options(cloud_input_shape=[1, -8])
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.routing.threshold = 0.1  # type: ignore[misc]


def test_client_toml_becomes_settings_groups(tmp_path: Path) -> None:
    cfg = parse_config(
        {
            "model": {"threads": 2, "allow_cast": True, "variant": "int8"},
            "routing": {
                "mode": "cloud_first",
                "threshold": {"digits_edge": 0.8, "*": 0.6},
                "deadline": 0.5,
                "max_concurrency": 2,
                "probe_interval": 1.5,
                "cooldown": 4,
                "cloud_input_shape": [1, 8, 8],
                "escalate": "background",
                "audit_rate": 0.25,
                "escalation_rate_limit": 2.0,
            },
        },
        base=tmp_path,
    )
    s = cfg.settings
    assert s.local == LocalSettings(
        variant="int8", threads=2, input_policy=InputPolicy(allow_cast=True), max_concurrency=2
    )
    assert s.routing == RoutingSettings(
        mode=Mode.CLOUD_FIRST,
        threshold={"digits_edge": 0.8, "*": 0.6},
        deadline=0.5,
        cloud_input_shape=(1, 8, 8),
    )
    assert s.failover == FailoverSettings(probe_interval=1.5, cooldown=4.0)
    assert s.escalation == EscalationSettings(
        escalate="background", audit_rate=0.25, rate_limit=2.0
    )
    with pytest.raises(ConfigError, match=r"\[routing\]: escalate must be"):
        parse_config({"routing": {"escalate": "later"}}, base=tmp_path)
    with pytest.raises(ConfigError, match="nonfinite must be 'refuse' or 'allow'"):
        parse_config({"model": {"nonfinite": "maybe"}}, base=tmp_path)


def test_the_client_keeps_its_settings_current(tmp_path: Path) -> None:
    from edgecloud.client import HybridClient

    base = ClientSettings().with_options(threshold=0.4, deadline=2.0)
    with HybridClient(settings=base, deadline=3.0, probe_interval=None) as c:
        assert c.settings.routing.deadline == 3.0  # a keyword wins over settings=
        assert c.settings.routing.threshold == 0.4
        c.set_policy(mode="cloud_only", threshold=0.6)
        assert c.settings.routing.mode is Mode.CLOUD_ONLY
        assert c.settings.routing.threshold == 0.6
        assert c.mode is Mode.CLOUD_ONLY
    with pytest.raises(ConfigError, match=r"escalation: .*unexpected keyword argument 'speed'"):
        HybridClient(escalation={"speed": 1})


def test_the_agent_takes_every_key_of_the_schema(tmp_path: Path) -> None:
    """docs/agent.md: `timeout` or `timeout_s`, grpc(s) endpoints, `[regions.options]`."""
    agent = _agent(
        tmp_path,
        '\n[[regions]]\nname = "eu"\nendpoint = "grpc://127.0.0.1:8001"\ntimeout = 0.5\n'
        '[regions.options]\ntoken = "s3cret"\n',
    )
    (region,) = agent.regions
    assert (region.endpoint, region.timeout_s, region.options) == (
        "grpc://127.0.0.1:8001",
        0.5,
        {"token": "s3cret"},
    )
    with pytest.raises(ConfigError, match=r"regions\[0\]\.name"):
        _agent(tmp_path / "two", '\n[[regions]]\nname = "e/u"\nendpoint = "http://127.0.0.1:1"\n')
