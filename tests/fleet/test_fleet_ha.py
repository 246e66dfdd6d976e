"""Controller high availability: two ``edgecloud fleet serve`` processes on one PostgreSQL
database (a throwaway cluster, tests/fixtures/postgres.py), one active by the store's lease.

The active one is killed (SIGKILL) in the middle of a rate-limited rollout to three real
agents; the standby takes the lease within a bounded time and finishes the rollout, and its
view matches what every agent serves.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.fixtures.agent_util import Keys
from tests.fixtures.broker import free_port, sample_broker
from tests.fixtures.fleet_agents import AgentProc
from tests.fixtures.fleet_procs import SAMPLE, ControllerProc, Fleet, SlowLink
from tests.fixtures.postgres import postgres_bin, running_postgres
from tests.fixtures.wait import wait_until

pytestmark = [
    pytest.mark.mqtt,
    pytest.mark.slow,
    pytest.mark.skipif(
        postgres_bin() is None, reason="needs PostgreSQL (./dev.sh test installs it)"
    ),
]
LEASE_S = 3.0


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[ControllerProc, ControllerProc, Fleet]]:
    pytest.importorskip("sqlalchemy")
    pytest.importorskip("psycopg")
    with running_postgres() as pg:
        broker = sample_broker(SAMPLE).start()
        pa, pb = free_port(), free_port()
        # devices download through one address in front of both controllers
        link = SlowLink([f"http://127.0.0.1:{pa}", f"http://127.0.0.1:{pb}"])
        ha = ("--ha-lease", f"{LEASE_S:g}s")
        a = ControllerProc(
            tmp_path,
            broker,
            link.url,
            pa,
            db=pg.url,
            extra=(*ha, "--instance-id", "ctl-a"),
            name="ctl-a",
        )
        b = ControllerProc(
            tmp_path,
            broker,
            link.url,
            pb,
            db=pg.url,
            extra=(*ha, "--instance-id", "ctl-b"),
            name="ctl-b",
        )
        keys = Keys(tmp_path / "keys")
        agents: list[AgentProc] = []
        f = Fleet(tmp_path, a, link, agents, keys)
        try:
            a.start()
            wait_until(lambda: a.health().get("active") is True, timeout=30, what="a active")
            b.start()
            agents += [AgentProc(tmp_path, broker, keys, i, interval=1.0).start() for i in range(3)]
            wait_until(
                lambda: sum(d["online"] for d in f.api("GET", "/api/devices")) == 3,
                timeout=60,
                what="three agents online",
            )
            yield a, b, f
        except BaseException:
            print(f.logs())
            print((tmp_path / "ctl-b.log").read_text()[-4000:])
            raise
        finally:
            for ag in agents:
                ag.stop()
            a.stop()
            b.stop()
            link.close()
            f.http.close()
            broker.close()


def test_standby_takes_over_mid_rollout_and_finishes_it(
    pair: tuple[ControllerProc, ControllerProc, Fleet], capsys: pytest.CaptureFixture[str]
) -> None:
    a, b, f = pair
    assert b.health()["active"] is False
    # the standby answers reads and refuses writes
    r = httpx.post(b.url + "/api/rollback", json={"targets": ["lab"]}, timeout=10)
    assert r.status_code == 503
    assert "standby" in r.json()["error"]

    # 12/min: one notification every 5 s, so the rollout is still going when a dies
    job = f.api(
        "POST",
        "/api/deploy",
        {
            "package": str(f.package("1.0.0")),
            "targets": ["lab"],
            "rollout": {"max_per_minute": 12},
            "timeout_s": 60,
        },
    )
    jid = job["job_id"]
    wait_until(
        lambda: f.api("GET", f"/api/jobs/{jid}")["counts"]["SUCCEEDED"] >= 1,
        timeout=60,
        what="first device done",
    )
    before = f.api("GET", f"/api/jobs/{jid}")
    assert before["counts"]["SUCCEEDED"] < 3, "the rollout ended before the kill"
    a.kill()
    killed = time.monotonic()
    wait_until(lambda: b.health().get("active") is True, timeout=4 * LEASE_S, what="b active")
    took = time.monotonic() - killed
    assert took <= 2 * LEASE_S, f"the standby took {took:.1f}s to take over"

    f.ctl = b  # from here on, talk to the new active controller
    f.http.close()
    f.http = httpx.Client(base_url=b.url, timeout=10)
    done = f.wait_job(jid, timeout=90)
    assert done["status"] == "COMPLETED", done
    assert done["counts"]["SUCCEEDED"] == 3, done["executions"]
    assert not [e for e in done["executions"] if e["state"] in ("QUEUED", "IN_PROGRESS")]
    assert set(f.assert_truth(capsys, "after the takeover").values()) == {"1.0.0"}
    # and the new active one takes writes
    r = f.http.post("/api/policy", json={"targets": ["lab"], "policy": {"threshold": 0.5}})
    assert r.status_code == 200, r.text
