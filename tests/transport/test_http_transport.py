"""HttpTransport against real servers on loopback: answers, binary switch, and error mapping."""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import inspect
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from edgecloud.errors import (
    AuthError,
    ConfigError,
    ConnectionFailed,
    ProtocolError,
    RemoteError,
    TransportError,
    TransportTimeout,
)
from edgecloud.transport import http_common as http_mod
from edgecloud.transport.http import AsyncHttpTransport, HttpTransport, translate_httpx_error
from edgecloud.transport.v2 import HEADER_LENGTH, InferRequest
from tests.fixtures.servers import InProcessServer, make_repository, running_cloud_server

MODEL = "digits_cloud"


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, samples_dir: Path) -> Path:
    return make_repository(
        tmp_path_factory.mktemp("http"), {MODEL: samples_dir / "models" / "digits_cloud.onnx"}
    )


@pytest.fixture(scope="module")
def x(samples_dir: Path) -> np.ndarray:
    return np.load(samples_dir / "data" / "cloud_val.npz")["input"]


@pytest.fixture(scope="module")
def server(repo: Path) -> Iterator[InProcessServer]:
    with running_cloud_server(repo, region="r1", subprocess=False, token="tok") as srv:
        assert isinstance(srv, InProcessServer)
        yield srv


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_infer_json_and_binary_agree(server: InProcessServer, x: np.ndarray) -> None:
    seen: list[httpx.Request] = []
    with HttpTransport(server.url, region="r1", token="tok", binary_threshold=1024) as t:
        t._client.event_hooks["request"] = [seen.append]
        small = t.infer(InferRequest(MODEL, {"input": x[:1]}, id="a"), timeout=5)  # 256 B: JSON
        big = t.infer(InferRequest(MODEL, {"input": x[:8]}), timeout=5)  # 2 KiB: binary
        pinned = t.infer(InferRequest(MODEL, {"input": x[:1]}, version="1"), timeout=5)
        t.infer(InferRequest(MODEL, {"input": x[:8]}), timeout=5)
    # The server metadata is read once, when binary is first wanted, and says binary is there.
    assert [r.url.path for r in seen if r.method == "GET"] == ["/v2"]
    assert t.features["extensions"] == ["binary_tensor_data"]
    assert t.features["binary"] is True
    seen = [r for r in seen if r.method == "POST"]
    assert seen[0].headers["content-type"] == "application/json"
    assert HEADER_LENGTH not in seen[0].headers
    assert seen[1].headers["content-type"] == "application/octet-stream"
    assert int(seen[1].headers[HEADER_LENGTH]) < len(seen[1].content)
    assert seen[2].url.path == f"/v2/models/{MODEL}/versions/1/infer"
    assert small.id == "a"
    assert small.version == "1"
    np.testing.assert_allclose(small.outputs["logits"], big.outputs["logits"][:1], rtol=1e-5)
    np.testing.assert_allclose(pinned.outputs["logits"], small.outputs["logits"], rtol=1e-5)
    assert big.outputs["logits"].shape == (8, 10)


def test_ready_and_metadata(server: InProcessServer) -> None:
    with HttpTransport(server.url, region="r1", token="tok") as t:
        assert t.ready(timeout=2) is True
        assert t.metadata(MODEL)["inputs"][0]["shape"] == [-1, 1, 8, 8]
        with pytest.raises(RemoteError, match="'nope' is not in this repository") as ei:
            t.metadata("nope")
        assert ei.value.status == 404


