"""The agent against a real Mosquitto and real onnxruntime: deployments, rollback, refusals."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from device_agent.agent import Agent
from device_agent.config import load_config
from tests.fixtures.agent_util import (
    Keys,
    Observer,
    make_package,
    send_job,
    val_inputs,
    write_config,
)
from tests.fixtures.broker import MosquittoBroker

pytestmark = pytest.mark.mqtt
DEV = "dev-1"


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    return Keys(tmp_path)


@pytest.fixture
def observer(mosquitto: MosquittoBroker) -> Iterator[Observer]:
    obs = Observer(mosquitto.host, mosquitto.port)
    yield obs
    obs.close()


def _config(
    tmp_path: Path, mosquitto: MosquittoBroker, keys: Keys, extra: str = "", **kw: Any
) -> Path:
    return write_config(
        tmp_path / "agent.toml",
        device=DEV,
        broker_url=mosquitto.url,
        store=tmp_path / "store",
        public_key=keys.public,
        extra=extra,
        **kw,
    )


@pytest.fixture
def agent_factory(tmp_path: Path, mosquitto: MosquittoBroker, keys: Keys) -> Iterator[Any]:
    agents: list[Agent] = []

    def make(extra: str = "", **kw: Any) -> Agent:
        a = Agent(load_config(_config(tmp_path, mosquitto, keys, extra, **kw))).start()
        agents.append(a)
        deadline = time.monotonic() + 10
        while not a.connected and time.monotonic() < deadline:
            time.sleep(0.05)
        assert a.connected
        return a

    yield make
    for a in agents:
        a.stop()


def _deploy(obs: Observer, job_id: str, archive: Path, **doc: Any) -> dict[str, Any]:
    send_job(obs, DEV, job_id, "deploy", package_url=archive.as_uri(), **doc)
    return obs.wait_job(job_id)


def test_deploy_rollback_and_restart_keep_active_version(
    tmp_path: Path, keys: Keys, observer: Observer, agent_factory: Any
) -> None:
    v1 = make_package(tmp_path, keys, "1.0.0")
    v2 = make_package(tmp_path, keys, "2.0.0")
    agent = agent_factory()
    assert agent.client.manifest is None

    done = _deploy(observer, "job-1", v1, version="1.0.0")
    assert done["status"] == "SUCCEEDED", done
    states = [u["status"] for u in observer.job_states("job-1")]
    assert states == ["IN_PROGRESS", "SUCCEEDED"]
    assert agent.active_version == "1.0.0"
    x = val_inputs(4)
    out = agent.infer({"input": x})
    assert out.outputs["logits"].shape == (4, 10)
    assert out.version == "1.0.0"

    assert _deploy(observer, "job-2", v2, version="2.0.0")["status"] == "SUCCEEDED"
    assert agent.active_version == "2.0.0"
    assert agent.store.pointer().previous is not None  # type: ignore[union-attr]

    send_job(observer, DEV, "job-3", "rollback", version="1.0.0")
    assert observer.wait_job("job-3")["status"] == "SUCCEEDED"
    assert agent.active_version == "1.0.0"
    # seq of job updates increases per device across jobs
    seqs = [u["seq"] for j in ("job-1", "job-2", "job-3") for u in observer.job_states(j)]
    assert seqs == sorted(seqs)
    assert len(set(seqs)) == len(seqs)

    # online status (retained) names the active version
    observer.wait(
        lambda: any(
            s["online"] and s["model_version"] == "1.0.0" for s in observer.json_on("/status")
        ),
        what="status with model 1.0.0",
    )
    agent.stop()
    again = agent_factory()
    assert again.active_version == "1.0.0"
    assert again.infer({"input": x}).version == "1.0.0"
    # a job that finished before the restart is reported again, not redone
    send_job(observer, DEV, "job-2", "deploy", package_url=v2.as_uri(), version="2.0.0")
    observer.wait(lambda: len(observer.job_states("job-2")) >= 3, what="repeated report")
    last = observer.job_states("job-2")[-1]
    assert last["status"] == "SUCCEEDED"
    assert last["details"].get("repeated") is True
    assert again.active_version == "1.0.0"


def test_tampered_and_unhealthy_packages_leave_old_version_serving(
    tmp_path: Path, keys: Keys, observer: Observer, agent_factory: Any
) -> None:
    agent = agent_factory()
    assert _deploy(observer, "ok-1", make_package(tmp_path, keys, "1.0.0"))["status"] == (
        "SUCCEEDED"
    )
    tampered = make_package(tmp_path, keys, "2.0.0", tamper=True)
    done = _deploy(observer, "bad-hash", tampered)
    assert done["status"] == "REJECTED"
    assert "sha256" in done["reason"]
    assert "model.onnx" in done["reason"]
    assert agent.active_version == "1.0.0"

    other = Keys(tmp_path / "other")
    forged = make_package(tmp_path / "forged", keys, "2.0.1", signing_key=other.private)
    done = _deploy(observer, "bad-sig", forged)
    assert done["status"] == "REJECTED"
    assert "signed by key" in done["reason"]

    wrong_sha = _deploy(
        observer, "bad-archive-sha", make_package(tmp_path, keys, "2.0.2"), sha256="0" * 64
    )
    assert wrong_sha["status"] == "REJECTED"
    assert "sha256" in wrong_sha["reason"]

    assert list((tmp_path / "store" / "downloads").iterdir()) == []  # refused archives gone
    unhealthy = make_package(tmp_path, keys, "3.0.0", bad_warmup=True)
    done = _deploy(observer, "bad-health", unhealthy)
    assert done["status"] == "FAILED"
    assert "warm-up" in done["reason"]
    assert agent.active_version == "1.0.0"
    assert agent.infer({"input": val_inputs(2)}).version == "1.0.0"
    # only 1.0.0 was ever installed and the failed package never reached a slot: there is no
    # previous version, so rollback must refuse rather than activate anything
    send_job(observer, DEV, "rb", "rollback")
    assert observer.wait_job("rb")["status"] == "FAILED"
    assert agent.active_version == "1.0.0"
    # a failed job never blocks the next one
    assert _deploy(observer, "ok-2", make_package(tmp_path, keys, "4.0.0"))["status"] == (
        "SUCCEEDED"
    )
    assert agent.active_version == "4.0.0"


def test_disk_space_refusal(
    tmp_path: Path, keys: Keys, observer: Observer, agent_factory: Any
) -> None:
    # a minimum-free threshold far above what this disk has: refused before any byte is written
    agent = agent_factory(min_free_mb=1e12)
    done = _deploy(observer, "too-big", make_package(tmp_path, keys, "1.0.0"))
    assert done["status"] == "REJECTED"
    assert "not enough free disk space" in done["reason"]
    assert agent.client.manifest is None
    assert not any((tmp_path / "store" / "downloads").iterdir())
    assert not any((tmp_path / "store" / "slots").iterdir())


def test_malformed_messages_rejected_agent_keeps_running(
    tmp_path: Path, keys: Keys, observer: Observer, agent_factory: Any
) -> None:
    agent = agent_factory()
    notify = f"edgecloud/devices/{DEV}/jobs/notify"
    observer.publish(notify, b"{not json")
    observer.publish(notify, {"job_id": "j-bad-op", "operation": "format-disk", "document": {}})
    send_job(observer, DEV, "j-no-url", "deploy")
    send_job(observer, DEV, "j-bad-policy", "policy", mode="edge_first", threshold=float("nan"))
    observer.publish(f"edgecloud/devices/{DEV}/shadow/desired", b"[1,2]", retain=True)
    for jid, word in (
        ("j-bad-op", "operation"),
        ("j-no-url", "package_url"),
        ("j-bad-policy", "threshold"),
    ):
        done = observer.wait_job(jid)
        assert done["status"] == "REJECTED", done
        assert word in done["reason"], done
    observer.wait(lambda: agent.malformed >= 2, what="malformed counter")
    assert "desired state" in agent.last_error or "job notification" in agent.last_error
    send_job(observer, DEV, "j-policy", "policy", mode="edge_only", threshold=0.3)
    assert observer.wait_job("j-policy")["status"] == "SUCCEEDED"
    assert agent.client.mode == "edge_only"
    assert agent.client.threshold == 0.3


def test_desired_state_delta_is_acted_on_and_reported(
    tmp_path: Path, keys: Keys, observer: Observer, agent_factory: Any
) -> None:
    agent = agent_factory()
    v1 = make_package(tmp_path, keys, "1.0.0")
    desired = f"edgecloud/devices/{DEV}/shadow/desired"
    observer.publish(
        desired,
        {
            "version": 3,
            "state": {
                "model": {"name": "digits", "version": "1.0.0", "package_url": v1.as_uri()},
                "policy": {"mode": "edge_only", "threshold": 0.42, "deadline": 2},
            },
        },
        retain=True,
    )
    reported = observer.wait(
        lambda: next(
            (r for r in observer.json_on("/shadow/reported") if r["desired_version"] == 3), None
        ),
        60,
        "reported state 3",
    )
    assert reported["state"]["model"] == {"name": "digits", "version": "1.0.0"}
    assert reported["state"]["policy"] == {"mode": "edge_only", "threshold": 0.42}
    assert reported["state"]["policy_ignored"] == ["deadline"]
    assert "error" not in reported["state"]
    assert agent.active_version == "1.0.0"
    # a desired version that cannot be fetched: reported with the error, old model serving
    observer.publish(
        desired,
        {
            "version": 4,
            "state": {
                "model": {
                    "name": "digits",
                    "version": "2.0.0",
                    "package_url": (tmp_path / "nope.tar.gz").as_uri(),
                }
            },
        },
        retain=True,
    )
    reported = observer.wait(
        lambda: next(
            (r for r in observer.json_on("/shadow/reported") if r["desired_version"] == 4), None
        ),
        60,
        "reported state 4",
    )
    assert "does not exist" in reported["state"]["error"]
    assert reported["state"]["model"]["version"] == "1.0.0"
    # the fleet's policy survives a restart
    agent.stop()
    again = agent_factory()
    assert again.client.mode == "edge_only"
    assert again.client.threshold == 0.42


def test_duplicate_delivery_runs_a_job_once(
    tmp_path: Path, keys: Keys, observer: Observer, agent_factory: Any
) -> None:
    agent = agent_factory()
    v1 = make_package(tmp_path, keys, "1.0.0")
    for _ in range(2):  # QoS 1 may deliver the same notification twice
        send_job(observer, DEV, "dup", "deploy", package_url=v1.as_uri())
    observer.wait(lambda: len(observer.job_states("dup")) >= 3, 60, "three updates")
    time.sleep(0.5)
    statuses = [u["status"] for u in observer.job_states("dup")]
    assert statuses == ["IN_PROGRESS", "SUCCEEDED", "SUCCEEDED"]
    assert observer.job_states("dup")[-1]["details"]["repeated"] is True
    assert agent.metrics.deployments["succeeded"] == 1
    assert agent.store.pointer().previous is None  # type: ignore[union-attr]  # installed once


def test_refused_credentials_are_reported_and_agent_keeps_serving(tmp_path: Path) -> None:
    keys = Keys(tmp_path)
    with MosquittoBroker(allow_anonymous=False) as broker:
        cfg = write_config(
            tmp_path / "agent.toml",
            device="dev-auth",
            broker_url=broker.url,
            store=tmp_path / "store",
            public_key=keys.public,
        )
        agent = Agent(load_config(cfg)).start()
        try:
            deadline = time.monotonic() + 15
            while "refused" not in agent.last_error and time.monotonic() < deadline:
                time.sleep(0.05)
            assert "refused by the broker: reason code 0x8" in agent.last_error
            assert not agent.connected
            assert agent.endpoint is not None
            with httpx.Client(base_url=agent.endpoint.url, timeout=5) as c:
                assert c.get("/v2/health/live").status_code == 200
        finally:
            agent.stop()


def test_mutual_tls_and_device_acl(tmp_path: Path) -> None:
    """Over mTLS with the device-confining ACL (username = certificate CN = device id) the
    agent deploys and reports: it only touches topics its ACL allows."""
    from edgecloud.topics import Topics
    from tests.fixtures.broker import tls_broker

    keys = Keys(tmp_path)
    broker, files = tls_broker(["dev-tls", "controller"], acl=Topics().mosquitto_acl())
    with broker:
        cert, key = files.clients["dev-tls"]
        cfg = write_config(
            tmp_path / "agent.toml",
            device="dev-tls",
            broker_url=broker.url,
            store=tmp_path / "store",
            public_key=keys.public,
            interval=0.2,
        )
        cfg.write_text(
            cfg.read_text().replace(
                "keepalive = 5", f'keepalive = 5\nca = "{files.ca}"\ncert = "{cert}"\nkey = "{key}"'
            )
        )
        ccert, ckey = files.clients["controller"]
        obs = Observer(broker.host, broker.port, tls=(files.ca, ccert, ckey))
        agent = Agent(load_config(cfg)).start()
        try:
            send_job(
                obs,
                "dev-tls",
                "tls-1",
                "deploy",
                package_url=make_package(tmp_path, keys, "1.0.0").as_uri(),
            )
            assert obs.wait_job("tls-1")["status"] == "SUCCEEDED"
            obs.wait(
                lambda: len(obs.json_on("/devices/dev-tls/telemetry")) >= 2,
                what="telemetry over TLS",
            )
            assert agent.last_error == ""
        finally:
            agent.stop()
            obs.close()


def test_restart_with_a_damaged_active_slot_serves_the_previous_one(
    tmp_path: Path, keys: Keys, observer: Observer, agent_factory: Any
) -> None:
    agent = agent_factory()
    assert _deploy(observer, "d1", make_package(tmp_path, keys, "1.0.0"))["status"] == ("SUCCEEDED")
    assert _deploy(observer, "d2", make_package(tmp_path, keys, "2.0.0"))["status"] == ("SUCCEEDED")
    active = agent.store.pointer()
    assert active is not None
    agent.stop()
    model = tmp_path / "store" / "slots" / active.slot / "model.onnx"
    model.write_bytes(model.read_bytes()[:-10])  # bit rot, or someone editing files
    again = agent_factory()
    assert again.active_version == "1.0.0"
    assert "cannot be served" in again.last_error
    assert "model.onnx" in again.last_error
    p = again.store.pointer()
    assert p is not None
    assert p.slot != active.slot
    assert again.infer({"input": val_inputs(1)}).version == "1.0.0"
