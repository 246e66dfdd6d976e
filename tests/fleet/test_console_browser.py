"""The fleet console in a real browser: Debian's Chromium driven by Playwright, against a real
controller, three real device agents (``python -m device_agent`` processes) on a real Mosquitto,
and a real cloud region (plus one that refuses every connection).

One fleet serves the whole module, in the order an operator would use it: look at the fleet,
roll out from the page, see a tampered package refused, read the routing, lose a device. Each
page is screenshotted at a laptop and a phone size into ``test-artifacts/console/`` (gitignored)
for a reviewer to look at.
"""

from __future__ import annotations

import os
import shutil
import signal
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from edgecloud.fleet.controller import FleetController
from edgecloud.fleet.packages import PackageStore
from edgecloud.fleet.server import FleetHTTPServer
from edgecloud.fleet.store import SqliteFleetStore
from tests.fixtures.agent_util import Keys, make_package, val_inputs, write_config
from tests.fixtures.broker import MosquittoBroker, free_port
from tests.fixtures.fleet_agents import AgentProc
from tests.fixtures.fleet_agents import tamper as tamper_package
from tests.fixtures.servers import make_repository, running_cloud_server
from tests.fixtures.wait import wait_until

pytestmark = [pytest.mark.mqtt, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts" / "console"
CHROMIUM = os.environ.get("EDGECLOUD_CHROMIUM", "/usr/bin/chromium")
TOKEN = "console-test-token"
KEEPALIVE_S = 5  # write_config's broker keepalive: Mosquitto sends the will after 1.5x
LAPTOP = {"width": 1366, "height": 900}
PHONE = {"width": 390, "height": 844}
N = 3


def _browser_args() -> list[str]:
    return [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
    ]


class Fleet:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.keys = Keys(tmp / "keys")
        self.agents: list[AgentProc] = []
        self.ctl: FleetController
        self.http: FleetHTTPServer

    def archive(self, version: str, *, tamper: bool = False) -> Path:
        """A signed package archive (``.tar.gz``), tampered after signing when asked."""
        out = make_package(self.tmp, self.keys, version)
        if not tamper:
            return out
        pkg = self.tmp / f"build-{version}" / "pkg"
        tamper_package(pkg)
        bad = self.tmp / f"tampered-{version}.tar.gz"
        with tarfile.open(bad, "w:gz") as tar:
            for p in sorted(pkg.iterdir()):
                tar.add(p, arcname=p.name)
        return bad

    def logs(self) -> str:
        return "\n".join(f"--- {a.device_id}\n{a.log.read_text()[-2000:]}" for a in self.agents)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("console")
    f = Fleet(tmp)
    repo = make_repository(tmp, {"digits_cloud": ROOT / "samples" / "models" / "digits_cloud.onnx"})
    dead_port = free_port()  # nothing listens there: the region that fails every request
    with (
        MosquittoBroker() as broker,
        running_cloud_server(repo, region="near", subprocess=False) as cloud,
    ):
        regions = (
            f'[[regions]]\nname = "gone"\nendpoint = "http://127.0.0.1:{dead_port}"\n'
            'model = "digits_cloud"\ncloud_input_shape = [1, 8, 8]\npriority = 0\ntimeout_s = 0.5\n'
            f'[[regions]]\nname = "near"\nendpoint = "{cloud.url}"\n'
            'model = "digits_cloud"\ncloud_input_shape = [1, 8, 8]\npriority = 1\n'
            "[policy]\nthreshold = 0.995\n"
            "[capture]\nenabled = true\nthreshold = 0.9\n"
        )
        f.ctl = FleetController(
            broker.url,
            SqliteFleetStore(tmp / "fleet.sqlite"),
            PackageStore(tmp / "packages"),
            tick_interval=0.05,
        )
        f.http = FleetHTTPServer(f.ctl, token=TOKEN).start()
        f.ctl.start()
        for i in range(N):
            a = AgentProc(tmp, broker, f.keys, i, interval=1.0)
            write_config(
                a.config,
                device=a.device_id,
                broker_url=broker.url,
                store=tmp / a.device_id / "store",
                public_key=f.keys.public,
                interval=1.0,
                endpoint_port=a.port,
                extra=regions,
            )
            f.agents.append(a.start())
        try:
            wait_until(
                lambda: sum(d.online for d in f.ctl.devices.values()) == N,
                timeout=60,
                what="three agents online",
            )
            # every agent starts on 1.0.0 (deployed through the API, as the CLI would)
            job = f.ctl.deploy(_pkg_dir(f, "1.0.0"), ["lab"])
            wait_until(lambda: f.ctl.job_done(job.job_id), timeout=90, what="1.0.0 on every agent")
            assert f.ctl.job_view(job.job_id)["counts"].get("SUCCEEDED") == N, f.logs()
            yield f
        except BaseException:
            print(f.logs())
            raise
        finally:
            for a in f.agents:
                a.stop()
            f.http.close()
            f.ctl.close()


def _pkg_dir(f: Fleet, version: str) -> Path:
    make_package(f.tmp, f.keys, version)
    return f.tmp / f"build-{version}" / "pkg"


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing; ./dev.sh test installs Debian's chromium")
    from playwright.sync_api import sync_playwright

    if ARTIFACTS.exists():
        shutil.rmtree(ARTIFACTS)
    ARTIFACTS.mkdir(parents=True)
    profile = tmp_path_factory.mktemp("chromium-profile")  # a fresh user data dir
    with sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(
            str(profile),
            executable_path=CHROMIUM,
            headless=True,
            args=_browser_args(),
            viewport=LAPTOP,
            timeout=60_000,
        )
        try:
            yield ctx
        finally:
            ctx.close()


@pytest.fixture
def page(browser: Any, fleet: Fleet) -> Iterator[Any]:
    pg = browser.new_page()
    pg.set_default_timeout(30_000)
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.on(
        "console",
        lambda m: errors.append(m.text) if m.type == "error" and "401" not in m.text else None,
    )
    outside: list[str] = []
    pg.on(
        "request",
        lambda r: outside.append(r.url) if not r.url.startswith(fleet.http.url) else None,
    )
    pg.goto(f"{fleet.http.url}/console/#token={TOKEN}")
    pg.wait_for_selector("#devices tbody tr[data-device]")
    yield pg
    pg.close()
    assert errors == [], errors
    assert outside == [], f"the console fetched from elsewhere: {outside}"


def shoot(pg: Any, name: str) -> None:
    """Laptop and phone screenshots of the current page (full length)."""
    pg.set_viewport_size(LAPTOP)
    pg.wait_for_timeout(150)
    pg.screenshot(path=str(ARTIFACTS / f"{name}-laptop.png"), full_page=True)
    pg.set_viewport_size(PHONE)
    pg.wait_for_timeout(150)
    pg.screenshot(path=str(ARTIFACTS / f"{name}-phone.png"), full_page=True)
    width = pg.evaluate("document.documentElement.scrollWidth")
    assert width <= PHONE["width"] + 1, f"{name}: the page is {width} px wide on a phone"
    pg.set_viewport_size(LAPTOP)


def endpoint_version(agent: AgentProc) -> str:
    """The version the agent's own V2 endpoint answers with (not what the controller says)."""
    x = val_inputs(1)
    body = {
        "inputs": [
            {"name": "input", "shape": [1, 64], "datatype": "FP32", "data": x.ravel().tolist()}
        ]
    }
    r = httpx.post(f"{agent.url}/v2/models/digits/infer", json=body, timeout=10)
    assert r.status_code == 200, r.text
    return str(r.json()["model_version"])


def traffic(fleet: Fleet, seconds: float) -> None:
    """Real requests through every agent's local endpoint (most offload at threshold 0.995)."""
    xs = val_inputs(64)
    stop = time.monotonic() + seconds

    def run(agent: AgentProc) -> None:
        with httpx.Client(base_url=agent.url, timeout=10) as c:
            i = 0
            while time.monotonic() < stop:
                x = xs[i % len(xs)]
                c.post(
                    "/v2/models/digits/infer",
                    json={
                        "inputs": [
                            {
                                "name": "input",
                                "shape": [1, 64],
                                "datatype": "FP32",
                                "data": x.tolist(),
                            }
                        ]
                    },
                )
                i += 1
                time.sleep(0.02)

    threads = [threading.Thread(target=run, args=(a,)) for a in fleet.agents[:2]]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 30)