def test_remote_errors_carry_status_message_and_region(
    server: InProcessServer, x: np.ndarray
) -> None:
    with HttpTransport(server.url, region="r1", token="tok") as t:
        with pytest.raises(RemoteError, match="HTTP 404: model 'nope'") as ei:
            t.infer(InferRequest("nope", {"input": x[:1]}), timeout=5)
        assert (ei.value.status, ei.value.region) == (404, "r1")
        with pytest.raises(RemoteError, match="input 'input': expected datatype FP32") as ei:
            t.infer(InferRequest(MODEL, {"input": x[:1].astype(np.float64)}), timeout=5)
        assert ei.value.status == 400
    with HttpTransport(server.url, region="r1") as t:
        with pytest.raises(AuthError, match="HTTP 401") as ai:
            t.infer(InferRequest(MODEL, {"input": x[:1]}), timeout=5)
        assert (ai.value.status, ai.value.region) == (401, "r1")
        assert t.ready(timeout=10) is True, t.ready_detail  # health stays open without a token
    with HttpTransport(server.url, region="r1", token="bad") as t:
        with pytest.raises(AuthError):
            t.infer(InferRequest(MODEL, {"input": x[:1]}), timeout=5)


def test_server_down_is_connection_failed(x: np.ndarray) -> None:
    url = f"http://127.0.0.1:{_free_port()}"
    with HttpTransport(url, region="gone") as t:
        with pytest.raises(ConnectionFailed) as ei:
            t.infer(InferRequest(MODEL, {"input": x[:1]}), timeout=2)
        assert ei.value.region == "gone"
        assert isinstance(ei.value.__cause__, httpx.ConnectError)
        assert t.ready(timeout=1) is False


def test_killed_server_is_connection_failed_then_recovers(repo: Path, x: np.ndarray) -> None:
    with running_cloud_server(repo, region="k") as srv, HttpTransport(srv.url, region="k") as t:
        assert t.infer(InferRequest(MODEL, {"input": x[:1]}), timeout=5).outputs
        srv.kill()  # type: ignore[union-attr]
        with pytest.raises(ConnectionFailed):
            t.infer(InferRequest(MODEL, {"input": x[:1]}), timeout=5)
        srv.start()  # type: ignore[union-attr]
        assert t.infer(InferRequest(MODEL, {"input": x[:1]}), timeout=5).outputs


def test_slow_region_times_out_within_the_deadline(repo: Path, x: np.ndarray) -> None:
    with (
        running_cloud_server(repo, region="far", latency_ms=400) as srv,  # --latency-ms 400
        HttpTransport(srv.url, region="far") as t,
    ):
        t0 = time.monotonic()
        with pytest.raises(TransportTimeout) as ei:
            t.infer(InferRequest(MODEL, {"input": x[:1]}), timeout=0.1)
        assert time.monotonic() - t0 < 0.35
        assert ei.value.region == "far"
        assert t.infer(InferRequest(MODEL, {"input": x[:1]}), timeout=5).outputs
        with pytest.raises(TransportTimeout, match="already passed"):
            t.infer(InferRequest(MODEL, {"input": x[:1]}), timeout=0)


class _Garbage(http.server.BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        body = b"<html>proxy says hi</html>"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_non_v2_body_is_protocol_error(x: np.ndarray) -> None:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Garbage)
    th = threading.Thread(target=httpd.serve_forever, daemon=True)
    th.start()
    try:
        with HttpTransport(f"http://127.0.0.1:{httpd.server_port}", region="odd") as t:
            with pytest.raises(ProtocolError, match="region 'odd': body is not valid JSON") as ei:
                t.infer(InferRequest(MODEL, {"input": x[:1]}), timeout=5)
            assert ei.value.region == "odd"
    finally:
        httpd.shutdown()
        httpd.server_close()
        th.join()


def test_async_transport(server: InProcessServer, x: np.ndarray) -> None:
    async def main() -> tuple[int, bool]:
        async with AsyncHttpTransport(server.url, region="r1", token="tok") as t:
            rs = await asyncio.gather(
                *(
                    t.ainfer(InferRequest(MODEL, {"input": x[i : i + 1]}), timeout=5)
                    for i in range(8)
                )
            )
            return len(rs), await t.aready(timeout=2)

    assert asyncio.run(main()) == (8, True)


def test_bad_configuration_is_named() -> None:
    with pytest.raises(ConfigError, match="must start with http"):
        HttpTransport("localhost:8000", region="r")
    with pytest.raises(ConfigError, match="binary_threshold"):
        HttpTransport("http://localhost:8000", region="r", binary_threshold=-1)


