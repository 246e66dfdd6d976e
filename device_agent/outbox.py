"""The outbox sender: the durable queue published in order, at least once.

One thread publishes the rows of the ``DurableQueue`` oldest first, at most ``window``
unacknowledged at a time; a row is deleted only on its PUBACK. At every new connection
(``restart()``, at CONNACK) it starts again from the oldest unacknowledged row, so delivery is
at-least-once and in order, and a PUBACK of the previous connection can never delete a row.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from paho.mqtt.reasoncodes import ReasonCode

from device_agent.queue import DurableQueue
from edgecloud.errors import TransportError

__all__ = ["Outbox"]

log = logging.getLogger("device_agent")

#: ``publish(topic, payload, retain=..., on_ack=...)``; raises TransportError while down.
Publish = Callable[..., int]


class Outbox:
    """``wake()`` when rows were added or the link came up; ``restart()`` at each CONNACK."""

    def __init__(
        self,
        queue: DurableQueue,
        publish: Publish,
        *,
        connected: Callable[[], bool],
        window: int,
        on_refused: Callable[[str], None] = lambda text: None,
    ) -> None:
        self.queue = queue
        self._publish = publish
        self._connected = connected
        self.window = window
        self._on_refused = on_refused
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._inflight: set[int] = set()  # row ids published on this connection, not yet acked
        self._cursor = 0  # highest row id published on this connection
        self._epoch = 0  # connections so far
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="agent-sender", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def wake(self) -> None:
        self._wake.set()

    def restart(self) -> None:
        """A new connection: forget what was in flight, resend from the oldest row."""
        with self._lock:
            self._inflight.clear()
            self._cursor = 0
            self._epoch += 1

    @property
    def inflight(self) -> int:
        with self._lock:
            return len(self._inflight)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(0.2)
            self._wake.clear()
            if self._connected():
                self.send_some()

    def send_some(self) -> int:
        """Publish what the window allows now; returns how many rows were published."""
        with self._lock:
            room = self.window - len(self._inflight)
            cursor = self._cursor
            epoch = self._epoch
        if room <= 0:
            return 0
        sent = 0
        for item in self.queue.peek(after_id=cursor, limit=room):
            if not self._connected():
                break
            with self._lock:
                if self._epoch != epoch:
                    break  # reconnected meanwhile: start over from the oldest row
                self._inflight.add(item.id)
            try:
                mid = self._publish(
                    item.topic,
                    item.payload,
                    retain=item.retain,
                    on_ack=lambda rc, row=item.id, ep=epoch: self._acked(row, ep, rc),
                )
            except TransportError as exc:
                log.debug("outbox row %d not published: %s", item.id, exc)
                with self._lock:
                    self._inflight.discard(item.id)
                break
            log.debug("outbox row %d -> mid %s", item.id, mid)
            sent += 1
            with self._lock:
                if self._epoch != epoch:
                    break
                self._cursor = max(self._cursor, item.id)
        return sent

    def _acked(self, row: int, epoch: int, rc: ReasonCode) -> None:
        """On the loop thread at PUBACK (or on the sender's, when the PUBACK came first)."""
        if rc.is_failure:
            self._on_refused(f"broker refused a publish: {rc}")
        with self._lock:
            if epoch != self._epoch or row not in self._inflight:
                return  # an ack from an earlier connection: the row is resent on this one
            self._inflight.discard(row)
        self.queue.ack(row)
        self._wake.set()
