"""A small client of the controller's HTTP API, used by ``edgecloud fleet`` and by scripts.

HTTP failures are translated here, once: no connection -> ``ConnectionFailed`` (naming the
controller URL and the env variable that sets it), timeout -> ``TransportTimeout``, 400 ->
``ConfigError`` (bad input, exit code 2 in the CLI), 401 -> ``AuthError``, 404/409 and other
refusals -> ``FleetError`` carrying the controller's own message.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import httpx

from edgecloud import environment
from edgecloud.errors import (
    AuthError,
    ConfigError,
    ConnectionFailed,
    FleetError,
    ProtocolError,
    TransportTimeout,
)

__all__ = ["DEFAULT_CONTROLLER", "ControllerClient"]

DEFAULT_CONTROLLER = "http://127.0.0.1:8780"
ENV_CONTROLLER = environment.CONTROLLER.name
ENV_TOKEN = environment.FLEET_TOKEN.name


class ControllerClient:
    def __init__(
        self, base_url: str | None = None, *, token: str | None = None, timeout: float = 10.0
    ) -> None:
        self.base_url = (base_url or environment.controller_url() or DEFAULT_CONTROLLER).rstrip("/")
        if not self.base_url.startswith(("http://", "https://")):
            raise ConfigError(
                f"controller URL {self.base_url!r} must start with http:// or https://"
            )
        token = token if token is not None else environment.fleet_token()
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout, headers=headers)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ControllerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        *,
        content: Any = None,
        headers: dict[str, str] | None = None,
    ) -> Any:
        try:
            if content is not None:
                r = self._http.request(method, path, content=content, headers=headers)
            else:
                r = self._http.request(method, path, json=body)
        except httpx.TimeoutException as exc:
            raise TransportTimeout(
                f"fleet controller {self.base_url} did not answer: {exc}"
            ) from exc
        except httpx.HTTPError as exc:
            raise ConnectionFailed(
                f"cannot reach the fleet controller at {self.base_url} ({exc}); "
                f"start it with `edgecloud fleet serve` or set --controller / {ENV_CONTROLLER}"
            ) from exc
        try:
            data = r.json()
        except ValueError as exc:
            raise ProtocolError(
                f"fleet controller {self.base_url}{path} answered {r.status_code} without JSON"
            ) from exc
        if r.status_code < 400:
            return data
        msg = data.get("error", r.text) if isinstance(data, dict) else r.text
        if r.status_code == 400:
            raise ConfigError(msg)
        if r.status_code == 401:
            raise AuthError(f"fleet controller: {msg} (set {ENV_TOKEN})", status=401)
        raise FleetError(msg)

    # -- reads -------------------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        return dict(self._call("GET", "/api/health"))

    def devices(self) -> list[dict[str, Any]]:
        return list(self._call("GET", "/api/devices"))

    def device(self, device_id: str) -> dict[str, Any]:
        return dict(self._call("GET", f"/api/devices/{device_id}"))

    def telemetry(self, device_id: str, after: int = -1) -> list[dict[str, Any]]:
        return list(self._call("GET", f"/api/devices/{device_id}/telemetry?after={after}"))

    def shadow(self, device_id: str) -> dict[str, Any]:
        return dict(self._call("GET", f"/api/devices/{device_id}/shadow"))

    def summary(self) -> dict[str, Any]:
        return dict(self._call("GET", "/api/summary"))

    def jobs(self) -> list[dict[str, Any]]:
        return list(self._call("GET", "/api/jobs"))

    def job(self, job_id: str) -> dict[str, Any]:
        return dict(self._call("GET", f"/api/jobs/{job_id}"))

    # -- writes ------------------------------------------------------------------------------
    def upload(self, package_dir: Path) -> dict[str, Any]:
        """Pack ``package_dir`` and send it to the controller's package store."""
        from edgecloud.package import pack_package

        with tempfile.TemporaryDirectory(prefix="edgecloud-upload-") as tmp:
            archive = pack_package(Path(package_dir), Path(tmp) / "package.tar.gz")
            with open(archive, "rb") as f:
                headers = {
                    "Content-Type": "application/gzip",
                    "Content-Length": str(archive.stat().st_size),
                }
                return dict(self._call("POST", "/api/packages", content=f, headers=headers))

    def deploy(
        self, package_dir: Path, targets: list[str], *, upload: bool = False, **options: Any
    ) -> dict[str, Any]:
        """Deploy a package directory: by its path (the controller reads it; same machine) or,
        with ``upload``, by sending it over HTTP first (the controller is elsewhere)."""
        body: dict[str, Any] = {"targets": targets, **options}
        if upload:
            stored = self.upload(package_dir)
            # the hash the upload returned: the job pins it, whatever the disk holds later
            body["package_ref"] = {
                "name": stored["name"],
                "version": stored["version"],
                "sha256": stored["sha256"],
            }
        else:
            body["package"] = str(Path(package_dir).resolve())
        return dict(self._call("POST", "/api/deploy", body))

    def rollback(
        self, targets: list[str], version: str | None = None, **options: Any
    ) -> dict[str, Any]:
        return dict(
            self._call("POST", "/api/rollback", {"targets": targets, "version": version, **options})
        )

    def cancel(self, job_id: str, *, force: bool = False) -> dict[str, Any]:
        return dict(self._call("POST", f"/api/jobs/{job_id}/cancel", {"force": force}))

    def set_policy(self, targets: list[str], policy: dict[str, Any]) -> list[dict[str, Any]]:
        return list(self._call("POST", "/api/policy", {"targets": targets, "policy": policy}))

    def update_shadow(
        self, device_id: str, desired: dict[str, Any], expected_version: int | None
    ) -> dict[str, Any]:
        return dict(
            self._call(
                "POST",
                f"/api/devices/{device_id}/shadow",
                {"desired": desired, "expected_version": expected_version},
            )
        )