def _httpx_error_classes() -> list[type[Exception]]:
    return sorted(
        (
            obj
            for obj in vars(httpx).values()
            if inspect.isclass(obj)
            and issubclass(obj, Exception)
            and obj.__module__.startswith("httpx")
        ),
        key=lambda c: c.__name__,
    )


def test_every_httpx_error_is_mapped() -> None:
    """Guard: each httpx exception class has an explicit entry, and translates with the region."""
    classes = _httpx_error_classes()
    assert httpx.ConnectError in classes
    assert httpx.ReadTimeout in classes
    mapped = [foreign for foreign, _ in http_mod._HTTPX_MAP]
    for cls in classes:
        assert any(issubclass(cls, m) for m in mapped), f"httpx.{cls.__name__} is not mapped"
        if cls is httpx.HTTPStatusError:
            # raise_for_status() is never called: statuses are mapped from the response instead.
            continue
        exc = cls.__new__(cls)
        Exception.__init__(exc, "boom")
        with pytest.raises(TransportError) as ei, http_mod._translate("r9"):
            raise exc
        assert ei.value.region == "r9"
        assert ei.value.__cause__ is exc


@pytest.mark.parametrize(
    ("foreign", "ours"),
    [
        (httpx.ConnectTimeout, TransportTimeout),
        (httpx.ReadTimeout, TransportTimeout),
        (httpx.PoolTimeout, TransportTimeout),
        (httpx.ConnectError, ConnectionFailed),
        (httpx.ReadError, ConnectionFailed),
        (httpx.RemoteProtocolError, ConnectionFailed),
        (httpx.LocalProtocolError, ProtocolError),
        (httpx.DecodingError, ProtocolError),
    ],
)
def test_error_mapping_table(foreign: type[Exception], ours: type[TransportError]) -> None:
    err = translate_httpx_error(foreign("boom"), "r2")
    assert type(err) is ours
    assert err.region == "r2"
    assert "boom" in str(err)


def test_deadline_travels_as_the_v2_timeout_parameter(
    server: InProcessServer, x: np.ndarray
) -> None:
    import json

    bodies: list[dict[str, object]] = []

    def keep(request: httpx.Request) -> None:
        bodies.append(json.loads(request.content))

    for propagate in (True, False):
        with HttpTransport(server.url, region="r1", token="tok", propagate_deadline=propagate) as t:
            t._client.event_hooks["request"] = [keep]
            t.infer(InferRequest(MODEL, {"input": x[:1]}), timeout=2.5)
            t.infer(
                InferRequest(MODEL, {"input": x[:1]}, parameters={"timeout": 9_000_000}),
                timeout=2.5,
            )
    with_deadline, own, without, own2 = (b.get("parameters", {}) for b in bodies)
    assert 2_000_000 < with_deadline["timeout"] <= 2_500_000  # type: ignore[index]
    assert own == {"timeout": 9_000_000}
    assert "timeout" not in without
    assert own2 == {"timeout": 9_000_000}


# ------------------------------------------------------------------ readiness and negotiation


def test_model_ready_probes_the_model_not_the_server(server: InProcessServer) -> None:
    with HttpTransport(server.url, region="r1", token="tok") as t:
        assert t.model_ready(MODEL, timeout=2) is True
        assert t.model_ready(MODEL, "1", timeout=2) is True
        assert t.model_ready(MODEL, "9", timeout=2) is False
        assert t.ready_detail is not None
        assert "version 9 not ready (HTTP 404" in t.ready_detail
        assert t.model_ready("nope", timeout=2) is False
        assert "model 'nope' not ready" in (t.ready_detail or "")
        assert t.ready(timeout=2) is True  # the server itself is ready all along
        assert t.features["model_ready_path"] is True


