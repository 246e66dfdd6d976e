"""Package downloads over real HTTP: resumed with Range after an interruption; a hung download
is abandoned by the watchdog and does not block the next job."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from device_agent.store import download
from edgecloud.errors import StoreError
from tests.fixtures.agent_util import (
    Keys,
    Observer,
    make_package,
    send_job,
    start_agent,
    write_config,
)
from tests.fixtures.broker import MosquittoBroker
from tests.fixtures.package_server import PackageServer

pytestmark = pytest.mark.mqtt


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
