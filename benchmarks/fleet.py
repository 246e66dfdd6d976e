"""A rollout to 1,000 simulated agents: time until every execution SUCCEEDED, and peak memory.

``python -m benchmarks.fleet [--quick] [--agents N] [--head] [--budget S]``

One Mosquitto and 1,000 lightweight agents in this process, all driven by one ``SelectorLoop``
(epoll): paho's own threaded loop uses ``select()`` and stops at about 340 clients (FD 1024).
Each agent does what the real one does on the wire: last will, retained online status,
subscribes to its job notifications, answers a deploy with IN_PROGRESS then SUCCEEDED (seq'd);
the download is skipped (``--head`` sends a HEAD to the package URL instead). The controller is
``edgecloud fleet serve`` in its own process, so its memory is its own.

Baseline, measured in the same run against the same agents: a raw paho client that publishes the
same notifications itself and waits for the same SUCCEEDED updates, with no registry, store or
job engine: the MQTT floor. Printed: time to all SUCCEEDED (goal <= 15 s for 1,000), the ratio
to the floor, and the peak RSS (VmHWM) of the broker and the controller.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _peak_rss_mb(pid: int) -> tuple[float, float]:
    """(current RSS, peak RSS) in MiB from /proc (VmRSS, VmHWM)."""
    cur = peak = 0.0
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                cur = int(line.split()[1]) / 1024
            elif line.startswith("VmHWM:"):
                peak = int(line.split()[1]) / 1024
    return cur, peak


class SimAgents:
    """N agents on one SelectorLoop. ``succeeded`` counts SUCCEEDED updates they published."""

    def __init__(self, url: str, n: int, *, head: bool = False) -> None:
        from edgecloud.mqtt import SelectorLoop, parse_broker_url
        from edgecloud.topics import Topics

        self.topics = Topics()
        self.n = n
        self.head = head
        self.settings = parse_broker_url(url, keepalive=120, connect_timeout=30)
        self.loop = SelectorLoop("sim-agents", connect_workers=8)
        self.conns: list[Any] = []
        self.connected = 0
        self.seq: dict[str, int] = {}
        self.succeeded = 0
        self.heads = 0
        self._lock = threading.Lock()
        self._http: Any = None
        self._pool: Any = None
        if head:
            from concurrent.futures import ThreadPoolExecutor

            import httpx

            # one shared client: building one per request costs an SSL context each (~20 ms)
            self._http = httpx.Client(timeout=30, limits=httpx.Limits(max_connections=8))
            self._pool = ThreadPoolExecutor(8)

    def start(self) -> None:
        from edgecloud.fleet.messages import StatusMessage, dumps
        from edgecloud.mqtt import MqttConnection

        for i in range(self.n):
            dev = f"sim-{i:04d}"
            offline = dumps(StatusMessage(dev, False, time.time(), group="bench"))
            conn = MqttConnection(
                self.settings,
                client_id=dev,
                on_message=lambda msg, dev=dev: self._on_job(dev, msg),
                on_state=lambda up, err, dev=dev: self._on_state(dev, up),
                subscriptions=[(self.topics.jobs_notify(dev), 1)],
                will=(self.topics.status(dev), offline, 1, True),
                loop=self.loop,
            )
            self.conns.append(conn)
            conn.start(wait=False)

    def _conn(self, dev: str) -> Any:
        return self.conns[int(dev.split("-")[1])]

    def _on_state(self, dev: str, up: bool) -> None:
        from edgecloud.fleet.messages import StatusMessage, dumps

        if not up:
            return
        with self._lock:
            self.connected += 1
        msg = StatusMessage(dev, True, time.time(), group="bench", model_version="1.0.0")
        self._conn(dev).publish(self.topics.status(dev), dumps(msg), qos=1, retain=True)

    def _on_job(self, dev: str, msg: Any) -> None:
        from edgecloud.fleet.messages import JobNotification

        note = JobNotification.parse(bytes(msg.payload))
        self._update(dev, note.job_id, "IN_PROGRESS")
        url = note.document.get("package_url")
        if self.head and url:
            self._pool.submit(self._head_then_succeed, dev, note.job_id, url)
        else:
            self._update(dev, note.job_id, "SUCCEEDED")

    def _head_then_succeed(self, dev: str, job_id: str, url: str) -> None:
        r = self._http.head(url)
        with self._lock:
            self.heads += r.status_code == 200
        self._update(dev, job_id, "SUCCEEDED" if r.status_code == 200 else "FAILED")

    def _update(self, dev: str, job_id: str, status: str) -> None:
        from edgecloud.fleet.messages import ExecutionState, ExecutionUpdate, dumps

        with self._lock:
            seq = self.seq[dev] = self.seq.get(dev, 0) + 1
            if status == "SUCCEEDED":
                self.succeeded += 1
        u = ExecutionUpdate(job_id, dev, ExecutionState(status), seq, time.time())
        self._conn(dev).publish(self.topics.job_update(dev, job_id), dumps(u), qos=1)

    def close(self) -> None:
        for c in self.conns:
            with contextlib.suppress(Exception):
                c.close()
        time.sleep(0.5)
        self.loop.stop()
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._http.close()


def raw_floor(url_host: str, port: int, agents: SimAgents, timeout: float) -> float:
    """Publish one notification per agent from a raw paho client; time to all SUCCEEDED."""
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    from edgecloud.fleet.messages import JobNotification, dumps

    topics = agents.topics
    done = threading.Event()
    got: set[str] = set()
    job_id = "raw-floor"

    def on_message(c: Any, u: Any, msg: Any) -> None:
        if b'"SUCCEEDED"' in msg.payload and f"/jobs/{job_id}/" in msg.topic:
            got.add(msg.topic)
            if len(got) >= agents.n:
                done.set()

    ready = threading.Event()
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id="raw-floor", protocol=paho.MQTTv5)
    c.max_inflight_messages_set(1000)
    c.on_message = on_message
    c.on_subscribe = lambda *a: ready.set()
    c.connect(url_host, port)
    c.loop_start()
    c.subscribe(topics.all_job_updates(), qos=1)
    ready.wait(10)
    t0 = time.monotonic()
    for i in range(agents.n):
        dev = f"sim-{i:04d}"
        note = JobNotification(job_id, "deploy", {"model": "digits", "version": "0"})
        c.publish(topics.jobs_notify(dev), dumps(note), qos=1)
    ok = done.wait(timeout)
    took = time.monotonic() - t0
    c.disconnect()
    c.loop_stop()
    if not ok:
        raise RuntimeError(f"raw floor: only {len(got)}/{agents.n} SUCCEEDED in {timeout}s")
    return took


def _package(tmp: Path) -> Path:
    from edgecloud.package import (
        Manifest,
        TensorSpec,
        Variant,
        generate_keypair,
        load_private_key,
        write_package,
    )

    priv, _ = generate_keypair(tmp / "keys" / "fleet")
    m = Manifest(
        name="digits",
        version="2.0.0",
        inputs=(TensorSpec("input", "float32", ("batch", 64)),),
        outputs=(TensorSpec("logits", "float32", ("batch", 10)),),
        variants=(Variant("fp32", "model.onnx", "onnx", "fp32", "cpu", 0, ""),),
    )
    out = tmp / "pkg"
    model = ROOT / "samples" / "models" / "digits_edge.onnx"
    write_package(out, m, {"model.onnx": model}, signing_key=load_private_key(priv))
    return out


def run(n: int, head: bool, budget: float) -> dict[str, Any]:
    from edgecloud.fleet.client import ControllerClient
    from tests.fixtures.broker import MosquittoBroker, free_port

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, 4 * n + 1024))
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    tmp = Path(tempfile.mkdtemp(prefix="edgecloud-bench-fleet-"))
    out: dict[str, Any] = {"agents": n}
    with MosquittoBroker(extra_config=["max_keepalive 300"]) as broker:
        assert broker.proc is not None
        agents = SimAgents(broker.url, n, head=head)
        ctl_proc: subprocess.Popen[bytes] | None = None
        try:
            t0 = time.monotonic()
            agents.start()
            deadline = time.monotonic() + budget
            while agents.connected < n and time.monotonic() < deadline:
                time.sleep(0.05)
            if agents.connected < n:
                raise RuntimeError(f"only {agents.connected}/{n} agents connected")
            out["connect_s"] = time.monotonic() - t0
            out["floor_s"] = raw_floor(broker.host, broker.port, agents, budget)

            port = free_port()
            ctl_proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "edgecloud",
                    "fleet",
                    "serve",
                    "--broker",
                    broker.url,
                    "--db",
                    str(tmp / "fleet.sqlite"),
                    "--packages",
                    str(tmp / "packages"),
                    "--http-port",
                    str(port),
                ],
                cwd=ROOT,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
                stdout=subprocess.DEVNULL,
                stderr=open(tmp / "controller.log", "wb"),
            )
            client = ControllerClient(f"http://127.0.0.1:{port}", timeout=30)
            t1 = time.monotonic()
            while time.monotonic() < deadline:
                with contextlib.suppress(Exception):
                    devs = client.devices()
                    if sum(d["online"] for d in devs) >= n:
                        break
                time.sleep(0.1)
            else:
                raise RuntimeError("the controller did not see every agent online")
            out["registry_s"] = time.monotonic() - t1
            pkg = _package(tmp)
            before = agents.succeeded
            t2 = time.monotonic()
            job = client.deploy(pkg, ["bench"], timeout_s=120)
            while time.monotonic() < deadline:
                view = client.job(job["job_id"])
                if view["status"] != "IN_PROGRESS":
                    break
                time.sleep(0.05)
            out["deploy_s"] = time.monotonic() - t2
            out["succeeded"] = view["counts"]["SUCCEEDED"]
            out["status"] = view["status"]
            out["agent_succeeded_msgs"] = agents.succeeded - before
            out["heads"] = agents.heads
            out["broker_rss_mb"], out["broker_peak_mb"] = _peak_rss_mb(broker.proc.pid)
            out["ctl_rss_mb"], out["ctl_peak_mb"] = _peak_rss_mb(ctl_proc.pid)
            client.close()
        finally:
            if ctl_proc is not None:
                ctl_proc.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    ctl_proc.wait(10)
            agents.close()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.fleet", description=__doc__)
    p.add_argument("--quick", action="store_true", help="100 agents")
    p.add_argument("--agents", type=int, help="number of simulated agents (default 1000)")
    p.add_argument("--head", action="store_true", help="agents HEAD the package URL")
    p.add_argument("--budget", type=float, default=180.0, help="give up after this many s")
    args = p.parse_args(argv)
    n = args.agents or (100 if args.quick else 1000)
    r = run(n, args.head, args.budget)
    goal = 15.0 * n / 1000
    print(f"fleet rollout to {n} simulated agents (one SelectorLoop, one Mosquitto)")
    print(f"  agents connected              {r['connect_s']:7.2f} s")
    print(f"  registry saw all online       {r['registry_s']:7.2f} s")
    print(f"  raw MQTT floor (no controller) {r['floor_s']:6.2f} s")
    print(
        f"  deploy -> all SUCCEEDED       {r['deploy_s']:7.2f} s   "
        f"({r['succeeded']}/{n} SUCCEEDED, job {r['status']}; goal <= {goal:.1f} s)"
    )
    print(f"  ratio to the raw floor        {r['deploy_s'] / max(r['floor_s'], 1e-9):7.1f}x")
    if args.head:
        print(f"  HEAD requests answered        {r['heads']:7d}")
    for who, key in (("broker", "broker"), ("controller", "ctl")):
        now, peak = r[f"{key}_rss_mb"], r[f"{key}_peak_mb"]
        print(f"  {who + ' RSS now / peak':30s}{now:7.1f} / {peak:.1f} MiB")
    ok = r["succeeded"] == n and r["status"] == "COMPLETED"
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
