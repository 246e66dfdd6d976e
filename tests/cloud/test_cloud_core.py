"""The serving core: repository layout, validation, dynamic batching, queue bounds, deadlines.

Real onnxruntime sessions on the sample cloud CNN; no fakes.
"""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from edgecloud.cloud.core import (
    DeadlineExceeded,
    ModelNotFoundError,
    ModelRepository,
    OverloadedError,
    ServingCore,
    status_for,
)
from edgecloud.errors import (
    ConfigError,
    DTypeError,
    InputError,
    IntegrityError,
    ProtocolError,
    RuntimeBackendError,
    ShapeError,
    SignatureError,
    TransportTimeout,
)
from edgecloud.package import (
    generate_keypair,
    load_public_key,
)
from edgecloud.transport.v2 import InferRequest
from tests.fixtures.packages import write_sample_package
from tests.fixtures.servers import make_repository

MODEL = "digits_cloud"


@pytest.fixture(scope="module")
def cloud_onnx(samples_dir: Path) -> Path:
    return samples_dir / "models" / "digits_cloud.onnx"


@pytest.fixture(scope="module")
def val(samples_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    d = np.load(samples_dir / "data" / "cloud_val.npz")
    return d["input"], d["labels"]


@pytest.fixture(scope="module")
def core(tmp_path_factory: pytest.TempPathFactory, cloud_onnx: Path) -> ServingCore:
    repo = make_repository(tmp_path_factory.mktemp("core"), {MODEL: cloud_onnx})
    c = ServingCore(repo, max_batch_size=32, max_queue_delay_ms=5.0)
    yield c  # type: ignore[misc]
    c.close()


def _package(tmp: Path, onnx: Path, version: str, key: Path | None = None) -> Path:
    return write_sample_package(
        tmp / f"pkg-{version}",
        model=onnx,
        name=MODEL,
        version=version,
        signing_key=key,
        variant_file="model_{variant}.onnx",
    )


# ----------------------------------------------------------------------------- repository


def test_missing_repository_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        ModelRepository(tmp_path / "nope")


def test_empty_repository_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"repository .* is empty"):
        ModelRepository(tmp_path)