class _V2Peer(http.server.BaseHTTPRequestHandler):
    """A V2 peer on a real socket whose extensions and routes a test sets (``server.cfg``)."""

    def _send(self, status: int, body: bytes, ctype: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        cfg = self.server.cfg  # type: ignore[attr-defined]
        cfg["gets"].append(self.path)
        if self.path == "/v2":
            ext = cfg["extensions"]
            status = int(cfg.get("metadata_status", 200))
            body = {"name": "peer", "extensions": ext} if status == 200 else {"error": "busy"}
            self._send(status, httpx.Response(200, json=body).content)
        elif self.path == "/v2/health/ready":
            self._send(200, b"")
        elif cfg["model_path"]:
            self._send(400, b'{"error": "Request for unknown model"}')
        else:
            self._send(404, b"Not Found", "text/plain")

    def do_POST(self) -> None:
        cfg = self.server.cfg  # type: ignore[attr-defined]
        self.rfile.read(int(self.headers["Content-Length"]))
        cfg["posts"].append(self.headers["Content-Type"])
        out = {"name": "y", "datatype": "FP32", "shape": [1], "data": [1.0]}
        body = httpx.Response(200, json={"model_name": "m", "outputs": [out]}).content
        self._send(200, body)

    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def _peer(port: int, **cfg: object) -> Iterator[dict[str, object]]:
    conf: dict[str, object] = {"extensions": [], "model_path": True, "gets": [], "posts": []}
    conf.update(cfg)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", port), _V2Peer)
    httpd.cfg = conf  # type: ignore[attr-defined]
    th = threading.Thread(target=httpd.serve_forever, daemon=True)
    th.start()
    try:
        yield conf
    finally:
        httpd.shutdown()
        httpd.server_close()
        th.join()


def test_model_ready_falls_back_to_the_server_only_where_the_path_is_not_routed() -> None:
    port = _free_port()
    with (
        _peer(port, model_path=False) as cfg,
        HttpTransport(f"http://127.0.0.1:{port}", region="p") as t,
    ):
        assert t.model_ready("m", timeout=2) is True  # 404 text: not routed -> server probe
        assert t.features["model_ready_path"] is False
        assert t.model_ready("m", timeout=2) is True  # remembered: straight to the server
        assert cfg["gets"] == ["/v2/models/m/ready", "/v2/health/ready", "/v2/health/ready"]
    port = _free_port()
    with (
        _peer(port, model_path=True) as cfg,
        HttpTransport(f"http://127.0.0.1:{port}", region="p") as t,
    ):
        # A V2 error body: the path is routed and the model is not ready (Triton's case).
        assert t.model_ready("m", timeout=2) is False
        assert "Request for unknown model" in (t.ready_detail or "")
        assert cfg["gets"] == ["/v2/models/m/ready"]


def test_binary_only_where_declared_and_renegotiated_after_a_reconnect() -> None:
    port = _free_port()
    big = {"x": np.zeros((1, 8192), np.float32)}  # 32 KiB: over the binary threshold
    with HttpTransport(f"http://127.0.0.1:{port}", region="p") as t:
        with _peer(port, extensions=["model_repository"]) as cfg:
            t.infer(InferRequest("m", big), timeout=5)
            t.infer(InferRequest("m", big), timeout=5)
            assert cfg["posts"] == ["application/json", "application/json"]
            assert cfg["gets"] == ["/v2"]  # read once
            assert t.features["binary"] is False
        with pytest.raises(ConnectionFailed):
            t.infer(InferRequest("m", big), timeout=2)
        assert t.features["extensions"] is None  # forgotten: the region may be another server
        with _peer(port, extensions=["binary_tensor_data"]) as cfg:
            t.infer(InferRequest("m", big), timeout=5)
            assert cfg["gets"] == ["/v2"]
            assert cfg["posts"] == ["application/octet-stream"]
            assert t.features["binary"] is True


def test_binary_option_is_checked() -> None:
    with pytest.raises(ConfigError, match="binary must be 'auto', 'always' or 'never'"):
        HttpTransport("http://127.0.0.1:1", region="p", binary="sometimes")  # type: ignore[arg-type]


def test_async_transport_negotiates_and_probes_the_model_too() -> None:
    port = _free_port()
    big = {"x": np.zeros((1, 8192), np.float32)}

    async def run() -> tuple[list[object], bool, bool]:
        async with AsyncHttpTransport(f"http://127.0.0.1:{port}", region="p") as t:
            await t.ainfer(InferRequest("m", big), timeout=5)
            ok = await t.amodel_ready("m", timeout=2)
            fallback = t.features["model_ready_path"]
            return [t.features["binary"]], ok, fallback

    with _peer(port, extensions=[], model_path=False) as cfg:
        binary, ok, path = asyncio.run(run())
        assert cfg["posts"] == ["application/json"]
        assert cfg["gets"] == ["/v2", "/v2/models/m/ready", "/v2/health/ready"]
    assert binary == [False]
    assert ok is True
    assert path is False


def test_a_refused_metadata_answer_is_not_remembered() -> None:
    # GET /v2 answering 503 says nothing about the server: JSON this time, asked again next time.
    port = _free_port()
    big = {"x": np.zeros((1, 8192), np.float32)}
    with (
        _peer(port, extensions=["binary_tensor_data"]) as cfg,
        HttpTransport(f"http://127.0.0.1:{port}", region="p") as t,
    ):
        cfg["metadata_status"] = 503
        t.infer(InferRequest("m", big), timeout=5)
        assert t.features["extensions"] is None
        cfg["metadata_status"] = 200
        t.infer(InferRequest("m", big), timeout=5)
        assert cfg["gets"] == ["/v2", "/v2"]
        assert cfg["posts"] == ["application/json", "application/octet-stream"]


class _DropsSecondRequest:
    """A server that answers the first request on each connection (keep-alive) and closes the
    connection on the second without answering: a keep-alive connection the server gave up on
    (idle timeout, restart) while the client still had it in its pool."""

    OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

    def __init__(self, answer: bytes = OK) -> None:
        self.answer = answer
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            with conn:
                conn.settimeout(5)
                try:
                    conn.recv(65536)
                    conn.sendall(self.answer)
                    conn.recv(65536)  # the next request on this connection: dropped
                except OSError:
                    pass

    def close(self) -> None:
        self._stop = True
        self._thread.join(5)
        self.sock.close()


def test_a_probe_on_a_connection_the_server_closed_is_sent_again() -> None:
    srv = _DropsSecondRequest()
    try:
        with HttpTransport(f"http://127.0.0.1:{srv.port}", region="stale") as t:
            assert t.ready(timeout=5) is True
            assert t.ready(timeout=5) is True, t.ready_detail  # reused, dropped, sent anew
        assert srv.connections == 2

        async def run() -> list[bool | None]:
            async with AsyncHttpTransport(f"http://127.0.0.1:{srv.port}", region="s") as a:
                return [await a.aready(timeout=5), await a.aready(timeout=5)]

        assert asyncio.run(run()) == [True, True]
    finally:
        srv.close()


def test_an_infer_on_a_connection_the_server_closed_is_sent_again() -> None:
    """MLServer closes the keep-alive connection after a 500: the next POST on the pooled
    connection must not fail the region (sync and asyncio transports)."""
    body = json.dumps(
        {"model_name": "m", "outputs": [{"name": "y", "datatype": "FP32", "shape": [1, 1],
                                         "data": [2.5]}]}
    ).encode()  # fmt: skip
    answer = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )
    srv = _DropsSecondRequest(answer)
    req = InferRequest("m", {"x": np.ones((1, 1), np.float32)})
    try:
        with HttpTransport(f"http://127.0.0.1:{srv.port}", region="stale", binary="never") as t:
            for _ in range(3):
                assert float(t.infer(req, timeout=5).outputs["y"][0, 0]) == 2.5
        assert srv.connections == 3  # each reused connection dropped once, sent anew

        async def run() -> list[float]:
            async with AsyncHttpTransport(
                f"http://127.0.0.1:{srv.port}", region="s", binary="never"
            ) as a:
                return [float((await a.ainfer(req, timeout=5)).outputs["y"][0, 0]) for _ in "ab"]

        assert asyncio.run(run()) == [2.5, 2.5]
    finally:
        srv.close()
