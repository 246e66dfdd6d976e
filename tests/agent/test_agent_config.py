"""Agent config validation: every bad value is refused with a message naming its key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from device_agent.config import load_config
from edgecloud.errors import ConfigError
from tests.fixtures.agent_util import ROOT, Keys, write_config


@pytest.fixture
def base(tmp_path: Path) -> Path:
    keys = Keys(tmp_path)
    return write_config(
        tmp_path / "agent.toml",
        device="dev-1",
        broker_url="mqtt://127.0.0.1:1883",
        store=tmp_path / "store",
        public_key=keys.public,
    )


def test_valid_config_loads_with_defaults(base: Path, tmp_path: Path) -> None:
    base.write_text(
        base.read_text()
        + '\n[[regions]]\nname = "eu"\nendpoint = "http://127.0.0.1:9000"\npriority = 2\n'
        + '\n[[regions]]\nname = "us"\nendpoint = "mqtt://127.0.0.1:1883"\npriority = 1\n'
    )
    cfg = load_config(base)
    assert cfg.device.id == "dev-1"
    assert cfg.device.labels == {"site": "bench"}
    assert cfg.broker.host == "127.0.0.1"
    assert cfg.broker.port == 1883
    assert cfg.broker.tls is False
    assert cfg.store.path == tmp_path / "store"
    assert cfg.policy.mode == "edge_first"
    assert [r.name for r in cfg.regions] == ["us", "eu"]  # by priority
    assert cfg.queue.max_rows == 10_000
    assert cfg.topics.telemetry("dev-1") == "edgecloud/devices/dev-1/telemetry"


@pytest.mark.parametrize(
    ("old", "new", "named"),
    [
        ('id = "dev-1"', 'id = "dev/1"', "device.id"),
        ('id = "dev-1"', "", "device.id"),
        ('url = "mqtt://127.0.0.1:1883"', 'url = "http://x"', "broker.url"),
        ('url = "mqtt://127.0.0.1:1883"', 'url = "mqtt://h:notaport"', "broker.url"),
        ("keepalive = 5", 'keepalive = "5"', "broker.keepalive"),
        ("keepalive = 5", "keepalive = 1", "broker.keepalive"),
        ("min_free_mb = 0", "min_free_mb = -1", "store.min_free_mb"),
        ("interval_s = 60.0", "interval_s = 0", "telemetry.interval_s"),
        ("port = 0", "port = 70000", "endpoint.port"),
        ("port = 0", 'host = "0.0.0.0"', "endpoint.host"),
        ("[jobs]", "[jobs]\nstep_timout_s = 1", "jobs.step_timout_s"),
        ("[jobs]", '[policy]\nmode = "fastest"\n[jobs]', "policy.mode"),
        ("[jobs]", "[policy]\nthreshold = 1.5\n[jobs]", "policy.threshold"),
        ("[jobs]", "[queue]\nhard_cap_rows = 20\nmax_rows = 100\n[jobs]", "queue.hard_cap_rows"),
        ("[jobs]", '[[regions]]\nname = "eu"\nendpoint = "ftp://x"\n[jobs]', "regions[0].endpoint"),
        ("[jobs]", "[capture]\nsample_rate = 2\n[jobs]", "capture.sample_rate"),
        ("[jobs]", "[surprise]\n[jobs]", "surprise"),
        ("keepalive = 5", 'keepalive = 5\ncert = "c.pem"', "broker.cert"),
        ('url = "mqtt://127.0.0.1:1883"', 'url = "mqtt://u:p@h:1883"', "broker.url"),
        ("keepalive = 5", 'keepalive = 5\ntopic_prefix = "a/#"', "broker.topic_prefix"),
    ],
)
def test_bad_values_name_the_key(base: Path, old: str, new: str, named: str) -> None:
    text = base.read_text()
    assert old in text
    base.write_text(text.replace(old, new, 1))
    with pytest.raises(ConfigError, match=named.replace("[", r"\[").replace("]", r"\]")):
        load_config(base)


def test_missing_file_bad_toml_and_missing_key_file(base: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read agent config"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[device\nid = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
    base.write_text(base.read_text().replace("fleet.key.pub", "missing.pub"))
    with pytest.raises(ConfigError, match=r"store.public_key: file .*missing.pub does not exist"):
        load_config(base)


def test_cli_reports_config_errors_with_exit_code_2(base: Path) -> None:
    base.write_text(base.read_text().replace("keepalive = 5", "keepalive = true"))
    out = subprocess.run(
        [sys.executable, "-m", "device_agent", "--config", str(base)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert "broker.keepalive" in out.stderr
    assert "Traceback" not in out.stderr
