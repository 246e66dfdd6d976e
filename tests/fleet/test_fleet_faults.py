"""Fault tests of the fleet's picture: what the controller shows is what each device runs.

Everything is real and a process of its own: Mosquitto with the shipped
``samples/mosquitto/plain.conf`` (persistence on), the controller (``edgecloud fleet serve``),
three device agents (``python -m device_agent``), and between the agents and the controller's
package server a slow link (``SlowLink``, below) that can also be cut. The tests kill
controllers and agents with SIGKILL, restart them, wipe a device, cut the link, and after each
step compare the controller's view (API and ``fleet devices --json``) with the version each
agent's own V2 endpoint says it serves.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgecloud.cli.main import main as cli_main
from tests.fixtures.agent_util import Keys
from tests.fixtures.broker import free_port, sample_broker
from tests.fixtures.fleet_agents import AgentProc
from tests.fixtures.fleet_procs import SAMPLE, ControllerProc, Fleet, SlowLink
from tests.fixtures.wait import wait_until

pytestmark = [pytest.mark.mqtt, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
OUTAGE_S = float(os.environ.get("FLEET_OUTAGE_S", 15))


def kill9(agent: AgentProc) -> None:
    assert agent.proc is not None
    agent.proc.send_signal(signal.SIGKILL)
    agent.proc.wait(timeout=10)


@pytest.fixture
def fleet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Fleet]:
    broker = sample_broker(SAMPLE).start()
    port = free_port()
    link = SlowLink(f"http://127.0.0.1:{port}")
    keys = Keys(tmp_path / "keys")
    ctl = ControllerProc(tmp_path, broker, link.url, port).start()
    agents = [AgentProc(tmp_path, broker, keys, i, interval=1.0).start() for i in range(3)]
    f = Fleet(tmp_path, ctl, link, agents, keys)
    monkeypatch.setenv("EDGECLOUD_CONTROLLER", ctl.url)
    try:
        wait_until(
            lambda: sum(d["online"] for d in f.api("GET", "/api/devices")) == 3,
            timeout=60,
            what="three agents online",
        )
        yield f
    except BaseException:
        print(f.logs())
        raise
    finally:
        for a in agents:
            a.stop()
        ctl.stop()
        link.close()
        f.http.close()
        broker.close()


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, Any]:
    capsys.readouterr()
    code = cli_main(["fleet", *argv])
    cap = capsys.readouterr()
    try:
        return code, json.loads(cap.out)
    except ValueError:
        return code, cap.out + cap.err


def test_view_matches_agents_through_deploys_policy_restarts_kills_and_a_wipe(
    fleet: Fleet, capsys: pytest.CaptureFixture[str]
) -> None:
    f = fleet
    a0, _a1, a2 = f.agents
    code, job = _cli(capsys, "deploy", str(f.package("1.0.0")), "--to", "lab", "--wait", "--json")
    assert code == 0, (job, f.logs())
    assert f.assert_truth(capsys, "after v1") == dict.fromkeys(
        ("agent-0", "agent-1", "agent-2"), "1.0.0"
    )

    code, _ = _cli(
        capsys,
        "policy",
        "set",
        "--to",
        "lab",
        "--mode",
        "edge_first",
        "--threshold",
        "0.4",
        "--json",
    )
    assert code == 0
    wait_until(
        lambda: all(
            f.api("GET", f"/api/devices/{a.device_id}/shadow")["reported"]["policy"]["threshold"]
            == 0.4
            for a in f.agents
        ),
        timeout=30,
        what="policy reported",
    )
    code, job = _cli(capsys, "deploy", str(f.package("2.0.0")), "--to", "lab", "--wait", "--json")
    assert code == 0, job
    f.assert_truth(capsys, "after v2")

    # the controller dies without a word and comes back: the retained reported states arrive
    # again, in whatever order, and none may take the version back
    f.ctl.kill()
    f.ctl.start()
    assert set(f.assert_truth(capsys, "after a controller kill").values()) == {"2.0.0"}
    shadow = f.api("GET", "/api/devices/agent-1/shadow")
    assert shadow["reported"]["policy"] == {"mode": "edge_first", "threshold": 0.4}
    assert shadow["delta"] == {}

    # an agent killed, a deploy while it is down, the agent back: it catches up
    kill9(a0)
    job3 = f.api("POST", "/api/deploy", {"package": str(f.package("3.0.0")), "targets": ["lab"]})
    wait_until(
        lambda: f.api("GET", f"/api/jobs/{job3['job_id']}")["counts"]["SUCCEEDED"] == 2,
        timeout=60,
        what="two online agents on v3",
    )
    a0.start()
    assert f.wait_job(job3["job_id"])["counts"]["SUCCEEDED"] == 3
    f.assert_truth(capsys, "after v3 with an agent killed")

    # a rollback of one device, a policy change, another controller kill
    code, job = _cli(capsys, "rollback", "--to", "agent-1", "--wait", "--json")
    assert code == 0, job
    code, _ = _cli(capsys, "policy", "set", "--to", "lab", "--threshold", "0.6", "--json")
    assert code == 0
    f.ctl.kill()
    f.ctl.start()
    assert f.assert_truth(capsys, "after rollback + kill") == {
        "agent-0": "3.0.0",
        "agent-1": "2.0.0",
        "agent-2": "3.0.0",
    }
    wait_until(
        lambda: (
            f.api("GET", "/api/devices/agent-2/shadow")["reported"]["policy"]["threshold"] == 0.6
        ),
        timeout=30,
        what="second policy reported",
    )

    # agent-2 is wiped and re-provisioned under the same id: a new epoch, no model, and its
    # telemetry (seq from 1 again) is accepted, not counted as duplicates
    before = f.api("GET", "/api/devices/agent-2")
    kill9(a2)
    shutil.rmtree(a2.config.parent / "store")
    a2.start()
    wait_until(
        lambda: f.api("GET", "/api/devices/agent-2")["reprovisioned_at"] is not None,
        timeout=30,
        what="re-provisioned",
    )
    assert f.assert_truth(capsys, "after the wipe")["agent-2"] == ""
    after = f.api("GET", "/api/devices/agent-2")
    assert after["epoch"] != before["epoch"]
    assert after["counters"]["reprovisioned"] == 1
    dups = after["counters"].get("telemetry_duplicates", 0)
    wait_until(
        lambda: f.api("GET", "/api/devices/agent-2")["telemetry_seq"] >= 3,
        timeout=30,
        what="new-epoch telemetry accepted",
    )
    assert f.api("GET", "/api/devices/agent-2")["counters"].get("telemetry_duplicates", 0) == dups
    code, job = _cli(
        capsys, "deploy", str(f.package("3.0.0")), "--to", "agent-2", "--wait", "--json"
    )
    assert code == 0, job
    f.assert_truth(capsys, "after redeploying the wiped device")


def test_ended_executions_reconcile_with_what_devices_run(
    fleet: Fleet, capsys: pytest.CaptureFixture[str]
) -> None:
    f = fleet
    a0, a1, _a2 = f.agents
    v1 = f.package("1.0.0")
    v2 = f.package("2.0.0")
    code, _ = _cli(capsys, "deploy", str(v1), "--to", "lab", "--wait", "--json")
    assert code == 0

    # 1. TIMED_OUT while the agent is dead: on restart it asks, is told to cancel, and does
    #    not install what the controller gave up on
    f.link.down = True
    job = f.api(
        "POST", "/api/deploy", {"package": str(v2), "targets": ["agent-0"], "timeout_s": "6s"}
    )
    jid = job["job_id"]
    wait_until(lambda: f.execution(jid, "agent-0")["state"] == "IN_PROGRESS", timeout=30)
    kill9(a0)
    wait_until(lambda: f.execution(jid, "agent-0")["state"] == "TIMED_OUT", timeout=30)
    f.link.down = False
    a0.start()
    wait_until(
        lambda: f.execution(jid, "agent-0")["details"].get("device_confirmed"),
        timeout=45,
        what="the agent confirmed the cancel",
    )
    time.sleep(2)
    e = f.execution(jid, "agent-0")
    assert e["state"] == "TIMED_OUT", e
    view = f.api("GET", f"/api/jobs/{jid}")
    assert view["status"] == "COMPLETED"
    assert view["counts"]["TIMED_OUT"] == 1
    assert f.served(a0) == "1.0.0"  # the job's state agrees with what the device runs
    assert "interrupted by a restart" in a0.log.read_text()

    # 2. fleet cancel --force reaches a device that is running the job
    f.link.down = True
    job = f.api(
        "POST", "/api/deploy", {"package": str(v2), "targets": ["agent-1"], "timeout_s": 60}
    )
    jid = job["job_id"]
    wait_until(lambda: f.execution(jid, "agent-1")["state"] == "IN_PROGRESS", timeout=30)
    code, out = _cli(capsys, "cancel", jid, "--force", "--json")
    assert code == 0
    assert out["status"] == "CANCELED"
    wait_until(
        lambda: f.execution(jid, "agent-1")["details"].get("device_confirmed"),
        timeout=30,
        what="agent-1 stopped the canceled job",
    )
    f.link.down = False
    time.sleep(2)
    assert f.served(a1) == "1.0.0"

    # 3. retries per failure type: the first attempt fails (package server unreachable until
    #    shortly before its timeout), the retry, a new execution number, succeeds
    f.link.down = True
    code, job = _cli(
        capsys,
        "deploy",
        str(v2),
        "--to",
        "agent-2",
        "--timeout",
        "5s",
        "--retry",
        "FAILED:1,TIMED_OUT:1",
        "--json",
    )
    assert code == 0, job
    jid = job["job_id"]
    assert job["retry"] == {"FAILED": 1, "TIMED_OUT": 1}
    wait_until(
        lambda: f.execution(jid, "agent-2")["attempts"], timeout=30, what="first attempt over"
    )
    f.link.down = False
    done = f.wait_job(jid)
    e = done["executions"][0]
    assert e["state"] == "SUCCEEDED", e
    assert e["execution_number"] == 2
    assert e["attempts"][0]["state"] in ("FAILED", "TIMED_OUT")
    assert done["counts"]["SUCCEEDED"] == 1
    assert f.assert_truth(capsys, "after the retries") == {
        "agent-0": "1.0.0",
        "agent-1": "1.0.0",
        "agent-2": "2.0.0",
    }


def test_download_survives_a_controller_outage(
    fleet: Fleet, capsys: pytest.CaptureFixture[str]
) -> None:
    f = fleet
    code, _ = _cli(capsys, "deploy", str(f.package("1.0.0")), "--to", "lab", "--wait", "--json")
    assert code == 0
    f.link.chunk, f.link.delay = 1024, 0.4  # ~2.5 KB/s: the transfer takes seconds
    f.link.ranges.clear()
    f.link.bytes_sent = 0
    job = f.api(
        "POST",
        "/api/deploy",
        {
            "package": str(f.package("2.0.0")),
            "targets": ["agent-0"],
            "timeout_s": OUTAGE_S + 45,
            "abort": [{"failure_type": "ALL", "threshold_percent": 1, "min_executed": 1}],
        },
    )
    jid = job["job_id"]
    size = job["document"]["size"]
    wait_until(lambda: f.link.bytes_sent >= 2048, timeout=30, what="download under way")
    f.ctl.kill()
    got = f.link.bytes_sent
    assert got < size, "the download finished before the outage; slow the link down"
    time.sleep(OUTAGE_S)
    f.link.delay = 0.0
    f.ctl.start()
    done = f.wait_job(jid)
    e = done["executions"][0]
    assert done["status"] == "COMPLETED", done
    assert e["state"] == "SUCCEEDED", (e, f.logs())
    assert e["execution_number"] == 1  # the same attempt, not a retry
    # the agent resumed from its .part: a Range request from where the link broke
    resumed = [r for r in f.link.ranges if r.startswith("bytes=") and not r.startswith("bytes=0-")]
    assert resumed, f.link.ranges
    assert f.assert_truth(capsys, "after the outage")["agent-0"] == "2.0.0"