def test_model_without_versions_is_named(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    with pytest.raises(ConfigError, match="model 'm' has no version directory"):
        ModelRepository(tmp_path)


def test_version_dir_without_model_is_named(tmp_path: Path) -> None:
    (tmp_path / "m" / "3").mkdir(parents=True)
    (tmp_path / "m" / "3" / "weights.bin").write_bytes(b"x")
    with pytest.raises(ConfigError, match=r"m/3 holds no model"):
        ModelRepository(tmp_path)


def test_unloadable_onnx_is_named(tmp_path: Path) -> None:
    (tmp_path / "m" / "1").mkdir(parents=True)
    (tmp_path / "m" / "1" / "model.onnx").write_bytes(b"not an onnx file")
    repo = ModelRepository(tmp_path)
    with pytest.raises(Exception, match=r"model.onnx: onnxruntime cannot load it"):
        repo.entry("m")


def test_latest_version_is_numeric_not_lexicographic(tmp_path: Path, cloud_onnx: Path) -> None:
    repo = ModelRepository(make_repository(tmp_path, {MODEL: {"2": cloud_onnx, "10": cloud_onnx}}))
    assert repo.versions(MODEL) == ["2", "10"]
    assert repo.resolve(MODEL) == "10"
    assert repo.resolve(MODEL, "2") == "2"
    with pytest.raises(ModelNotFoundError, match="has no version '7'") as ei:
        repo.resolve(MODEL, "7")
    assert ei.value.status == 404
    with pytest.raises(ModelNotFoundError, match="'other' is not in this repository"):
        repo.resolve("other")


def test_package_version_is_verified_and_served(
    tmp_path: Path, cloud_onnx: Path, val: tuple[np.ndarray, np.ndarray]
) -> None:
    priv, pub = generate_keypair(tmp_path / "keys" / "k")
    pkg = _package(tmp_path, cloud_onnx, "5", key=priv)
    repo_dir = make_repository(tmp_path, {MODEL: pkg})
    repo = ModelRepository(repo_dir, public_key=load_public_key(pub))
    entry = repo.entry(MODEL)
    assert (entry.version, entry.variant) == ("5", "fp32")
    with ServingCore(repo) as c:
        x, y = val
        out = c.infer(InferRequest(MODEL, {"input": x[:50]}), timeout=10).outputs["logits"]
        assert (out.argmax(1) == y[:50]).mean() > 0.9


def test_unsigned_package_refused_when_a_key_is_given(tmp_path: Path, cloud_onnx: Path) -> None:
    _, pub = generate_keypair(tmp_path / "keys" / "k")
    repo_dir = make_repository(tmp_path, {MODEL: _package(tmp_path, cloud_onnx, "1")})
    repo = ModelRepository(repo_dir, public_key=load_public_key(pub))
    with pytest.raises(SignatureError, match="not signed"):
        repo.entry(MODEL)


def test_tampered_package_refused(tmp_path: Path, cloud_onnx: Path) -> None:
    repo_dir = make_repository(tmp_path, {MODEL: _package(tmp_path, cloud_onnx, "1")})
    with open(repo_dir / MODEL / "1" / "model_fp32.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(IntegrityError, match=r"model_fp32\.onnx"):
        ServingCore(repo_dir)


# ----------------------------------------------------------------------------- serving


def test_results_match_onnxruntime_and_accuracy(
    core: ServingCore, cloud_onnx: Path, val: tuple[np.ndarray, np.ndarray]
) -> None:
    x, y = val
    futs = [
        core.submit(InferRequest(MODEL, {"input": x[i : i + 1]}, id=str(i))) for i in range(360)
    ]
    resps = [f.result(timeout=30) for f in futs]
    assert [r.id for r in resps] == [str(i) for i in range(360)]
    assert all(r.version == "1" and r.model == MODEL for r in resps)
    got = np.concatenate([r.outputs["logits"] for r in resps])
    ref = ort.InferenceSession(str(cloud_onnx)).run(None, {"input": x})[0]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
    assert (got.argmax(1) == y).mean() == pytest.approx(0.983, abs=0.005)
    # 360 requests submitted at once cannot all have run alone.
    assert core.stats()["max_requests_per_batch"] > 1


def test_batching_from_concurrent_threads(
    tmp_path: Path, cloud_onnx: Path, val: tuple[np.ndarray, np.ndarray]
) -> None:
    repo = make_repository(tmp_path, {MODEL: cloud_onnx})
    x, _ = val
    with ServingCore(repo, max_batch_size=16, max_queue_delay_ms=20) as c:
        barrier = threading.Barrier(8)
        errors: list[BaseException] = []

        def client(k: int) -> None:
            barrier.wait()
            for i in range(10):
                try:
                    c.infer(
                        InferRequest(MODEL, {"input": x[k * 10 + i : k * 10 + i + 1]}), timeout=10
                    )
                except BaseException as exc:
                    errors.append(exc)

        threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        stats = c.stats()
        assert stats["requests"] == 80
        assert stats["max_requests_per_batch"] > 1
        assert max(stats["batch_rows"]) <= 16


def test_batching_off_runs_each_request_alone(
    tmp_path: Path, cloud_onnx: Path, val: tuple[np.ndarray, np.ndarray]
) -> None:
    repo = make_repository(tmp_path, {MODEL: cloud_onnx})
    x, _ = val
    with ServingCore(repo, max_batch_size=1) as c:
        futs = [c.submit(InferRequest(MODEL, {"input": x[i : i + 1]})) for i in range(40)]
        for f in futs:
            f.result(timeout=30)
        assert c.stats()["batch_requests"] == {1: 40}


def test_requested_output_subset_and_multi_row_requests(
    core: ServingCore, val: tuple[np.ndarray, np.ndarray]
) -> None:
    x, _ = val
    futs = [
        core.submit(InferRequest(MODEL, {"input": x[i : i + 3]}, outputs=["logits"]))
        for i in (0, 3, 6)
    ]
    outs = [f.result(timeout=10).outputs for f in futs]
    assert all(list(o) == ["logits"] and o["logits"].shape == (3, 10) for o in outs)


@pytest.mark.parametrize(
    ("inputs", "error", "message"),
    [
        (
            {"input": np.zeros((2, 1, 8, 8), np.float64)},
            DTypeError,
            "input 'input': expected datatype FP32, got FP64",
        ),
        (
            {"input": np.zeros((2, 8, 8), np.float32)},
            ShapeError,
            r"input 'input': expected shape \[-1, 1, 8, 8\], got \[2, 8, 8\]",
        ),
        ({"input": np.zeros((2, 1, 8, 9), np.float32)}, ShapeError, "got \\[2, 1, 8, 9\\]"),
        ({"input": np.zeros((0, 1, 8, 8), np.float32)}, ShapeError, "batch dimension is 0"),
        ({"pixels": np.zeros((2, 1, 8, 8), np.float32)}, InputError, "has no input 'pixels'"),
        ({}, InputError, "input 'input' is missing"),
    ],
)
def test_bad_inputs_are_named(
    core: ServingCore, inputs: dict[str, np.ndarray], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message) as ei:
        core.submit(InferRequest(MODEL, inputs))
    assert status_for(ei.value) == 400


def test_unknown_output_is_named(core: ServingCore) -> None:
    with pytest.raises(InputError, match="has no output 'probs'"):
        core.submit(
            InferRequest(MODEL, {"input": np.zeros((1, 1, 8, 8), np.float32)}, outputs=["probs"])
        )


def test_metadata_and_ready(core: ServingCore) -> None:
    md = core.metadata(MODEL)
    assert md == {
        "name": MODEL,
        "versions": ["1"],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 8, 8]}],
        "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}],
    }
    assert core.ready(MODEL)
    assert core.ready(MODEL, "1")
    assert not core.ready("nope")
    assert not core.ready(MODEL, "9")


