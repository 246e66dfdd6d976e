"""Deploy and rollback: the model store's transaction, and what activation means for serving.

The store does the install (fetch -> unpack + verify -> load -> health check -> promote ->
activate, or nothing: ``ModelStore.install``); this module turns a job's document into that
call and defines *activate*: swap the client to the new backend, retire the old one once its
requests are done, and announce the new version (status, reported state).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from device_agent.serving import AgentClient, load_model
from device_agent.store import ModelStore, PackageSource, health_check
from device_agent.watchdog import JobOutcome, Progress, Rejected
from edgecloud.errors import EdgeCloudError, StoreError
from edgecloud.fleet.messages import ExecutionState
from edgecloud.package import ModelPackage
from edgecloud.runtime.base import Backend

__all__ = ["Installer", "check_deploy_document"]

log = logging.getLogger("device_agent")


def check_deploy_document(doc: Mapping[str, Any]) -> str:
    """The package URL of a deploy document, after checking its fields' types (``Rejected``)."""
    url = doc.get("package_url")
    if not isinstance(url, str) or not url:
        raise Rejected("deploy document: 'package_url' must be a non-empty string")
    for f in ("sha256", "version", "model"):
        if f in doc and not isinstance(doc[f], str):
            raise Rejected(f"deploy document: '{f}' must be a string, got {doc[f]!r}")
    size = doc.get("size")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 0):
        raise Rejected(f"deploy document: 'size' must be a byte count, got {size!r}")
    return url


class Installer:
    """Installs packages into ``store`` and makes ``client`` serve them.

    ``announce()`` runs after every activation (the agent publishes status and reported state).
    """

    def __init__(
        self,
        store: ModelStore,
        client: AgentClient,
        *,
        announce: Callable[[], None],
        download_timeout_s: float,
        lock_timeout_s: float,
        retire_after_s: float,
    ) -> None:
        self.store = store
        self.client = client
        self._announce = announce
        self.download_timeout_s = download_timeout_s
        self.lock_timeout_s = lock_timeout_s
        self.retire_after_s = retire_after_s

    def activate(self, slot: str, pkg: ModelPackage, backend: Backend) -> None:
        """Serve ``backend`` now; the old one finishes its requests in the background."""
        old = self.client.swap_model(backend, pkg.manifest)
        if old is not None:
            threading.Thread(
                target=self.client.retire,
                args=(old, self.retire_after_s),
                name="agent-retire",
                daemon=True,
            ).start()
        self._announce()

    def load_active(self, note_error: Callable[[str], None]) -> None:
        """Serve what the pointer names; fall back to the previous slot if it is damaged."""
        try:
            p = self.store.pointer()
        except StoreError as exc:
            note_error(str(exc))
            return
        if p is None:
            return
        for slot in (p.slot, p.previous):
            if slot is None:
                continue
            try:
                pkg = self.store.verify_slot(slot)
                backend = load_model(pkg)
                health_check(backend, pkg)
            except EdgeCloudError as exc:
                note_error(f"slot {slot} cannot be served: {exc}")
                continue
            if slot != p.slot:
                self.store.set_active(slot, pkg)
            self.client.swap_model(backend, pkg.manifest)
            log.info("serving %s %s from slot %s", pkg.manifest.name, pkg.manifest.version, slot)
            return

    def deploy(
        self,
        source: PackageSource,
        progress: Progress,
        *,
        size: int | None = None,
    ) -> JobOutcome:
        """Install ``source`` unless it is what already runs; SUCCEEDED with its figures."""
        if size is not None:
            progress.enter("download")
            self.store.check_space(size)  # refuse before the first byte, not halfway
        m = self.client.manifest
        v, model = source.version, source.model
        if m is not None and v and m.version == v and (not model or m.name == model):
            return JobOutcome(ExecutionState.SUCCEEDED, "already active", {"version": v})
        installed = self.store.install(
            source,
            load=load_model,
            activate=self.activate,
            on_step=progress.enter,
            lock_timeout=self.lock_timeout_s,
        )
        man = installed.package.manifest
        return JobOutcome(
            ExecutionState.SUCCEEDED,
            "",
            {
                "model": man.name,
                "version": man.version,
                "slot": installed.slot,
                "health": installed.health,
            },
        )

    def source(
        self,
        url: str,
        key: str,
        doc: Mapping[str, Any],
        progress: Progress,
        *,
        deadline: float | None = None,
        model_field: str = "model",
    ) -> PackageSource:
        """What a job's (or a desired state's) document asks to install."""
        return PackageSource(
            url=url,
            key=key,
            sha256=doc.get("sha256"),
            version=doc.get("version"),
            model=doc.get(model_field),
            timeout=self.download_timeout_s,
            # a package server that goes away (a controller restart) is waited for, keeping
            # the .part, until shortly before the job's in-progress timeout
            deadline=None if deadline is None else deadline - 1.0,
            cancelled=lambda: progress.cancelled,
        )

    def rollback(self, version: Any, progress: Progress) -> JobOutcome:
        installed = self.store.rollback(
            None if version is None else str(version),
            load=load_model,
            activate=self.activate,
            on_step=progress.enter,
        )
        return JobOutcome(
            ExecutionState.SUCCEEDED,
            "",
            {
                "version": installed.package.manifest.version,
                "slot": installed.slot,
                "from": installed.replaced,
            },
        )


def job_deadline(timeout_s: float, step_timeout_s: float) -> float:
    """When a job's download must give up: its own timeout or the agent's step timeout."""
    return time.monotonic() + min(timeout_s, step_timeout_s)
