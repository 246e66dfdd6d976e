"""KServe V2 over gRPC: the region server (``cloud serve --grpc-port``) and ``GrpcTransport``.

A stock client (tritonclient.grpc) and our transport against a real ``edgecloud cloud serve``
child process; malformed messages from a seeded generator against the real server; a region
killed and restarted under the transport; HybridClient routing over grpc://.
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as tgrpc
from tritonclient.utils import InferenceServerException

from edgecloud.client import HybridClient
from edgecloud.errors import (
    AuthError,
    ConfigError,
    ConnectionFailed,
    ProtocolError,
    RemoteError,
    TransportTimeout,
)
from edgecloud.transport import open_transport
from edgecloud.transport._proto import grpc_predict_v2_pb2 as pb
from edgecloud.transport._proto import grpc_predict_v2_pb2_grpc as pb_grpc
from edgecloud.transport.grpc import GrpcTransport, decode_tensors, translate_grpc_error
from edgecloud.transport.v2 import InferRequest
from tests.fixtures.servers import CloudProcess, make_repository, running_cloud_server
from tests.fixtures.wait import wait_until

MODEL = "digits_cloud"
TOKEN = "s3cret"
AUTH = {"authorization": f"Bearer {TOKEN}"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def grpc_url(proc: CloudProcess) -> str:
    for line in proc.output:
        m = re.search(r" grpc on (grpc://\S+)", line)
        if m:
            return m.group(1)
    raise AssertionError(f"no gRPC line in the server's output: {proc.output}")


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, samples_dir: Path) -> Path:
    return make_repository(
        tmp_path_factory.mktemp("grpc"), {MODEL: samples_dir / "models" / "digits_cloud.onnx"}
    )


@pytest.fixture(scope="module")
def x(samples_dir: Path) -> np.ndarray:
    return np.load(samples_dir / "data" / "cloud_val.npz")["input"]


@pytest.fixture(scope="module")
def reference(samples_dir: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(samples_dir / "models" / "digits_cloud.onnx"))


@pytest.fixture(scope="module")
def region(repo: Path) -> Iterator[tuple[CloudProcess, str]]:
    with running_cloud_server(
        repo,
        region="g1",
        token=TOKEN,
        max_request_bytes=1 << 20,
        extra_args=["--grpc-port", "0"],
    ) as proc:
        assert isinstance(proc, CloudProcess)
        yield proc, grpc_url(proc)


def test_tritonclient_grpc_against_the_region(
    region: tuple[CloudProcess, str], x: np.ndarray, reference: ort.InferenceSession
) -> None:
    _, url = region
    client = tgrpc.InferenceServerClient(url.removeprefix("grpc://"))
    try:
        assert client.is_server_live()
        assert client.is_server_ready()
        assert client.is_model_ready(MODEL, headers=AUTH)
        assert not client.is_model_ready("nope", headers=AUTH)
        meta = client.get_model_metadata(MODEL, headers=AUTH, as_json=True)
        assert meta["inputs"][0] == {
            "name": "input",
            "datatype": "FP32",
            "shape": ["-1", "1", "8", "8"],
        }
        assert client.get_server_metadata(headers=AUTH).name == "edgecloud"
        inp = tgrpc.InferInput("input", [5, 1, 8, 8], "FP32")
        inp.set_data_from_numpy(x[:5])
        out = tgrpc.InferRequestedOutput("logits")
        result = client.infer(MODEL, [inp], outputs=[out], request_id="t1", headers=AUTH)
        np.testing.assert_allclose(
            result.as_numpy("logits"),
            reference.run(None, {"input": x[:5]})[0],
            rtol=1e-5,
            atol=1e-5,
        )
        assert result.get_response().id == "t1"
        with pytest.raises(InferenceServerException, match="bearer token") as ei:
            client.infer(MODEL, [inp])
        assert ei.value.status() == "StatusCode.UNAUTHENTICATED"
        with pytest.raises(
            InferenceServerException, match="'nope' is not in this repository"
        ) as ei:
            client.infer("nope", [inp], headers=AUTH)
        assert ei.value.status() == "StatusCode.NOT_FOUND"
        bad = tgrpc.InferInput("input", [1, 1, 8, 8], "FP64")
        bad.set_data_from_numpy(x[:1].astype(np.float64))
        with pytest.raises(
            InferenceServerException, match="expected datatype FP32, got FP64"
        ) as ei:
            client.infer(MODEL, [bad], headers=AUTH)
        assert ei.value.status() == "StatusCode.INVALID_ARGUMENT"
    finally:
        client.close()


def test_grpc_transport_answers_match_and_errors_map(
    region: tuple[CloudProcess, str], x: np.ndarray, reference: ort.InferenceSession
) -> None:
    _, url = region
    t = open_transport(url, region="g1", token=TOKEN)
    assert isinstance(t, GrpcTransport)
    with t:
        got = t.infer(InferRequest(MODEL, {"input": x[:7]}, id="a"), timeout=10)
        assert (got.id, got.version, got.model) == ("a", "1", MODEL)
        np.testing.assert_allclose(
            got.outputs["logits"], reference.run(None, {"input": x[:7]})[0], rtol=1e-5, atol=1e-5
        )
        assert t.model_ready(MODEL, timeout=5) is True
        assert t.model_ready(MODEL, "1", timeout=5) is True
        assert t.model_ready("nope", timeout=5) is False
        assert t.ready(timeout=5) is True
        assert t.metadata(MODEL)["outputs"] == [
            {"name": "logits", "datatype": "FP32", "shape": [-1, 10]}
        ]
        with pytest.raises(RemoteError, match="gRPC NOT_FOUND") as ei:
            t.infer(InferRequest("nope", {"input": x[:1]}), timeout=10)
        assert (ei.value.status, ei.value.region) == (404, "g1")
        with pytest.raises(RemoteError, match="expected shape") as ei:
            t.infer(InferRequest(MODEL, {"input": x[:1, :, :4]}), timeout=10)
        assert ei.value.status == 400
        # 1 MiB message limit on this region (--max-request-bytes): refused before decoding.
        big = np.zeros((4200, 1, 8, 8), np.float32)
        with pytest.raises(RemoteError) as ei:
            t.infer(InferRequest(MODEL, {"input": big}), timeout=10)
        assert ei.value.status == 413
        with pytest.raises(TransportTimeout):
            t.infer(InferRequest(MODEL, {"input": x[:1]}), timeout=0)
    with GrpcTransport(url, region="g1") as anon:
        with pytest.raises(AuthError) as ai:
            anon.infer(InferRequest(MODEL, {"input": x[:1]}), timeout=10)
        assert ai.value.status == 401
        assert anon.ready(timeout=5) is True  # health needs no token


def test_bad_endpoint_and_options_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="grpc://host:port"):
        GrpcTransport("grpc://nohost", region="g")
    with pytest.raises(ConfigError, match="connect_timeout"):
        GrpcTransport("grpc://127.0.0.1:1", region="g", connect_timeout=0)


def _raw_call(url: str, payload: bytes, timeout: float = 10) -> grpc.RpcError | bytes:
    with grpc.insecure_channel(url.removeprefix("grpc://")) as ch:
        call = ch.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        try:
            return bytes(call(payload, timeout=timeout, metadata=tuple(AUTH.items())))
        except grpc.RpcError as exc:
            return exc


def test_malformed_messages_get_a_status_not_a_crash_seeded(
    region: tuple[CloudProcess, str], x: np.ndarray
) -> None:
    # A seeded generator of broken requests, each sent to the real server: every one gets a
    # gRPC error status that names the problem, and the region still answers afterwards.
    proc, url = region
    rng = np.random.default_rng(2024)
    good = x[:1].astype("<f4").tobytes()
    codes: set[str] = set()
    for i in range(60):
        kind = i % 6
        req = pb.ModelInferRequest(model_name=MODEL)
        shape = [1, 1, 8, 8]
        if kind == 0:  # raw bytes that do not fit the shape
            req.inputs.add(name="input", datatype="FP32", shape=shape)
            req.raw_input_contents.append(good[: int(rng.integers(0, len(good)))])
        elif kind == 1:  # an unknown datatype
            req.inputs.add(
                name="input", datatype=str(rng.choice(["FP8", "", "STRING", "fp32"])), shape=shape
            )
            req.raw_input_contents.append(good)
        elif kind == 2:  # a negative dimension
            req.inputs.add(name="input", datatype="FP32", shape=[1, -int(rng.integers(1, 9)), 8, 8])
            req.raw_input_contents.append(good)
        elif kind == 3:  # more raw contents than inputs
            req.inputs.add(name="input", datatype="FP32", shape=shape)
            req.raw_input_contents.extend([good, good])
        elif kind == 4:  # typed contents of the wrong length
            t = req.inputs.add(name="input", datatype="FP32", shape=shape)
            t.contents.fp32_contents.extend(rng.random(int(rng.integers(0, 63))).tolist())
        else:  # no model name, or random bytes that are not a message at all
            if rng.random() < 0.5:
                req = pb.ModelInferRequest()
            else:
                out = _raw_call(url, rng.bytes(int(rng.integers(1, 200))))
                assert isinstance(out, grpc.RpcError | bytes)
                if isinstance(out, grpc.RpcError):
                    codes.add(out.code().name)
                continue
        out = _raw_call(url, req.SerializeToString())
        assert isinstance(out, grpc.RpcError), f"case {i} was answered"
        assert out.code() == grpc.StatusCode.INVALID_ARGUMENT, (i, out.code(), out.details())
        assert out.details(), i
        codes.add(out.code().name)
    assert "INVALID_ARGUMENT" in codes
    assert proc.proc is not None
    assert proc.proc.poll() is None
    # Typed contents of the right length are a valid request.
    req = pb.ModelInferRequest(model_name=MODEL)
    t = req.inputs.add(name="input", datatype="FP32", shape=[1, 1, 8, 8])
    t.contents.fp32_contents.extend(x[0].ravel().tolist())
    answer = _raw_call(url, req.SerializeToString())
    assert isinstance(answer, bytes)
    resp = pb.ModelInferResponse.FromString(answer)
    assert decode_tensors(resp.outputs, resp.raw_output_contents, "r")["logits"].shape == (1, 10)


def test_decode_tensors_checks_what_it_reads() -> None:
    req = pb.ModelInferRequest()
    req.inputs.add(name="a", datatype="FP16", shape=[2])
    with pytest.raises(ProtocolError, match="FP16 needs raw contents"):
        decode_tensors(req.inputs, [], "request")
    req.inputs.add(name="a", datatype="FP32", shape=[1])
    with pytest.raises(ProtocolError, match="appears twice"):
        decode_tensors(req.inputs, [b"\0" * 4, b"\0" * 4], "request")


def test_region_killed_and_restarted_under_the_transport(repo: Path, x: np.ndarray) -> None:
    gport = _free_port()
    with running_cloud_server(repo, region="g2", extra_args=["--grpc-port", str(gport)]) as proc:
        assert isinstance(proc, CloudProcess)
        url = grpc_url(proc)
        with GrpcTransport(url, region="g2") as t:
            assert t.infer(InferRequest(MODEL, {"input": x[:1]}), timeout=10).outputs
            proc.kill()
            with pytest.raises(ConnectionFailed):
                t.infer(InferRequest(MODEL, {"input": x[:1]}), timeout=5)
            assert t.model_ready(MODEL, timeout=2) is False
            proc.restart()
            assert grpc_url(proc) == url
            # Calls fail fast while the channel is down (the router moves on); it reconnects
            # with backoff (at most 2 s between tries), and then the same transport answers.
            end = time.monotonic() + 60
            last: Exception | None = None
            while time.monotonic() < end:
                try:
                    t.infer(InferRequest(MODEL, {"input": x[:1]}), timeout=5)
                    break
                except ConnectionFailed as exc:
                    last = exc
                    time.sleep(0.1)
            else:
                raise AssertionError(f"no answer after the restart: {last}")


def test_hybrid_client_routes_over_grpc(
    region: tuple[CloudProcess, str], x: np.ndarray, reference: ort.InferenceSession
) -> None:
    _, url = region
    client = HybridClient(
        regions=[{"name": "g1", "endpoint": url, "model": MODEL, "options": {"token": TOKEN}}],
        mode="cloud_only",
        probe_interval=None,
        deadline=10,
    )
    with client:
        for i in range(5):
            r = client.infer({"input": x[i : i + 1]})
            assert r.source == "cloud:g1"
            np.testing.assert_allclose(
                r.outputs["logits"],
                reference.run(None, {"input": x[i : i + 1]})[0],
                rtol=1e-5,
                atol=1e-5,
            )
        health = client.region_health()[0]
        assert health.features == {"protocol": "grpc", "binary": True, "model_ready_path": True}
        assert health.answered == 5


def test_translate_grpc_error_maps_every_code() -> None:
    class Fake(grpc.RpcError):
        def __init__(self, code: grpc.StatusCode, details: str = "d") -> None:
            self._c, self._d = code, details

        def code(self) -> grpc.StatusCode:
            return self._c

        def details(self) -> str:
            return self._d

    for code in grpc.StatusCode:
        err = translate_grpc_error(Fake(code), "r")
        assert err.region == "r"
        assert code.name in str(err)
    assert isinstance(
        translate_grpc_error(Fake(grpc.StatusCode.DEADLINE_EXCEEDED), "r"), TransportTimeout
    )
    assert isinstance(
        translate_grpc_error(Fake(grpc.StatusCode.UNAVAILABLE), "r"), ConnectionFailed
    )
    e = translate_grpc_error(Fake(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue"), "r")
    assert isinstance(e, RemoteError)
    assert e.status == 429
    assert pb_grpc.GRPCInferenceServiceStub is not None


def test_concurrent_rpc_limit_refuses_at_once(repo: Path, x: np.ndarray) -> None:
    # The first RPC is answered, then the batcher blocks in its listener; the next two wait in
    # the queue and fill a limit of 2: one more is refused with RESOURCE_EXHAUSTED at once
    # instead of queueing; after release all is well.
    import threading

    from edgecloud.cloud.core import ServingCore
    from edgecloud.cloud.grpc_server import GrpcServer

    release = threading.Event()
    with ServingCore(repo, max_batch_size=1) as core:
        core.add_listener(lambda _ev: release.wait(30))
        with (
            GrpcServer(core, max_concurrent_rpcs=2) as srv,
            GrpcTransport(srv.url, region="l") as t,
        ):
            with grpc.insecure_channel(srv.url.removeprefix("grpc://")) as ch:
                stub = pb_grpc.GRPCInferenceServiceStub(ch)
                req = pb.ModelInferRequest(model_name=MODEL)
                req.inputs.add(name="input", datatype="FP32", shape=[1, 1, 8, 8])
                req.raw_input_contents.append(x[:1].astype("<f4").tobytes())
                first = stub.ModelInfer.future(req, timeout=30)
                assert first.result(timeout=30).outputs
                held = [stub.ModelInfer.future(req, timeout=30) for _ in range(2)]
                # both reach the server and wait in the queue behind the held batch
                wait_until(lambda: core.queue_depth(MODEL) == 2, what="two queued requests")
                with pytest.raises(RemoteError) as ei:
                    t.infer(InferRequest(MODEL, {"input": x[:1]}), timeout=10)
                assert ei.value.status == 429
                assert "RESOURCE_EXHAUSTED" in str(ei.value)
                release.set()
                for f in held:
                    assert f.result(timeout=30).outputs
                assert t.infer(InferRequest(MODEL, {"input": x[:1]}), timeout=10).outputs