def test_full_queue_rejects_with_overloaded(tmp_path: Path, cloud_onnx: Path) -> None:
    repo = make_repository(tmp_path, {MODEL: cloud_onnx})
    big = np.random.default_rng(0).standard_normal((2048, 1, 8, 8)).astype(np.float32)
    with ServingCore(repo, max_batch_size=1, max_queue=2) as c:
        accepted, rejected = [], []
        for _ in range(30):
            try:
                accepted.append(c.submit(InferRequest(MODEL, {"input": big})))
            except OverloadedError as exc:
                rejected.append(exc)
        assert rejected, "a queue of 2 must overflow when 30 large requests arrive at once"
        assert status_for(rejected[0]) == 503
        assert "overloaded" in str(rejected[0])
        for f in accepted:
            assert f.result(timeout=60).outputs["logits"].shape == (2048, 10)


def test_expired_request_is_dropped_with_504(core: ServingCore) -> None:
    x = np.zeros((1, 1, 8, 8), np.float32)
    fut = core.submit(InferRequest(MODEL, {"input": x}), deadline=time.monotonic() - 0.001)
    with pytest.raises(DeadlineExceeded, match="expired") as ei:
        fut.result(timeout=10)
    assert isinstance(ei.value, TransportTimeout)
    assert status_for(ei.value) == 504


def test_status_for_mapping() -> None:
    assert status_for(ModelNotFoundError("m")) == 404
    assert status_for(ProtocolError("bad json")) == 400
    assert status_for(OverloadedError("full")) == 503
    assert status_for(RuntimeBackendError("boom")) == 500
    assert status_for(ValueError("foreign")) == 500


def test_closed_core_refuses_and_bad_config_is_named(tmp_path: Path, cloud_onnx: Path) -> None:
    repo = make_repository(tmp_path, {MODEL: cloud_onnx})
    with pytest.raises(ConfigError, match="max_batch_size must be >= 1"):
        ServingCore(repo, max_batch_size=0)
    c = ServingCore(repo)
    c.close()
    with pytest.raises(RuntimeBackendError, match="closed"):
        c.submit(InferRequest(MODEL, {"input": np.zeros((1, 1, 8, 8), np.float32)}))
    assert not c.ready(MODEL)


def test_make_repository_copies_a_plain_model(tmp_path: Path, cloud_onnx: Path) -> None:
    repo = make_repository(tmp_path, {MODEL: cloud_onnx})
    assert (repo / MODEL / "1" / "model.onnx").read_bytes() == cloud_onnx.read_bytes()
    shutil.rmtree(repo)


