"""The shipped secure broker setup against a real Mosquitto with the dynamic-security plugin.

The attack from the field: a device subscribes to the workers' share group (or to another
device's requests) and from then on is handed a share of every device's requests, which the
broker then withholds, so they are never answered. With the shipped roles the SUBSCRIBE itself
is refused (SUBACK 0x87), whatever group name the device guesses, and every request is answered.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from edgecloud.broker_security import dynsec_config
from edgecloud.cloud.mqtt_worker import MqttWorker, echo_handler
from edgecloud.errors import AuthError, ConfigError
from edgecloud.mqtt import MqttConnection, parse_broker_url
from edgecloud.topics import Topics
from edgecloud.transport.mqtt import MqttTransport
from edgecloud.transport.v2 import InferRequest
from tests.fixtures.broker import MosquittoBroker, _run_as_me

pytestmark = pytest.mark.mqtt
ROOT = Path(__file__).resolve().parents[2]
USERS = [
    ("worker", "w-secret", "worker"),
    ("controller", "c-secret", "controller"),
    ("dev-a", "a-secret", "device"),
    ("dev-b", "b-secret", "device"),
]
PW = {u: p for u, p, _ in USERS}


@pytest.fixture(scope="module")
def broker() -> Iterator[MosquittoBroker]:
    """The shipped samples/mosquitto/dynsec.conf settings, on a free loopback port."""
    workdir = Path(tempfile.mkdtemp(prefix="edgecloud-mosquitto-secure-"))
    cfg_file = workdir / "dynamic-security.json"
    cfg_file.write_text(json.dumps(dynsec_config(USERS, regions=[("eu", None)])))
    cfg_file.chmod(0o600)
    shipped = (ROOT / "samples/mosquitto/dynsec.conf").read_text().splitlines()
    # The shipped file's security directives, with the plugin's file here instead of /etc.
    security = [
        f"plugin_opt_config_file {cfg_file}" if line.startswith("plugin_opt_config_file") else line
        for line in shipped
        if line.startswith(("plugin", "per_listener_settings"))
    ]
    assert "allow_anonymous false" in shipped
    assert any(line.startswith("plugin ") for line in security)
    b = MosquittoBroker(
        allow_anonymous=False, extra_config=[_run_as_me(), *security], workdir=workdir
    )
    b._own_dir = True
    with b:
        yield b


@pytest.fixture(scope="module")
def worker(broker: MosquittoBroker) -> Iterator[MqttWorker]:
    w = MqttWorker(
        echo_handler,
        broker=parse_broker_url(broker.url, username="worker", password=PW["worker"]),
        region="eu",
    ).start()
    yield w
    w.stop()


def _conn(broker: MosquittoBroker, user: str) -> MqttConnection:
    return MqttConnection(
        parse_broker_url(broker.url, username=user, password=PW[user]),
        client_id=f"{user}-{uuid.uuid4().hex[:6]}",
    ).start(5)


X = InferRequest(model="m", inputs={"x": np.arange(4, dtype=np.float32)})


@pytest.mark.parametrize(
    "stolen",
    [
        "$share/workers-eu/edgecloud/devices/+/infer/eu/request",  # the workers' own group
        "$share/guessed/edgecloud/devices/+/infer/eu/request",  # any other group
        "$share/workers-eu/edgecloud/devices/dev-b/infer/eu/request",
        "edgecloud/devices/+/infer/eu/request",
        "edgecloud/devices/dev-b/infer/eu/request",
        "edgecloud/devices/dev-b/infer/reply",
        "edgecloud/devices/+/infer/reply",
        "edgecloud/#",
        "#",
    ],
)
def test_device_cannot_subscribe_to_requests_share_group_or_other_replies(
    broker: MosquittoBroker, worker: MqttWorker, stolen: str
) -> None:
    thief = _conn(broker, "dev-a")
    try:
        thief.subscribe(Topics().infer_reply("dev-a"), 1)  # its own replies: granted
        with pytest.raises(AuthError, match=re.escape("0x87")):
            thief.subscribe(stolen, 1)
        # dev-b is not harmed: every one of its requests is answered
        with MqttTransport(
            broker.url, region="eu", device_id="dev-b", username="dev-b", password=PW["dev-b"]
        ) as t:
            for _ in range(6):
                r = t.infer(X, timeout=5)
                np.testing.assert_array_equal(r.outputs["x"], X.inputs["x"])
    finally:
        thief.close()


def test_device_cannot_publish_as_another_device(
    broker: MosquittoBroker, worker: MqttWorker
) -> None:
    with MqttTransport(
        broker.url, region="eu", device_id="dev-a", username="dev-a", password=PW["dev-a"]
    ) as own:
        np.testing.assert_array_equal(own.infer(X, timeout=5).outputs["x"], X.inputs["x"])
    with (
        MqttTransport(
            broker.url, region="eu", device_id="dev-b", username="dev-a", password=PW["dev-a"]
        ) as spoof,
        pytest.raises(AuthError, match="0x87"),
    ):
        spoof.infer(X, timeout=3)


def test_controller_gets_its_filters_and_nothing_of_the_request_tree(
    broker: MosquittoBroker,
) -> None:
    c = _conn(broker, "controller")
    try:
        t = Topics()
        for f in (t.all_status(), t.all_reported(), t.all_job_updates(), t.all_telemetry()):
            c.subscribe(f, 1)
        with pytest.raises(AuthError, match="0x87"):
            c.subscribe(t.infer_worker_filter("eu"), 1)
    finally:
        c.close()


def test_worker_with_another_group_is_refused(broker: MosquittoBroker) -> None:
    """The group is part of the grant: `cloud serve --group` must match the broker's role."""
    with pytest.raises(AuthError, match="0x87"):
        MqttWorker(
            echo_handler,
            broker=parse_broker_url(broker.url, username="worker", password=PW["worker"]),
            region="eu",
            group="other",
        ).start(timeout=5)