def rows(pg: Any) -> dict[str, dict[str, str]]:
    out = {}
    for tr in pg.query_selector_all("#devices tbody tr[data-device]"):
        cells = [td.inner_text().strip() for td in tr.query_selector_all("td")]
        out[tr.get_attribute("data-device")] = {
            "version": cells[3],
            "status": tr.get_attribute("data-status"),
        }
    return out


def test_console_asks_for_the_token_and_refuses_a_wrong_one(browser: Any, fleet: Fleet) -> None:
    pg = browser.new_page()
    try:
        pg.goto(f"{fleet.http.url}/")  # redirected to /console/
        assert pg.url.startswith(f"{fleet.http.url}/console/")
        pg.wait_for_selector("#token")
        assert pg.query_selector("#devices") is None  # no data without the token
        pg.fill("#token", "wrong")
        pg.click("button[type=submit]")
        pg.wait_for_selector("text=the token was refused")
        shoot(pg, "sign-in")
        pg.fill("#token", TOKEN)
        pg.click("button[type=submit]")
        pg.wait_for_selector("#devices tbody tr[data-device]")
    finally:
        pg.close()
    # the static files carry no data; everything on the page came from /api/ with the token
    r = httpx.get(f"{fleet.http.url}/api/devices", timeout=5)
    assert r.status_code == 401
    page = httpx.get(f"{fleet.http.url}/console/", timeout=5)
    assert page.status_code == 200
    assert "default-src 'self'" in page.headers["content-security-policy"]