def test_mixed_sizes_and_output_lists_split_back_exactly(
    tmp_path: Path, cloud_onnx: Path, val: tuple[np.ndarray, np.ndarray]
) -> None:
    """Requests of 1-5 rows, alternately naming outputs or not (two batch groups), from threads."""
    x, _ = val
    ref = ort.InferenceSession(str(cloud_onnx)).run(None, {"input": x})[0]
    repo = make_repository(tmp_path, {MODEL: cloud_onnx})
    rng = np.random.default_rng(1)
    spans = []
    start = 0
    while start < len(x):
        n = int(rng.integers(1, 6))
        spans.append((start, min(start + n, len(x))))
        start += n
    with ServingCore(repo, max_batch_size=8, max_queue_delay_ms=10) as c:
        results: dict[int, np.ndarray] = {}
        lock = threading.Lock()

        def client(k: int) -> None:
            for i in range(k, len(spans), 6):
                a, b = spans[i]
                outs = ["logits"] if i % 2 else []
                r = c.infer(InferRequest(MODEL, {"input": x[a:b]}, outputs=outs), timeout=30)
                with lock:
                    results[i] = r.outputs["logits"]

        threads = [threading.Thread(target=client, args=(k,)) for k in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for i, (a, b) in enumerate(spans):
            np.testing.assert_allclose(results[i], ref[a:b], rtol=1e-4, atol=1e-4)
        stats = c.stats()
        assert max(stats["batch_rows"]) <= 8
        assert stats["max_requests_per_batch"] > 1


def test_batches_grow_with_load_even_without_a_queue_delay(
    tmp_path: Path, cloud_onnx: Path, val: tuple[np.ndarray, np.ndarray]
) -> None:
    # Adaptive batching: with max_queue_delay 0 an idle batcher runs the first request at once,
    # but everything that queues while a batch runs forms the next batch. The first batch is
    # held (its listener blocks) until 70 requests are queued, so the batch sizes are exact.
    x, _ = val
    reference = ort.InferenceSession(str(cloud_onnx)).run(None, {"input": x[:71]})[0]
    repo = make_repository(tmp_path, {MODEL: cloud_onnx})
    release = threading.Event()
    entered = threading.Event()
    with ServingCore(repo, max_batch_size=32, max_queue_delay_ms=0.0) as c:

        def hold(_event: object) -> None:
            if not entered.is_set():
                entered.set()
                release.wait(30)

        c.add_listener(hold)
        first = c.submit(InferRequest(MODEL, {"input": x[:1]}))
        assert entered.wait(30)
        futures = [c.submit(InferRequest(MODEL, {"input": x[i : i + 1]})) for i in range(1, 71)]
        assert c.queue_depth(MODEL) == 70
        release.set()
        outs = [f.result(timeout=60).outputs["logits"] for f in [first, *futures]]
        stats = c.stats()
    assert stats["batch_requests"] == {1: 1, 6: 1, 32: 2}
    np.testing.assert_allclose(np.concatenate(outs), reference, rtol=1e-4, atol=1e-5)


def test_a_lone_request_does_not_wait_the_batching_window(
    tmp_path: Path, cloud_onnx: Path, val: tuple[np.ndarray, np.ndarray]
) -> None:
    # A 4 s window: if the idle batcher still waited it after a lone request, 6 sequential
    # requests would take 24 s. Idle-fast, they take milliseconds; 4 s is a generous bound.
    x, _ = val
    repo = make_repository(tmp_path, {MODEL: cloud_onnx})
    with ServingCore(repo, max_batch_size=32, max_queue_delay_ms=4000.0) as c:
        t0 = time.monotonic()
        for i in range(6):
            c.infer(InferRequest(MODEL, {"input": x[i : i + 1]}), timeout=30)
        elapsed = time.monotonic() - t0
        assert c.stats()["batch_requests"] == {1: 6}
    assert elapsed < 4.0, f"6 lone requests took {elapsed:.1f} s: they waited the window"


def test_the_batcher_waits_for_more_only_while_requests_arrive_together(
    tmp_path: Path, cloud_onnx: Path, val: tuple[np.ndarray, np.ndarray]
) -> None:
    # Three requests queue while the first batch runs (held by its listener): they form one
    # batch, which tells the batcher that requests arrive together, so the next request waits
    # the window and a request submitted well within it joins the same batch. That batch of two
    # keeps the batcher waiting once more; once a window passes with a lone request, the next
    # request runs at once again.
    x, _ = val
    repo = make_repository(tmp_path, {MODEL: cloud_onnx})
    release = threading.Event()
    entered = threading.Event()
    with ServingCore(repo, max_batch_size=32, max_queue_delay_ms=1500.0) as c:

        def hold(_event: object) -> None:
            if not entered.is_set():
                entered.set()
                release.wait(30)

        c.add_listener(hold)
        first = c.submit(InferRequest(MODEL, {"input": x[:1]}))
        assert entered.wait(30)
        queued = [c.submit(InferRequest(MODEL, {"input": x[i : i + 1]})) for i in range(1, 4)]
        release.set()
        for f in [first, *queued]:
            f.result(timeout=30)
        assert c.stats()["batch_requests"] == {1: 1, 3: 1}
        a = c.submit(InferRequest(MODEL, {"input": x[4:5]}))
        b = c.submit(InferRequest(MODEL, {"input": x[5:6]}))
        a.result(timeout=30), b.result(timeout=30)
        assert c.stats()["batch_requests"] == {1: 1, 2: 1, 3: 1}
        # One more window spent by a lone request ...
        c.infer(InferRequest(MODEL, {"input": x[6:7]}), timeout=30)
        # ... and the batcher is idle-fast again.
        t0 = time.monotonic()
        c.infer(InferRequest(MODEL, {"input": x[7:8]}), timeout=30)
        assert time.monotonic() - t0 < 1.5
        assert c.stats()["batch_requests"] == {1: 3, 2: 1, 3: 1}


def test_batch_wait_always_keeps_the_fixed_window(
    tmp_path: Path, cloud_onnx: Path, val: tuple[np.ndarray, np.ndarray]
) -> None:
    # idle_fast=False (``--batch-wait always``): even a lone request waits the window, so a
    # request submitted well within it joins the same batch.
    x, _ = val
    repo = make_repository(tmp_path, {MODEL: cloud_onnx})
    with ServingCore(repo, max_queue_delay_ms=1500.0, idle_fast=False) as c:
        a = c.submit(InferRequest(MODEL, {"input": x[:1]}))
        b = c.submit(InferRequest(MODEL, {"input": x[1:2]}))
        a.result(timeout=30), b.result(timeout=30)
        assert c.stats()["batch_requests"] == {2: 1}


def test_a_wait_ends_when_requests_stop_arriving(
    tmp_path: Path, cloud_onnx: Path, val: tuple[np.ndarray, np.ndarray]
) -> None:
    # After a batch of three, the batcher waits for more, but only while they keep coming: with
    # a 6 s window the wait ends after a 1.5 s gap without arrivals, not after 6 s.
    x, _ = val
    repo = make_repository(tmp_path, {MODEL: cloud_onnx})
    release = threading.Event()
    entered = threading.Event()
    with ServingCore(repo, max_batch_size=32, max_queue_delay_ms=6000.0) as c:

        def hold(_event: object) -> None:
            if not entered.is_set():
                entered.set()
                release.wait(30)

        c.add_listener(hold)
        first = c.submit(InferRequest(MODEL, {"input": x[:1]}))
        assert entered.wait(30)
        queued = [c.submit(InferRequest(MODEL, {"input": x[i : i + 1]})) for i in range(1, 4)]
        release.set()
        for f in [first, *queued]:
            f.result(timeout=30)
        t0 = time.monotonic()
        a = c.submit(InferRequest(MODEL, {"input": x[4:5]}))
        b = c.submit(InferRequest(MODEL, {"input": x[5:6]}))
        a.result(timeout=30), b.result(timeout=30)
        waited = time.monotonic() - t0
        assert c.stats()["batch_requests"] == {1: 1, 2: 1, 3: 1}
    assert 1.0 < waited < 5.0, f"the batch of two waited {waited:.2f} s"
