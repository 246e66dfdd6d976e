"""Each documented limit of the region server, one by one, with the status and body it returns.

The fuzz suites check "no 5xx, a V2 error body" over thousands of mixed requests; these pin what
docs/protocol.md promises for each limit (status, message) against a real server on loopback
whose limits are set small enough to reach quickly.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from edgecloud.cloud.core import ServingCore
from edgecloud.cloud.server import CloudServer
from edgecloud.errors import ConfigError, ProtocolError
from edgecloud.limits import (
    DEFAULT_LIMITS,
    Limits,
    RateLimitedLog,
    check_json_depth,
    parse_decimal,
)
from tests.fixtures.servers import make_repository

ROOT = Path(__file__).resolve().parents[2]
MODEL = "digits_cloud"
INFER = f"/v2/models/{MODEL}/infer"
LIMITS = Limits(
    max_json_bytes=200_000,
    max_json_depth=8,
    max_rows=16,
    large_body_bytes=100_000,
    max_large_decodes=1,
    max_header_bytes=16384,
    header_timeout_s=0.5,
    request_timeout_s=3.0,
    idle_timeout_s=1.0,
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CloudServer]:
    repo = make_repository(
        tmp_path_factory.mktemp("limits"), {MODEL: ROOT / "samples/models/digits_cloud.onnx"}
    )
    core = ServingCore(repo)
    srv = CloudServer(core, limits=LIMITS, token="tok").start()
    yield srv
    srv.stop()
    core.close()


@pytest.fixture
def client(server: CloudServer) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=server.url, timeout=10, headers={"Authorization": "Bearer tok"}
    ) as c:
        yield c


def _tensor(rows: int, data: list[object] | None = None) -> dict[str, object]:
    return {
        "name": "input",
        "datatype": "FP32",
        "shape": [rows, 1, 8, 8],
        "data": data if data is not None else [0.5] * (rows * 64),
    }


def _error(r: httpx.Response, status: int) -> str:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    msg = r.json()["error"]
    assert isinstance(msg, str)
    return msg


def test_rows_per_request(client: httpx.Client) -> None:
    assert client.post(INFER, json={"inputs": [_tensor(16)]}).status_code == 200
    msg = _error(client.post(INFER, json={"inputs": [_tensor(17)]}), 413)
    assert "17 rows" in msg
    assert "at most 16" in msg


def test_json_bytes_and_depth(client: httpx.Client) -> None:
    big = json.dumps({"inputs": [_tensor(1)], "id": "x" * 250_000}).encode()
    assert "binary tensor data" in _error(client.post(INFER, content=big), 413)
    deep = b'{"inputs": [], "parameters": ' + b'{"a":' * 9 + b"1" + b"}" * 9 + b"}"
    assert "deeper than 8" in _error(client.post(INFER, content=deep), 400)
    assert "deeper" in _error(client.post(INFER, content=b"[" * 100000 + b"]" * 100000), 400)


@pytest.mark.parametrize(
    ("literal", "needle"),
    [
        (b"1" + b"0" * 400, None),  # 1e400 as an integer: a day at most, not an overflow
        (b'"soon"', "number of microseconds"),
        (b"-5", "non-negative"),
        (b"9" * 4301, "not valid JSON"),
    ],
)
def test_timeout_parameter(client: httpx.Client, literal: bytes, needle: str | None) -> None:
    body = (
        (b'{"inputs": [' + json.dumps(_tensor(1)).encode() + b'], "parameters": {"timeout": ')
        + literal
        + b"}}"
    )
    r = client.post(INFER, content=body)
    if needle is None:
        assert r.status_code == 200, r.text
    else:
        assert needle in _error(r, 400)


@pytest.mark.parametrize("value", ["²", "9" * 5000, "-1", "12x"])
def test_header_length_must_be_a_plain_decimal(client: httpx.Client, value: str) -> None:
    r = client.post(
        INFER,
        content=json.dumps({"inputs": [_tensor(1)]}).encode(),
        headers={"Inference-Header-Content-Length": value.encode()},
    )
    assert "decimal integer" in _error(r, 400)


@pytest.mark.parametrize("shape", [[1180591620717411303424], [4294967296, 4294967296], [1] * 65])
def test_shapes_beyond_int64_are_400(client: httpx.Client, shape: list[int]) -> None:
    t = dict(_tensor(1), shape=shape)
    _error(client.post(INFER, json={"inputs": [t]}), 400)


def test_unhashable_datatype_is_400(client: httpx.Client) -> None:
    for dt in ([], {}):
        t = dict(_tensor(1), datatype=dt)
        assert "datatype" in _error(client.post(INFER, json={"inputs": [t]}), 400)


def test_nan_outputs_are_strict_json(client: httpx.Client) -> None:
    r = client.post(INFER, json={"inputs": [_tensor(1, ["NaN"] * 64)]})
    assert r.status_code == 200, r.text

    def refuse(name: str) -> object:
        raise AssertionError(f"bare {name}")

    out = json.loads(r.content, parse_constant=refuse)["outputs"][0]["data"]
    assert set(out) == {"NaN"}


def test_bearer_scheme_is_case_insensitive(server: CloudServer) -> None:
    for header in ("bearer tok", "BEARER tok", "Bearer  tok"):
        r = httpx.get(f"{server.url}/v2", headers={"Authorization": header})
        assert r.status_code == 200, header
    r = httpx.get(f"{server.url}/v2", headers={"Authorization": "Basic tok"})
    assert _error(r, 401) == "invalid bearer token"


def _raw(server: CloudServer, data: bytes, *, wait: float = 10) -> bytes:
    with socket.create_connection(("127.0.0.1", server.port), timeout=wait) as s:
        s.sendall(data)
        out = b""
        while True:
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            out += chunk
        return out


def test_oversized_headers_are_431(server: CloudServer) -> None:
    out = _raw(server, b"GET /v2 HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 431")
    assert b'{"error": "request line and headers exceed 16384 bytes"}' in out


def test_slow_headers_get_408_and_idle_connections_close(server: CloudServer) -> None:
    t0 = time.monotonic()
    out = _raw(server, b"GET /v2 HTTP/1.1\r\nHost: x\r\n")
    assert out.startswith(b"HTTP/1.1 408")
    assert b"request headers not received within 0.5s" in out
    assert time.monotonic() - t0 < 3
    # a body that never arrives: 408 at request_timeout_s
    out = _raw(
        server,
        f"POST {INFER} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer tok\r\n"
        "Content-Length: 50\r\n\r\n{".encode(),
    )
    assert out.startswith(b"HTTP/1.1 408")
    assert b"request not received within 3.0s" in out


def test_parser_errors_are_v2_error_bodies(server: CloudServer) -> None:
    out = _raw(server, b"\x16\x03\x01 hello\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 400")
    assert b'{"error": "malformed HTTP request' in out


def test_large_decodes_are_bounded(server: CloudServer, client: httpx.Client) -> None:
    """With one slot, a large body that is still arriving makes the next one wait, then 503."""
    holder = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    try:
        holder.sendall(
            f"POST {INFER} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer tok\r\n"
            f"Content-Length: 150000\r\n\r\n{{".encode()
        )
        time.sleep(0.2)  # the holder has the slot and is dripping its body
        big = json.dumps({"inputs": [_tensor(1)], "id": "y" * 120_000}).encode()
        msg = _error(client.post(INFER, content=big), 503)
        assert "large requests are already being decoded" in msg
    finally:
        holder.close()
    big = json.dumps({"inputs": [_tensor(1)], "id": "y" * 120_000}).encode()
    assert client.post(INFER, content=big).status_code == 200


# -- the limits module itself ---------------------------------------------------------------------
def test_limits_validate_themselves() -> None:
    assert DEFAULT_LIMITS.with_(max_rows=None) == DEFAULT_LIMITS
    with pytest.raises(ConfigError, match="max_rows"):
        Limits(max_rows=0)
    with pytest.raises(ConfigError, match="header_timeout_s"):
        Limits(header_timeout_s=10, request_timeout_s=1)
    with pytest.raises(ConfigError, match="number"):
        Limits(max_json_depth=True)


def test_parse_decimal_and_depth() -> None:
    assert parse_decimal(" 42 ", "X") == 42
    assert parse_decimal(None, "X") is None
    for bad in ("²", "9" * 20, "-1", "1e3", ""):
        with pytest.raises(ProtocolError, match="X must be"):
            parse_decimal(bad, "X")
    check_json_depth(b'{"a": "[[[[[[[[[[[[[[[["}', 2)  # brackets inside strings do not nest
    check_json_depth(b'{"a": "\\"[[[[[[[[[[[["}', 2)
    with pytest.raises(ProtocolError, match="deeper than 2"):
        check_json_depth(b"[[[1]]]", 2)


def test_rate_limited_log_counts_what_it_suppresses(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    rl = RateLimitedLog(logging.getLogger("edgecloud.test"), 2, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="edgecloud.test"):
        logged = [rl.warning("bad", "refused %d", i) for i in range(5)]
        now[0] = 61.0
        assert rl.warning("bad", "refused %d", 5)
    assert logged == [True, True, False, False, False]
    assert "3 similar messages suppressed" in caplog.records[-1].getMessage()


def test_agent_endpoint_unknown_method_is_json_405() -> None:
    """The stdlib answered unknown methods with an HTML 501."""
    from edgecloud.guarded_http import GuardedHandler, GuardedThreadingHTTPServer

    class H(GuardedHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

    srv = GuardedThreadingHTTPServer(("127.0.0.1", 0), H)
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    t.start()
    try:
        with socket.create_connection(("127.0.0.1", srv.server_address[1]), timeout=5) as s:
            s.sendall(b"BREW /pot HTTP/1.1\r\nHost: x\r\n\r\n")
            out = s.recv(4096)
        assert out.startswith(b"HTTP/1.1 405")
        assert b"application/json" in out
        r = httpx.get(f"http://127.0.0.1:{srv.server_address[1]}/", timeout=5)
        assert r.text == "ok"
    finally:
        srv.shutdown()
        srv.server_close()


def test_idle_connection_is_closed_without_a_reply(server: CloudServer) -> None:
    t0 = time.monotonic()
    assert _raw(server, b"") == b""  # nothing asked, nothing answered: closed at the idle timeout
    assert 0.8 < time.monotonic() - t0 < 5


def test_stdlib_thread_cap_queues_then_refuses() -> None:
    """One handler thread: requests queue behind it; a queue of 4x the threads gets 503."""
    from edgecloud.guarded_http import GuardedHandler, GuardedThreadingHTTPServer

    release = threading.Event()

    class Slow(GuardedHandler):
        def do_GET(self) -> None:
            release.wait(10)
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

    server_cls = type("S", (GuardedThreadingHTTPServer,), {"limits": Limits(max_threads=1)})
    srv = server_cls(("127.0.0.1", 0), Slow)
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    socks = []
    try:
        for _ in range(6):
            s = socket.create_connection(("127.0.0.1", srv.server_address[1]), timeout=10)
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            socks.append(s)
            time.sleep(0.1)
        refused = socks[-1].recv(4096)
        assert refused.startswith(b"HTTP/1.1 503")
        assert b"already being served" in refused
        release.set()
        for s in socks[:5]:
            assert s.recv(4096).startswith(b"HTTP/1.1 200")
    finally:
        release.set()
        for s in socks:
            s.close()
        srv.shutdown()
        srv.server_close()


def test_parser_warnings_are_rate_limited(server: CloudServer) -> None:
    """uvicorn logs every request its parser rejects; a client must not grow the log at will."""
    seen: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    handler = Collect()
    uv = logging.getLogger("uvicorn.error")
    uv.addHandler(handler)
    try:
        for _ in range(30):
            assert _raw(server, b"\x16\x03\x01 hello\r\n\r\n").startswith(b"HTTP/1.1 400")
    finally:
        uv.removeHandler(handler)
    invalid = [m for m in seen if m.startswith("Invalid HTTP request")]
    assert len(invalid) <= LIMITS.log_per_minute  # 30 refused, at most 10 logged a minute


def test_server_close_closes_connections_still_queued_for_a_thread() -> None:
    """One busy thread, three connections queued behind it: closing the server closes all four.

    A worker that saw the server closing took one queued connection and exited, so the others
    stayed open until the garbage collector found them (a ResourceWarning in a later test).
    """
    from edgecloud.guarded_http import GuardedHandler, GuardedThreadingHTTPServer

    busy, release = threading.Event(), threading.Event()

    class Slow(GuardedHandler):
        def do_GET(self) -> None:
            busy.set()
            release.wait(10)
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

    server_cls = type("S", (GuardedThreadingHTTPServer,), {"limits": Limits(max_threads=1)})
    srv = server_cls(("127.0.0.1", 0), Slow)
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    socks: list[socket.socket] = []
    try:
        for i in range(4):
            s = socket.create_connection(("127.0.0.1", srv.server_address[1]), timeout=10)
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            socks.append(s)
            if i == 0:
                assert busy.wait(10)
        time.sleep(0.3)  # the three others are readable and queued behind the busy thread
        srv.shutdown()
        srv.server_close()
        release.set()
        for s in socks:
            s.settimeout(5)
            data = b""
            while chunk := s.recv(4096):  # a timeout here is a connection left open
                data += chunk
            assert data == b"" or data.startswith(b"HTTP/1.1 200")
    finally:
        release.set()
        for s in socks:
            s.close()
