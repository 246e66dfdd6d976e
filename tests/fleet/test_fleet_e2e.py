"""End to end: the fleet controller and three real device agents (``python -m device_agent``),
each its own process with its own model store and local V2 endpoint, over a real Mosquitto.

Packages are real: the digits edge MLP signed with a fresh Ed25519 key (with the warm-up data the
agent checks before it swaps). Nothing here is simulated: the agents download from the
controller's package server, verify, swap and report on their own.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from edgecloud.cli.main import main as cli_main
from edgecloud.fleet.controller import FleetController
from edgecloud.fleet.jobs import RolloutConfig
from edgecloud.fleet.packages import PackageStore
from edgecloud.fleet.server import FleetHTTPServer
from edgecloud.fleet.store import SqliteFleetStore
from tests.fixtures.agent_util import Keys, make_package, val_inputs
from tests.fixtures.broker import MosquittoBroker
from tests.fixtures.fleet_agents import AgentProc, tamper
from tests.fixtures.wait import wait_until

pytestmark = pytest.mark.mqtt
ROOT = Path(__file__).resolve().parents[2]
N_AGENTS = 3


class E2E:
    def __init__(
        self,
        ctl: FleetController,
        http: FleetHTTPServer,
        agents: list[AgentProc],
        keys: Keys,
        tmp: Path,
    ) -> None:
        self.ctl, self.http, self.agents, self.keys, self.tmp = ctl, http, agents, keys, tmp

    def package_dir(self, version: str) -> Path:
        make_package(self.tmp, self.keys, version)
        return self.tmp / f"build-{version}" / "pkg"

    def wait_job(self, job_id: str, timeout: float = 60.0) -> dict[str, Any]:
        wait_until(
            lambda: (
                self.ctl.job_done(job_id)
                and not any(
                    e["state"] == "IN_PROGRESS" for e in self.ctl.job_view(job_id)["executions"]
                )
            ),
            timeout=timeout,
            what=f"job {job_id}",
        )
        return self.ctl.job_view(job_id)

    def logs(self) -> str:
        return "\n".join(f"--- {a.device_id}\n{a.log.read_text()[-3000:]}" for a in self.agents)


def _fleet(tmp_path: Path, mosquitto: MosquittoBroker, interval: float) -> Iterator[E2E]:
    keys = Keys(tmp_path / "keys")
    ctl = FleetController(
        mosquitto.url,
        SqliteFleetStore(tmp_path / "fleet.sqlite"),
        PackageStore(tmp_path / "packages"),
        tick_interval=0.05,
    )
    http = FleetHTTPServer(ctl).start()
    ctl.start()
    agents = [AgentProc(tmp_path, mosquitto, keys, i, interval).start() for i in range(N_AGENTS)]
    e2e = E2E(ctl, http, agents, keys, tmp_path)
    try:
        wait_until(
            lambda: sum(d.online for d in ctl.devices.values()) == N_AGENTS,
            timeout=60,
            what="three agents online",
        )
        yield e2e
    except BaseException:
        print(e2e.logs())
        raise
    finally:
        for a in agents:
            a.stop()
        http.close()
        ctl.close()


@pytest.fixture
def e2e(tmp_path: Path, mosquitto: MosquittoBroker) -> Iterator[E2E]:
    yield from _fleet(tmp_path, mosquitto, interval=5.0)


@pytest.fixture
def persistent_broker(tmp_path: Path) -> Iterator[MosquittoBroker]:
    """A broker that keeps sessions across a restart, as a production broker does: the
    controller's subscription and the QoS 1 messages queued for it survive the outage."""
    d = tmp_path / "mosquitto-data"
    d.mkdir()
    conf = ["persistence true", f"persistence_location {d}/", "autosave_interval 1"]
    if os.geteuid() == 0:
        conf.append("user root")  # else mosquitto drops to a user that cannot write tmp_path
    with MosquittoBroker(extra_config=conf) as broker:
        yield broker


