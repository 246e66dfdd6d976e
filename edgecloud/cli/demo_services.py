"""The demo's processes: Mosquitto and two cloud regions on free loopback ports.

They are started, waited for (port open, region ready) and stopped here.

Every process logs to a file under the demo's output directory, and every one is stopped (then
killed after a grace period) when the demo ends, however it ends.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgecloud.errors import EdgeCloudError

_ROOT = Path(__file__).resolve().parents[2]
SAMPLES = _ROOT / "samples"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _mosquitto() -> str | None:
    found = shutil.which("mosquitto")
    if found:
        return found
    for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"):
        if os.path.exists(p):
            return p
    return None


@dataclass
class _Proc:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


@dataclass
class _Procs:
    items: list[_Proc] = field(default_factory=list)

    def start(self, name: str, cmd: Sequence[str], logdir: Path) -> _Proc:
        log = logdir / f"{name}.log"
        with open(log, "wb") as f:
            proc = subprocess.Popen(
                list(cmd), stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        p = _Proc(name, proc, log)
        self.items.append(p)
        return p

    def stop_all(self) -> None:
        for p in reversed(self.items):
            p.stop()


def _wait_port(p: _Proc, port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if p.proc.poll() is not None:
            raise EdgeCloudError(
                f"{p.name} exited with {p.proc.returncode}; its log:\n{p.log.read_text()[-3000:]}"
            )
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.1)
    raise EdgeCloudError(f"{p.name} did not listen on port {port} within {timeout:.0f} s")


def _wait_ready(p: _Proc, url: str, timeout: float = 60.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if p.proc.poll() is not None:
            raise EdgeCloudError(
                f"{p.name} exited with {p.proc.returncode}; its log:\n{p.log.read_text()[-3000:]}"
            )
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/v2/health/ready", timeout=1.0).status_code == 200:
                return
        time.sleep(0.1)
    raise EdgeCloudError(f"{p.name} at {url} was not ready within {timeout:.0f} s")


@contextlib.contextmanager
def _services(out: Path, use_mqtt: bool, far_latency_ms: float) -> Iterator[dict[str, Any]]:
    procs = _Procs()
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    repo = out / "repository" / "digits_cloud" / "1"
    repo.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(SAMPLES / "models" / "digits_cloud.onnx", repo / "model.onnx")
    info: dict[str, Any] = {"procs": {}, "mqtt": None}
    try:
        broker_url = None
        if use_mqtt:
            port = _free_port()
            conf = out / "mosquitto.conf"
            conf.write_text(
                f"listener {port} 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\n"
                "persistence false\nlog_dest stderr\nlog_type error\nlog_type warning\n"
            )
            binary = _mosquitto()
            assert binary is not None
            b = procs.start("mosquitto", [binary, "-c", str(conf)], logs)
            _wait_port(b, port)
            broker_url = f"mqtt://127.0.0.1:{port}"
            info["mqtt"] = broker_url
        py = sys.executable
        for region, latency in (("near", 0.0), ("far", far_latency_ms)):
            port = _free_port()
            cmd = [
                py,
                "-m",
                "edgecloud",
                "cloud",
                "serve",
                "--repository",
                str(out / "repository"),
                "--port",
                str(port),
                "--region",
                region,
                "--latency-ms",
                str(latency),
                "--threads",
                "1",
            ]
            if broker_url and region == "near":
                cmd += ["--mqtt", broker_url, "--mqtt-workers", "1"]
            p = procs.start(f"region-{region}", cmd, logs)
            url = f"http://127.0.0.1:{port}"
            _wait_ready(p, url)
            info["procs"][region] = (p, url)
        yield info
    finally:
        procs.stop_all()