def test_fleet_page_lists_agents_with_the_versions_their_endpoints_report(
    page: Any, fleet: Fleet
) -> None:
    want = {a.device_id: endpoint_version(a) for a in fleet.agents}
    assert set(want.values()) == {"1.0.0"}
    wait_until(
        lambda: {k: v["version"] for k, v in rows(page).items()} == want,
        timeout=20,
        what=f"the page to show {want}",
    )
    assert all(r["status"] == "online" for r in rows(page).values())
    assert page.inner_text("#count-devices") == str(N)
    assert page.inner_text("#count-online") == str(N)
    chip = page.query_selector("[data-counts=version] [data-key='1.0.0'] b")
    assert chip is not None
    assert chip.inner_text() == str(N)
    # the variant each agent serves (from its telemetry) and the filter
    page.wait_for_selector("#devices tbody tr td:has-text('fp32')")
    page.fill("#fleet-filter", "agent-1")
    wait_until(lambda: list(rows(page)) == ["agent-1"], timeout=5, what="filter")
    page.fill("#fleet-filter", "")
    page.click("th[data-col=device_id]")  # sort descending by id
    wait_until(
        lambda: list(rows(page)) == [f"agent-{i}" for i in reversed(range(N))],
        timeout=5,
        what="sorted",
    )
    shoot(page, "fleet")


def test_rollout_started_from_the_page_completes_and_the_page_shows_it(
    page: Any, fleet: Fleet
) -> None:
    page.goto(f"{fleet.http.url}/console/#/rollouts")
    page.set_input_files("#upload-file", str(fleet.archive("2.0.0")))
    page.click("#upload-button")
    page.wait_for_selector("text=stored digits 2.0.0")
    page.wait_for_selector(
        "#deploy-package option[value^='digits'] >> text=digits 2.0.0", state="attached"
    )
    page.select_option("#deploy-package", label="digits 2.0.0")
    page.fill("#deploy-targets", "lab")
    page.fill("#deploy-form input[name=rate]", "60")
    page.click("#deploy-start")
    page.wait_for_selector("#confirm[open]")
    assert "Deploy digits 2.0.0 to lab?" in page.inner_text("#confirm-text")
    page.click("#confirm-yes")
    page.wait_for_selector("text=started job")
    job_id = page.inner_text(".msg.ok").split("started job ")[1].split(" ")[0]
    # the API saw the job the page started, as the CLI would have made it
    view = fleet.ctl.job_view(job_id)
    assert view["document"]["version"] == "2.0.0"
    assert view["rollout"]["max_per_minute"] == 60
    page.wait_for_selector(f"#jobs tr[data-job='{job_id}']")
    shoot(page, "rollouts-running")
    page.goto(f"{fleet.http.url}/console/#/job/{job_id}")
    page.wait_for_selector("#job-status >> text=COMPLETED", timeout=90_000)
    states = [
        tr.get_attribute("data-state") for tr in page.query_selector_all("#executions tbody tr")
    ]
    assert states == ["SUCCEEDED"] * N, (states, fleet.logs())
    shoot(page, "job-completed")
    assert {endpoint_version(a) for a in fleet.agents} == {"2.0.0"}
    page.goto(f"{fleet.http.url}/console/#/fleet")
    wait_until(
        lambda: {v["version"] for v in rows(page).values()} == {"2.0.0"},
        timeout=20,
        what="2.0.0 on the fleet page",
    )