@pytest.fixture
def e2e_fast_telemetry(tmp_path: Path, persistent_broker: MosquittoBroker) -> Iterator[E2E]:
    yield from _fleet(tmp_path, persistent_broker, interval=0.5)


@pytest.mark.slow
def test_rollout_to_real_agents_with_zero_failed_requests(
    e2e: E2E, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    ctl = e2e.ctl
    v1 = e2e.package_dir("1.0.0")
    first = ctl.deploy(v1, ["lab"])
    done = e2e.wait_job(first.job_id)
    assert done["counts"]["SUCCEEDED"] == N_AGENTS, (done, e2e.logs())

    # a client hammers one agent's local V2 endpoint through the whole rollout
    x = val_inputs(1)
    body = {
        "inputs": [
            {"name": "input", "shape": [1, 64], "datatype": "FP32", "data": x.ravel().tolist()}
        ]
    }
    seen: dict[str, int] = {}
    failures: list[Any] = []
    stop = threading.Event()

    def hammer() -> None:
        with httpx.Client(base_url=e2e.agents[0].url, timeout=10) as c:
            while not stop.is_set():
                try:
                    r = c.post("/v2/models/digits/infer", json=body)
                except httpx.HTTPError as exc:
                    failures.append(repr(exc))
                    continue
                if r.status_code != 200:
                    failures.append((r.status_code, r.text))
                    continue
                v = r.json()["model_version"]
                seen[v] = seen.get(v, 0) + 1

    t = threading.Thread(target=hammer)
    t.start()
    try:
        wait_until(lambda: seen.get("1.0.0", 0) >= 20, what="v1 answering")
        start = time.monotonic()
        job = ctl.deploy(
            e2e.package_dir("2.0.0"), ["lab"], rollout=RolloutConfig(max_per_minute=30)
        )
        view = e2e.wait_job(job.job_id)
        took = time.monotonic() - start
        assert view["counts"]["SUCCEEDED"] == N_AGENTS, (view, e2e.logs())
        # 30/min: one notification every 2 s, so three devices take at least 4 s
        sent = sorted(e["sent_at"] for e in view["executions"])
        assert sent[-1] - sent[0] >= 3.5
        assert took >= 3.5
        wait_until(lambda: seen.get("2.0.0", 0) >= 20, what="v2 answering")
    finally:
        stop.set()
        t.join(15)
    assert failures == []
    assert seen["1.0.0"] >= 20
    assert seen["2.0.0"] >= 20

    monkeypatch.setenv("EDGECLOUD_CONTROLLER", e2e.http.url)
    wait_until(lambda: all(d.model_version == "2.0.0" for d in ctl.devices.values()))
    assert cli_main(["fleet", "devices", "--json"]) == 0
    devs = json.loads(capsys.readouterr().out)
    assert [(d["device_id"], d["online"], d["model_version"]) for d in devs] == [
        (a.device_id, True, "2.0.0") for a in e2e.agents
    ]

    # a tampered package: every agent refuses it, the job aborts, 2.0.0 keeps serving
    bad = e2e.package_dir("3.0.0")
    tamper(bad)
    assert (
        cli_main(
            [
                "fleet",
                "deploy",
                str(bad),
                "--to",
                "lab",
                "--abort-failure-type",
                "REJECTED",
                "--abort-failed-percent",
                "50",
                "--abort-min-executed",
                "2",
                "--json",
            ]
        )
        == 0
    )
    job3 = json.loads(capsys.readouterr().out)
    view = e2e.wait_job(job3["job_id"])
    assert view["status"] == "CANCELED"
    assert view["reason"].startswith("aborted")
    assert view["counts"]["REJECTED"] == N_AGENTS, view
    assert all("sign" in e["reason"] for e in view["executions"]), view["executions"]
    with httpx.Client(base_url=e2e.agents[1].url, timeout=10) as c:
        r = c.post("/v2/models/digits/infer", json=body)
    assert r.status_code == 200
    assert r.json()["model_version"] == "2.0.0"
    assert all(d.model_version == "2.0.0" for d in ctl.devices.values())
    # the refused package did not use up its version: the correctly signed 3.0.0 deploys
    real = ctl.deploy(e2e.package_dir("3.0.0"), ["lab"])
    assert e2e.wait_job(real.job_id)["counts"]["SUCCEEDED"] == N_AGENTS
    wait_until(lambda: all(d.model_version == "3.0.0" for d in ctl.devices.values()))
    # the next job is not blocked by the failed one: back to 1.0.0 (the same stored package)
    again = ctl.deploy(v1, ["lab"])
    assert e2e.wait_job(again.job_id)["counts"]["SUCCEEDED"] == N_AGENTS
    wait_until(lambda: all(d.model_version == "1.0.0" for d in ctl.devices.values()))
    # and a rollback job returns every agent to its previous version (3.0.0)
    rb = ctl.rollback(["lab"])
    rbv = e2e.wait_job(rb.job_id)
    assert rbv["counts"]["SUCCEEDED"] == N_AGENTS, [e["reason"] for e in rbv["executions"]]
    wait_until(lambda: all(d.model_version == "3.0.0" for d in ctl.devices.values()))


@pytest.mark.slow
def test_broker_outage_telemetry_arrives_in_order(
    e2e_fast_telemetry: E2E, persistent_broker: MosquittoBroker
) -> None:
    mosquitto = persistent_broker
    e2e = e2e_fast_telemetry
    ctl = e2e.ctl
    ids = [a.device_id for a in e2e.agents]
    wait_until(
        lambda: all(ctl.devices[i].counters.get("telemetry", 0) >= 3 for i in ids),
        what="telemetry flowing",
    )
    mosquitto.stop()
    down_at = time.time()
    # The outage lasts until every agent holds, queued on its disk, as many records made during
    # it as the checks below ask for (40 per 30 s at a 0.5 s interval): a wait on that, not on
    # the clock, so a loaded machine gets the records it needs and a quiet one waits ~21 s.
    outage = float(os.environ.get("OUTAGE", 30))
    need = int(40 * outage / 30) + 1

    def queued_during(agent: AgentProc) -> int:
        db = agent.config.parent / "store" / "agent.db"
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as c:
            (n,) = c.execute(
                "SELECT COUNT(*) FROM outbox WHERE kind = 'telemetry' AND created > ? "
                "AND created < ?",
                (down_at + 1.5, time.time() - 1.5),
            ).fetchone()
        return int(n)

    wait_until(
        lambda: all(queued_during(a) >= need for a in e2e.agents),
        timeout=outage + 60,
        what=f"{need} telemetry records queued on every agent during the outage",
    )
    up_at = time.time()
    mosquitto.start()
    # every agent produced ~60 records while the broker was down; all of them must arrive
    wait_until(
        lambda: all(any(r["ts"] > up_at for r in ctl.telemetry_view(i)) for i in ids),
        timeout=60,
        what="telemetry after the outage",
    )
    for i in ids:
        # telemetry keeps flowing while this reads: the count before the view and after it
        # bracket the view's length when every counted record is stored once
        counted_before = ctl.devices[i].counters["telemetry"]
        recs = ctl.telemetry_view(i)
        counted_after = ctl.devices[i].counters["telemetry"]
        seqs = [r["seq"] for r in recs]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), (
            f"{i}: gap or disorder {ctl.devices[i].counters}"
        )
        during = [r for r in recs if down_at + 1 < r["ts"] < up_at - 1]
        assert len(during) >= 40 * float(os.environ.get("OUTAGE", 30)) / 30, (
            f"{i}: only {len(during)} records from the outage arrived"
        )
        d = ctl.devices[i]
        assert d.counters.get("telemetry_gaps", 0) == 0
        # at the default verbosity, the agent said it lost the broker and when it was back
        log = next(a for a in e2e.agents if a.device_id == i).log.read_text()
        assert "lost the broker" in log
        assert "reconnected to" in log
        # duplicates were counted apart, not stored
        assert counted_before <= len(recs) <= counted_after, (counted_before, counted_after)
        wait_until(lambda d=d: d.online, what=f"{i} online again")
