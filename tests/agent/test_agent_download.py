"""Package downloads over real HTTP: resumed with Range after an interruption; a hung download
is abandoned by the watchdog and does not block the next job."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from device_agent.store import download
from edgecloud.errors import StoreError
from tests.agent.test_agent_util import (
    Keys,
    Observer,
    make_package,
    send_job,
    start_agent,
    write_config,
)
from tests.fixtures.broker import MosquittoBroker

pytestmark = pytest.mark.mqtt


class PackageServer:
    """Serves files with Range support; can cut the first response short or hang forever."""

    def __init__(
        self, files: dict[str, bytes], *, cut_first: bool = False, stall_first: bool = False
    ) -> None:
        self.files = files
        self.cut_first = cut_first
        self.stall_first = stall_first
        self.requests: list[tuple[str, str | None]] = []
        self.bytes_sent = 0
        self.release = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a: Any) -> None:
                pass

            def do_GET(self) -> None:
                rng = self.headers.get("Range")
                outer.requests.append((self.path, rng))
                if self.path == "/hang":
                    self.send_response(200)
                    self.send_header("Content-Length", "1000000")
                    self.end_headers()
                    outer.release.wait(30)
                    return
                data = outer.files.get(self.path.lstrip("/"))
                if data is None:
                    self.send_error(404)
                    return
                start = 0
                if rng:
                    m = re.fullmatch(r"bytes=(\d+)-", rng)
                    assert m is not None
                    start = int(m.group(1))
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if (outer.cut_first or outer.stall_first) and len(outer.requests) == 1:
                    half = body[: len(body) // 2]
                    self.wfile.write(half)
                    self.wfile.flush()
                    outer.bytes_sent += len(half)
                    if outer.stall_first:
                        outer.release.wait(60)
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                self.wfile.write(body)
                outer.bytes_sent += len(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    return Keys(tmp_path)


@pytest.fixture
def observer(mosquitto: MosquittoBroker) -> Iterator[Observer]:
    obs = Observer(mosquitto.host, mosquitto.port)
    yield obs
    obs.close()


def test_interrupted_download_resumes_with_range(
    tmp_path: Path, keys: Keys, mosquitto: MosquittoBroker, observer: Observer
) -> None:
    archive = make_package(tmp_path, keys, "1.0.0")
    data = archive.read_bytes()
    server = PackageServer({"pkg.tar.gz": data}, cut_first=True)
    cfg = write_config(
        tmp_path / "agent.toml",
        device="dev-dl",
        broker_url=mosquitto.url,
        store=tmp_path / "store",
        public_key=keys.public,
    )
    agent = start_agent(cfg)
    try:
        send_job(observer, "dev-dl", "dl-1", "deploy", package_url=server.url("pkg.tar.gz"))
        done = observer.wait_job("dl-1")
        assert done["status"] == "SUCCEEDED", done["reason"]
        assert agent.active_version == "1.0.0"
    finally:
        agent.stop()
        server.close()
    assert len(server.requests) == 2
    assert server.requests[0][1] is None
    resumed = server.requests[1][1]
    assert resumed is not None
    offset = int(resumed.removeprefix("bytes=").rstrip("-"))
    assert 0 < offset < len(data)
    assert server.bytes_sent == len(data)  # nothing fetched twice


def test_download_refuses_other_schemes_and_missing_files(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="expected http"):
        download("ftp://x/y", tmp_path / "a", check_space=lambda n: None)
    with pytest.raises(StoreError, match="does not exist"):
        download((tmp_path / "nope.tar.gz").as_uri(), tmp_path / "b", check_space=lambda n: None)
    server = PackageServer({})
    try:
        with pytest.raises(StoreError, match="HTTP 404"):
            download(server.url("missing"), tmp_path / "c", check_space=lambda n: None)
    finally:
        server.close()


def test_hung_download_is_abandoned_and_next_job_runs(
    tmp_path: Path, keys: Keys, mosquitto: MosquittoBroker, observer: Observer
) -> None:
    server = PackageServer({})
    cfg = write_config(
        tmp_path / "agent.toml",
        device="dev-wd",
        broker_url=mosquitto.url,
        store=tmp_path / "store",
        public_key=keys.public,
        step_timeout_s=1.5,
    )
    agent = start_agent(cfg)
    try:
        send_job(observer, "dev-wd", "hang", "deploy", package_url=server.url("hang"))
        done = observer.wait_job("hang")
        assert done["status"] == "FAILED"
        assert "download" in done["reason"]
        assert "1.5s" in done["reason"]
        ok = make_package(tmp_path, keys, "1.0.0")
        send_job(observer, "dev-wd", "after", "deploy", package_url=ok.as_uri())
        assert observer.wait_job("after")["status"] == "SUCCEEDED"
        assert agent.active_version == "1.0.0"
    finally:
        server.close()
        agent.stop()