def test_tampered_package_shows_rejected_with_the_reason(page: Any, fleet: Fleet) -> None:
    page.goto(f"{fleet.http.url}/console/#/rollouts")
    page.set_input_files("#upload-file", str(fleet.archive("3.0.0", tamper=True)))
    page.click("#upload-button")
    page.wait_for_selector("text=stored digits 3.0.0")
    page.select_option("#deploy-package", label="digits 3.0.0")
    page.fill("#deploy-targets", "lab")
    page.fill("#deploy-form input[name=abort_pct]", "50")
    page.select_option("#deploy-form select[name=abort_type]", "REJECTED")
    page.fill("#deploy-form input[name=abort_min]", "2")
    page.click("#deploy-start")
    page.click("#confirm-yes")
    page.wait_for_selector("text=started job")
    job_id = page.inner_text(".msg.ok").split("started job ")[1].split(" ")[0]
    page.goto(f"{fleet.http.url}/console/#/job/{job_id}")
    page.wait_for_selector("#executions tr[data-state=REJECTED]", timeout=60_000)
    page.wait_for_selector("#job-status >> text=CANCELED", timeout=60_000)
    # a selector wait, not wait_for_function: the console's CSP forbids evaluating strings
    page.locator("#executions tr[data-state=REJECTED]").nth(2).wait_for(timeout=60_000)
    assert page.locator("#executions tr[data-state=REJECTED]").count() == 3
    reasons = [
        tr.query_selector("td.reason").inner_text()
        for tr in page.query_selector_all("#executions tr[data-state=REJECTED]")
    ]
    assert all("sign" in r for r in reasons), reasons
    assert page.inner_text("#job-reason").startswith("aborted")
    assert "tripped" in page.inner_text("#abort-criteria")
    shoot(page, "job-rejected")
    # the device page lists the refusal among its recent jobs, with the reason
    page.goto(f"{fleet.http.url}/console/#/device/agent-0")
    page.wait_for_selector(f"#device-jobs tr[data-job='{job_id}'] >> text=REJECTED")
    assert "sign" in page.inner_text(f"#device-jobs tr[data-job='{job_id}'] td.reason")
    assert {endpoint_version(a) for a in fleet.agents} == {"2.0.0"}


def test_cancel_and_roll_back_from_the_page(page: Any, fleet: Fleet) -> None:
    page.goto(f"{fleet.http.url}/console/#/rollouts")
    page.select_option("#deploy-package", label="digits 1.0.0")  # stored by the first deploy
    page.fill("#deploy-targets", "lab")
    page.fill("#deploy-form input[name=rate]", "1")  # one device now, the next in a minute
    page.click("#deploy-start")
    page.click("#confirm-yes")
    page.wait_for_selector("text=started job")
    job_id = page.inner_text(".msg.ok").split("started job ")[1].split(" ")[0]
    wait_until(
        lambda: fleet.ctl.job_view(job_id)["counts"].get("SUCCEEDED") == 1,
        timeout=60,
        what="the first device updated",
    )
    page.click(f"button[data-cancel='{job_id}']")
    page.wait_for_selector("#confirm[open]")
    assert job_id in page.inner_text("#confirm-text")
    page.click("#confirm-no")  # changing one's mind changes nothing
    assert fleet.ctl.job_view(job_id)["status"] == "IN_PROGRESS"
    page.click(f"button[data-cancel='{job_id}']")
    page.click("#confirm-yes")
    page.wait_for_selector(f"#jobs tr[data-job='{job_id}'][data-status=CANCELED]")
    view = fleet.ctl.job_view(job_id)
    nonzero = {k: v for k, v in view["counts"].items() if v}
    assert nonzero == {"SUCCEEDED": 1, "CANCELED": N - 1}, view["counts"]
    (moved,) = [e["device_id"] for e in view["executions"] if e["state"] == "SUCCEEDED"]
    assert endpoint_version(next(a for a in fleet.agents if a.device_id == moved)) == "1.0.0"

    page.goto(f"{fleet.http.url}/console/#/job/{job_id}")
    page.click("#job-rollback")
    assert moved in page.inner_text("#confirm-text")
    page.click("#confirm-yes")
    page.wait_for_selector("text=started rollback job")
    rb = page.inner_text(".msg.ok").split("started rollback job ")[1].split(" ")[0]
    wait_until(lambda: fleet.ctl.job_done(rb), timeout=60, what="the rollback")
    assert {k: v for k, v in fleet.ctl.job_view(rb)["counts"].items() if v} == {"SUCCEEDED": 1}
    assert {endpoint_version(a) for a in fleet.agents} == {"2.0.0"}


