"""Per-request threshold, background escalation, the escalation rate limit and audits.

Unit tests of the small policies with a fake clock, then end to end: HybridClient on a signed
digits package with a real V2 region server on loopback, and the device agent over a real
Mosquitto broker showing the escalations and audits in its telemetry.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgecloud.client import HybridClient
from edgecloud.errors import ConfigError
from edgecloud.routing.audit import AuditSampler, agree
from edgecloud.routing.escalation import BackgroundPool, Escalation, TokenBucket
from tests.fixtures.agent_util import ROOT, Keys, val_inputs

CLOUD = ROOT / "samples" / "models" / "digits_cloud.onnx"


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_token_bucket_refills_at_its_rate() -> None:
    clock = FakeClock()
    b = TokenBucket(2.0, burst=3, clock=clock)
    assert [b.try_acquire() for _ in range(4)] == [True, True, True, False]
    clock.t = 0.5  # one token back
    assert [b.try_acquire() for _ in range(2)] == [True, False]
    clock.t = 100.0  # never more than the burst
    assert sum(b.try_acquire() for _ in range(10)) == 3
    with pytest.raises(ConfigError, match="rate_limit"):
        TokenBucket(0)


def test_background_pool_is_bounded_and_resolves_what_it_drops() -> None:
    gate = threading.Event()
    pool = BackgroundPool(workers=1, max_queue=2)
    first = pool.submit(lambda: gate.wait(10) and "ran")
    time.sleep(0.05)  # the worker holds the first job
    queued = [pool.submit(lambda: "ran", lambda: "dropped") for _ in range(2)]
    assert pool.submit(lambda: "ran") is None  # full: refused, not queued
    pool_thread_gate = gate
    pool.close(timeout=0.1)  # resolves the queued ones with on_drop
    assert [f.result(1) for f in queued if f is not None] == ["dropped", "dropped"]
    pool_thread_gate.set()
    assert first is not None
    assert first.result(5) == "ran"
    assert pool.submit(lambda: 1) is None  # closed


def test_audit_sampler_rate_and_agreement() -> None:
    s = AuditSampler(0.25, seed=1)
    n = sum(s() for _ in range(4000))
    assert 900 < n < 1100
    assert not any(AuditSampler(0.0)() for _ in range(100))
    with pytest.raises(ConfigError, match="audit_rate"):
        AuditSampler(1.5)
    a = {"logits": np.array([[0.1, 0.9], [0.8, 0.2]])}
    assert agree(a, {"other": np.array([[0, 1.0], [1.0, 0]])}, "logits") is True
    assert agree(a, {"logits": np.array([[1.0, 0], [1.0, 0]])}, "logits") is False
    assert agree(a, {"logits": np.zeros((3, 2))}, "logits") is None


def test_escalation_configure_checks_everything_before_changing() -> None:
    e = Escalation()
    with pytest.raises(ConfigError, match="escalate must be one of"):
        e.configure(escalate="later", audit_rate=0.5)
    assert e.mode == "sync"
    assert e.audit_rate == 0.0
    e.configure(escalate="background", rate_limit=5, audit_rate=0.1)
    assert (e.mode, e.limiter is not None, e.audit_rate) == ("background", True, 0.1)
    e.configure(rate_limit=0)
    assert e.limiter is None


# -- end to end -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def region(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from tests.fixtures.servers import make_repository, running_cloud_server

    tmp = tmp_path_factory.mktemp("region")
    repo = make_repository(tmp, {"digits_cloud": CLOUD})
    with running_cloud_server(repo, region="near", subprocess=False, threads=1) as server:
        yield server


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from edgecloud.package import unpack_package
    from tests.fixtures.agent_util import make_package

    tmp = tmp_path_factory.mktemp("pkg")
    keys = Keys(tmp)
    archive = make_package(tmp, keys, "1.0.0")
    return unpack_package(archive, tmp / "unpacked"), keys.public


def _client(package: tuple[Path, Path], region: Any, **kw: Any) -> HybridClient:
    return HybridClient(
        package[0],
        public_key=package[1],
        regions=[{"name": "near", "endpoint": region.url, "model": "digits_cloud",
                  "cloud_input_shape": [1, 8, 8]}],
        probe_interval=None,
        deadline=5.0,
        **kw,
    )  # fmt: skip


def test_per_request_threshold_overrides_the_models(package: Any, region: Any) -> None:
    x = {"input": val_inputs(1)}
    with _client(package, region, threshold=0.5) as c:
        assert c.infer(x).reason == "confident"
        r = c.infer(x, threshold=1.0)
        assert r.reason == "low_confidence"
        assert r.region == "near"
        assert c.infer(x, threshold=0.0).reason == "confident"
        with pytest.raises(ConfigError, match="threshold must be a number in"):
            c.infer(x, threshold=1.5)
        with pytest.raises(ConfigError, match="escalate must be one of"):
            c.infer(x, escalate="soon")
        import asyncio

        r = asyncio.run(c.ainfer(x, threshold=1.0, escalate="background"))
        assert r.reason == "background"
        assert r.cloud_future is not None
        assert r.cloud_future.result(30).region == "near"


def test_background_escalation_returns_now_and_delivers_the_cloud_answer(
    package: Any, region: Any
) -> None:
    x = val_inputs(20)
    events: list[tuple[str, dict[str, Any]]] = []
    with _client(package, region, threshold=1.0) as c:
        c.escalation.listeners.append(lambda ev, info: events.append((ev, info)))
        results = [c.infer({"input": x[i : i + 1]}, escalate="background") for i in range(20)]
        assert all(r.source == "edge" and r.reason == "background" for r in results)
        assert all(not r.degraded and r.cloud_future is not None for r in results)
        clouds = [r.cloud_future.result(30) for r in results]  # type: ignore[union-attr]
        assert all(cr.region == "near" and cr.reason == "low_confidence" for cr in clouds)
        assert all(cr.local_outputs is not None for cr in clouds)
        # the cloud's answer is the cloud model's, for this very row
        import onnxruntime as ort

        s = ort.InferenceSession(str(CLOUD))
        want = s.run(None, {"input": x.reshape(20, 1, 8, 8)})[0].argmax(1)
        got = np.array([np.asarray(cr.outputs["logits"]).argmax() for cr in clouds])
        assert (got == want).all()
        st = c.escalation.stats()
        assert st["background_sent"] == st["background_answered"] == 20
        assert [ev for ev, _ in events] == ["background"] * 20


def test_background_escalation_without_a_region_resolves_degraded(package: Any) -> None:
    with HybridClient(
        package[0],
        public_key=package[1],
        regions=[{"name": "gone", "endpoint": "http://127.0.0.1:9", "model": "digits_cloud"}],
        probe_interval=None,
        threshold=1.0,
        escalation={"escalate": "background", "deadline": 2.0},
    ) as c:
        r = c.infer({"input": val_inputs(1)})
        assert r.reason == "background"
        late = r.cloud_future.result(30)  # type: ignore[union-attr]
        assert late.degraded
        assert late.reason == "cloud_failed"
        assert "gone" in late.errors
        assert c.escalation.stats()["background_failed"] == 1


def test_rate_limit_caps_escalations_per_device(package: Any, region: Any) -> None:
    with _client(package, region, threshold=1.0, escalation={"rate_limit": 0.001, "burst": 2}) as c:
        rs = [c.infer({"input": val_inputs(1)}) for _ in range(5)]
        assert [r.reason for r in rs] == ["low_confidence"] * 2 + ["rate_limited"] * 3
        assert all(r.degraded and "rate_limit" in r.errors for r in rs[2:])
        bg = c.infer({"input": val_inputs(1)}, escalate="background")  # the same tokens
        assert bg.reason == "rate_limited"
        assert bg.cloud_future is None
        assert c.escalation.stats()["rate_limited"] == 4


def test_audits_sample_confident_answers_and_report_agreement(package: Any, region: Any) -> None:
    x = val_inputs(40)
    with _client(
        package, region, threshold=0.0, escalation={"audit_rate": 1.0, "max_queue": 64}
    ) as c:
        rs = [c.infer({"input": x[i : i + 1]}) for i in range(40)]
        assert all(r.reason == "confident" for r in rs)  # audits never change the answer
        for r in rs:
            assert r.cloud_future is not None
            assert r.cloud_future.result(30).reason == "audit"
        a = c.escalation.stats()["audits"]
    import onnxruntime as ort

    e = ort.InferenceSession(str(ROOT / "samples" / "models" / "digits_edge.onnx"))
    k = ort.InferenceSession(str(CLOUD))
    same = int(
        (
            e.run(None, {"input": x})[0].argmax(1)
            == k.run(None, {"input": x.reshape(40, 1, 8, 8)})[0].argmax(1)
        ).sum()
    )
    assert a["sent"] == 40
    assert a["agreed"] == same
    assert a["disagreed"] == 40 - same
    assert a["agreement"] == pytest.approx(same / 40)
    with _client(package, region, threshold=0.0, escalation={"audit_rate": 0.0}) as c:
        assert c.infer({"input": x[:1]}).cloud_future is None


def test_a_full_background_queue_drops_and_counts(package: Any, region: Any) -> None:
    """One worker, a queue of 2, a slow region: a burst is dropped, never queued unbounded."""
    from tests.fixtures.servers import make_repository, running_cloud_server

    x = {"input": val_inputs(1)}
    repo = make_repository(package[0].parent / "slow", {"digits_cloud": CLOUD})
    with running_cloud_server(repo, region="slow", subprocess=False, latency_ms=300) as slow:
        with _client(
            package, slow, threshold=1.0,
            escalation={"escalate": "background", "max_queue": 2, "audit_rate": 0.0},
        ) as c:  # fmt: skip
            rs = [c.infer(x) for _ in range(10)]
            late = [r.cloud_future.result(30) for r in rs]  # type: ignore[union-attr]
            st = c.escalation.stats()
    assert st["background_dropped"] >= 6
    assert st["background_sent"] + st["background_dropped"] == 10
    dropped = [r for r in late if r.degraded]
    assert len(dropped) == st["background_dropped"]
    assert all("queue full" in str(r.errors["background"]) for r in dropped)
    assert sum(r.region == "near" for r in late) == st["background_answered"] >= 1


def test_background_escalation_copies_the_inputs(package: Any) -> None:
    """The caller may reuse its array at once: the cloud answers the row as it was."""
    import onnxruntime as ort

    from tests.fixtures.servers import make_repository, running_cloud_server

    x = val_inputs(2)
    want = ort.InferenceSession(str(CLOUD)).run(None, {"input": x.reshape(2, 1, 8, 8)})[0]
    repo = make_repository(package[0].parent / "slow2", {"digits_cloud": CLOUD})
    with running_cloud_server(repo, region="slow", subprocess=False, latency_ms=200) as slow:
        with _client(package, slow, threshold=1.0, escalation={"escalate": "background"}) as c:
            buf = x[:1].copy()
            r = c.infer({"input": buf})
            buf[:] = x[1:2]  # overwritten while the escalation is still queued or in flight
            cloud = r.cloud_future.result(30)  # type: ignore[union-attr]
    assert cloud.region == "near"
    assert np.allclose(cloud.outputs["logits"], want[:1], atol=1e-5)


def test_escalation_controls_from_the_config_file(tmp_path: Path, package: Any) -> None:
    from edgecloud.config import load_config

    cfg = tmp_path / "client.toml"
    body = (
        f'[model]\npackage = "{package[0]}"\npublic_key = "{package[1]}"\n'
        '[routing]\nescalate = "background"\naudit_rate = 0.25\nescalation_rate_limit = 2.0\n'
        "probe_interval = 60.0\n"
    )
    cfg.write_text(body)
    with HybridClient.from_config(cfg) as c:
        e = c.escalation
        assert (e.mode, e.audit_rate) == ("background", 0.25)
        assert e.limiter is not None
        assert e.limiter.rate == 2.0
    cfg.write_text(body.replace("0.25", "1.5"))
    with pytest.raises(ConfigError, match=r"\[routing\]: audit_rate must be a number in \[0, 1\]"):
        load_config(cfg)
    cfg.write_text(body.replace('"background"', '"later"'))
    with pytest.raises(ConfigError, match=r"\[routing\]: escalate must be one of"):
        load_config(cfg)
