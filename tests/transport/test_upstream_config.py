"""``upstream_fp16`` / ``upstream_int8`` in the client TOML ([routing]) and the agent TOML
([policy]): accepted values reach the client's router (and, from the client TOML, the wire: a
real region over HTTP answers INT8 requests with fewer bytes counted); bad values are a
``ConfigError`` naming the key as written.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgecloud.client import HybridClient
from edgecloud.errors import ConfigError
from tests.fixtures.agent_util import Keys, write_config
from tests.fixtures.packages import CLOUD_ONNX, SAMPLES
from tests.fixtures.packages import signed_sample_package as make_package
from tests.fixtures.servers import make_repository, running_cloud_server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    repo = make_repository(tmp_path_factory.mktemp("repo"), {"digits_cloud": CLOUD_ONNX})
    with running_cloud_server(repo, region="web", subprocess=False, threads=1) as s:
        yield s


@pytest.fixture(scope="module")
def pkg(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_package(tmp_path_factory.mktemp("cfg") / "edge")


def _client_toml(path: Path, pkg: tuple[Path, Path], url: str, routing: str) -> Path:
    path.write_text(
        f"""
[model]
package = "{pkg[0]}"
public_key = "{pkg[1]}"

[routing]
mode = "cloud_only"
{routing}

[[regions]]
name = "web"
endpoint = "{url}"
model = "digits_cloud"
cloud_input_shape = [1, 8, 8]
[regions.options]
binary_threshold = 0
"""
    )
    return path


def _bytes_per_offload(cfg: Path, x: np.ndarray) -> tuple[float, list[int]]:
    with HybridClient.from_config(cfg) as c:
        labels = [
            int(np.asarray(c.infer({"input": r[None]}).outputs["logits"]).argmax()) for r in x
        ]
        return c.selector.regions[0].transport.upstream.snapshot()["bytes_per_request"], labels


def test_client_toml_upstream_keys_reach_the_wire(
    tmp_path: Path, server: Any, pkg: tuple[Path, Path]
) -> None:
    x = np.load(SAMPLES / "data" / "edge_val.npz")["input"][:6]
    plain = _client_toml(tmp_path / "a.toml", pkg, server.url, "")
    fp16 = _client_toml(tmp_path / "b.toml", pkg, server.url, "upstream_fp16 = true")
    int8 = _client_toml(tmp_path / "c.toml", pkg, server.url, 'upstream_int8 = ["web"]')
    b32, l32 = _bytes_per_offload(plain, x)
    b16, l16 = _bytes_per_offload(fp16, x)
    b8, l8 = _bytes_per_offload(int8, x)
    assert b8 < b16 < b32
    assert l16 == l32
    assert sum(a == b for a, b in zip(l8, l32, strict=True)) >= len(x) - 1


@pytest.mark.parametrize(
    ("routing", "named"),
    [
        ('upstream_fp16 = "web"', r"\[routing\]\.upstream_fp16: expected true/false or a list"),
        ("upstream_int8 = 1", r"\[routing\]\.upstream_int8: expected true/false or a list"),
        ('upstream_int8 = ["web", ""]', r"\[routing\]\.upstream_int8: expected true/false"),
        ("upstream_int8 = [3]", r"\[routing\]\.upstream_int8: expected"),
        ("upstream_fp16 = true\nupstream_int8 = true", "upstream_fp16 and upstream_int8 both"),
        ('upstream_fp16 = ["web"]\nupstream_int8 = ["web"]', r"both select region\(s\) \['web'\]"),
        ("upstream_in8 = true", r"unknown key\(s\) \['upstream_in8'\]"),
        ('upstream_int8 = ["wbe"]', r"\[routing\]\.upstream_int8: region\(s\) \['wbe'\] are not"),
    ],
)
def test_client_toml_rejects_bad_upstream_keys(
    tmp_path: Path, pkg: tuple[Path, Path], routing: str, named: str
) -> None:
    from edgecloud.config import load_config

    cfg = _client_toml(tmp_path / "c.toml", pkg, "http://127.0.0.1:9", routing)
    with pytest.raises(ConfigError, match=named):
        load_config(cfg)


@pytest.fixture
def agent_toml(tmp_path: Path) -> Path:
    keys = Keys(tmp_path)
    return write_config(
        tmp_path / "agent.toml",
        device="dev-up",
        broker_url="mqtt://127.0.0.1:1883",
        store=tmp_path / "store",
        public_key=keys.public,
    )


def _with_policy(path: Path, policy: str) -> Path:
    out = path.with_name(f"agent-{abs(hash(policy))}.toml")
    out.write_text(
        path.read_text().replace("[jobs]", f"[policy]\n{policy}\n[jobs]", 1)
        + '\n[[regions]]\nname = "eu"\nendpoint = "http://127.0.0.1:9"\n'
        + '\n[[regions]]\nname = "us"\nendpoint = "http://127.0.0.1:9"\n'
    )
    return out


def test_agent_toml_upstream_keys_reach_the_agents_client(agent_toml: Path) -> None:
    from device_agent.agent import Agent
    from device_agent.config import load_config

    cfg = load_config(_with_policy(agent_toml, 'upstream_int8 = ["eu"]\nupstream_fp16 = ["us"]'))
    assert cfg.policy.upstream_int8 == ("eu",)
    assert cfg.policy.upstream_fp16 == ("us",)
    assert load_config(_with_policy(agent_toml, "")).policy.upstream_int8 is False
    agent = Agent(cfg)
    try:
        router = agent.client._router
        assert router.upstream_int8 == frozenset({"eu"})
        assert router.upstream_fp16 == frozenset({"us"})
    finally:
        agent.stop()


@pytest.mark.parametrize(
    ("policy", "named"),
    [
        ('upstream_int8 = "eu"', r"policy\.upstream_int8: expected true/false or a list"),
        ("upstream_fp16 = 0", r"policy\.upstream_fp16: expected true/false or a list"),
        ("upstream_fp16 = [true]", r"policy\.upstream_fp16: expected"),
        (
            'upstream_fp16 = true\nupstream_int8 = ["us"]',
            r"policy: upstream_fp16 and upstream_int8",
        ),
        ("upstream = true", r"policy\.upstream: unknown key"),
        ('upstream_fp16 = ["eu", "asia"]', r"policy\.upstream_fp16: region\(s\) \['asia'\]"),
    ],
)
def test_agent_toml_rejects_bad_upstream_keys(agent_toml: Path, policy: str, named: str) -> None:
    from device_agent.config import load_config

    with pytest.raises(ConfigError, match=named):
        load_config(_with_policy(agent_toml, policy))