def test_device_and_routing_pages_plot_live_telemetry(page: Any, fleet: Fleet) -> None:
    r = httpx.post(
        f"{fleet.http.url}/api/policy",
        json={"targets": ["agent-0"], "policy": {"mode": "edge_first", "threshold": 0.995}},
        headers={"Authorization": f"Bearer {TOKEN}"},
        timeout=10,
    )
    assert r.status_code == 200, r.text
    traffic(fleet, 6.0)
    afters: list[int] = []
    page.on(
        "request",
        lambda r: (
            afters.append(int(r.url.split("after=")[1])) if "/telemetry?after=" in r.url else None
        ),
    )
    page.goto(f"{fleet.http.url}/console/#/device/agent-0")
    page.wait_for_selector("#device-id >> text=agent-0")
    for plot in ("rate", "latency", "offload", "degraded", "hard"):
        page.wait_for_selector(f"[data-plot={plot}] svg path", timeout=20_000, state="attached")
    page.wait_for_selector("[data-plot=confidence] svg rect", state="attached")
    page.wait_for_timeout(2_500)
    # after the first load only records it has not got yet are fetched
    assert len(afters) >= 2, afters
    assert afters == sorted(afters)
    assert afters[-1] > afters[0]
    assert "captured on the device" in page.inner_text("#device-hard")
    desired = page.inner_text(".grid3 .panel:nth-child(1) pre")
    assert "0.995" in desired, desired
    page.wait_for_selector(".grid3 .panel:nth-child(2) pre >> text=2.0.0")  # reported model
    shoot(page, "device")
    page.goto(f"{fleet.http.url}/console/#/routing")
    gone = page.wait_for_selector("[data-region=gone][data-failing=true]", timeout=20_000)
    assert "failing" in (gone.get_attribute("class") or "")
    near = page.wait_for_selector("[data-region=near]")
    assert near.get_attribute("data-failing") == "false"
    offload = page.inner_text("[data-group=lab] [data-figure=offload]")
    assert offload.endswith("%"), offload
    assert float(offload.split()[0]) > 10, offload
    page.wait_for_selector("[data-group=lab] [data-plot^=cloud-latency] svg path", state="attached")
    shoot(page, "routing")


def test_polling_is_bounded_pauses_when_hidden_and_backs_off(browser: Any, fleet: Fleet) -> None:
    pg = browser.new_page()
    health: list[float] = []
    pg.on("request", lambda r: health.append(time.monotonic()) if "/api/health" in r.url else None)
    try:
        pg.goto(f"{fleet.http.url}/console/#token={TOKEN}")
        pg.wait_for_selector("#devices tbody tr[data-device]")
        pg.wait_for_timeout(6_000)
        recent = [t for t in health if t > time.monotonic() - 6.0]
        assert 2 <= len(recent) <= 4, recent  # one refresh every 2 s
        # a hidden tab does not poll
        pg.evaluate(
            "Object.defineProperty(document, 'hidden', {configurable: true, get: () => true});"
            "document.dispatchEvent(new Event('visibilitychange'))"
        )
        pg.wait_for_timeout(2_500)
        hidden_at = time.monotonic()
        pg.wait_for_timeout(5_000)
        assert [t for t in health if t > hidden_at] == []
        pg.evaluate(
            "Object.defineProperty(document, 'hidden', {configurable: true, get: () => false});"
            "document.dispatchEvent(new Event('visibilitychange'))"
        )
        pg.wait_for_timeout(1_000)
        assert [t for t in health if t > hidden_at], "polling did not resume"
        # an unreachable controller: the page says so and backs off (4 s, 8 s, ...)
        pg.route("**/api/**", lambda route: route.abort())
        cut = time.monotonic()
        pg.wait_for_selector("text=controller unreachable", timeout=10_000)
        pg.wait_for_timeout(10_000)
        tries = [t for t in health if t > cut]
        assert 2 <= len(tries) <= 4, [round(t - cut, 1) for t in tries]
        assert tries[-1] - tries[-2] >= 3.5
        pg.unroute("**/api/**")
    finally:
        pg.close()


def test_killed_agent_turns_offline_on_the_page_within_its_keepalive(
    page: Any, fleet: Fleet
) -> None:
    victim = fleet.agents[2]
    assert rows(page)[victim.device_id]["status"] == "online"
    assert victim.proc is not None
    victim.proc.send_signal(signal.SIGKILL)  # no goodbye: only the broker's will tells
    killed = time.monotonic()
    page.wait_for_selector(
        f"#devices tr[data-device={victim.device_id}][data-status=offline]", timeout=30_000
    )
    took = time.monotonic() - killed
    # Mosquitto gives up on a silent client after 1.5 keepalives; plus one poll of the page
    assert took <= 1.5 * KEEPALIVE_S + 2 * 2.0 + 1.0, took
    assert page.inner_text("#count-offline") == "1"
    assert rows(page)["agent-0"]["status"] == "online"
    shoot(page, "fleet-offline")