def test_generator_cli_and_bad_input(tmp_path: Path) -> None:
    users = tmp_path / "users.txt"
    users.write_text("# comment\nworker Clear-Text-1 worker\ndev-1 Clear-Text-2 device\n")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "edgecloud.broker_security",
            "--users",
            str(users),
            "--region",
            "eu",
            "--group",
            "g-eu",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    cfg = json.loads(out.stdout)
    worker_role = next(r for r in cfg["roles"] if r["rolename"] == "edgecloud-worker-eu")
    assert worker_role["acls"][0] == {
        "acltype": "subscribeLiteral",
        "topic": "$share/g-eu/edgecloud/devices/+/infer/eu/request",
        "priority": 0,
        "allow": True,
    }
    assert "Clear-Text" not in out.stdout  # hashed, never in clear
    users.write_text("dev/1 pw device\n")
    bad = subprocess.run(
        [sys.executable, "-m", "edgecloud.broker_security", "--users", str(users)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2
    assert "device id" in bad.stderr
    with pytest.raises(ConfigError, match="role"):
        dynsec_config([("x", "y", "admin")], regions=[])


@pytest.fixture(scope="module")
def grouped_broker() -> Iterator[MosquittoBroker]:
    """The workers' role grants the share group 'g-eu' only."""
    workdir = Path(tempfile.mkdtemp(prefix="edgecloud-mosquitto-group-"))
    cfg_file = workdir / "dynamic-security.json"
    cfg_file.write_text(json.dumps(dynsec_config(USERS, regions=[("eu", "g-eu")])))
    cfg_file.chmod(0o600)
    b = MosquittoBroker(
        allow_anonymous=False,
        extra_config=[
            _run_as_me(),
            "plugin /usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so",
            f"plugin_opt_config_file {cfg_file}",
        ],
        workdir=workdir,
    )
    b._own_dir = True
    with b:
        yield b


def _serve(broker: MosquittoBroker, repo: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            *(sys.executable, "-m", "edgecloud", "cloud", "serve", "--repository", str(repo)),
            *("--port", "0", "--region", "eu", "--mqtt", broker.url),
            *("--mqtt-username", "worker", *extra),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
        env={**os.environ, "EDGECLOUD_MQTT_PASSWORD": PW["worker"]},
    )


def test_cloud_serve_group_option_must_match_the_brokers_grant(
    grouped_broker: MosquittoBroker, tmp_path: Path
) -> None:
    from tests.fixtures.servers import make_repository

    repo = make_repository(tmp_path, {"digits_cloud": ROOT / "samples/models/digits_cloud.onnx"})
    refused = _serve(grouped_broker, repo)  # default group workers-eu: not granted
    out, _ = refused.communicate(timeout=60)
    assert refused.returncode != 0
    assert "0x87" in out
    ok = _serve(grouped_broker, repo, "--group", "g-eu")
    try:
        assert ok.stdout is not None
        assert "serving" in ok.stdout.readline()
        x = np.load(ROOT / "samples/data/cloud_val.npz")["input"][:1].astype(np.float32)
        with MqttTransport(
            grouped_broker.url,
            region="eu",
            device_id="dev-a",
            username="dev-a",
            password=PW["dev-a"],
        ) as t:
            r = t.infer(InferRequest("digits_cloud", {"input": x}), timeout=10)
        assert r.outputs["logits"].shape == (1, 10)
    finally:
        ok.terminate()
        ok.wait(15)
        if ok.stdout is not None:
            ok.stdout.close()
