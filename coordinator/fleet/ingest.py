"""Batched writes of what devices send: one transaction, one fsync and one wake-up for hundreds of messages.

Why: paho delivers messages one at a time on its network thread; committing each one (an fsync per hello,
status and update) caps a coordinator at a few hundred messages per second, far below a fleet of 10,000.
The network thread validates a message and hands the write to :class:`BatchWriter`, whose own thread
applies everything queued so far in one :meth:`~coordinator.fleet.state.FleetState.transaction`, in the
order it arrived, and only then calls each item's ``done`` callback. The server acknowledges a QoS 1
message (PUBACK, paho's manual-ack mode) from that callback, so a message the broker considers delivered
is always committed: a coordinator killed with a batch in memory gets those messages again from its
persistent session.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from coordinator.fleet.state import FleetState, StatusRow, UpdateRow

log = logging.getLogger("fedge.ingest")

Op = Callable[[FleetState], Any]
Done = Callable[[Any], None]


@dataclass(frozen=True)
class _Item:
    what: UpdateRow | StatusRow | Op
    done: Done | None


class BatchWriter:
    """A thread that drains a queue of writes into batched transactions.

    Updates go through :meth:`FleetState.add_updates` (their result is STORED, DUPLICATE or NOT_OPEN; new ones
    join this ingester's running sum in the same transaction), statuses through :meth:`FleetState.set_device_states`
    (their result: whether the device is known), each run of consecutive ones as one group of a few statements;
    anything else is a function of the state.
    ``max_batch`` bounds a transaction; ``linger_s`` is how long a batch waits for company once the first item
    arrived (a little latency for far fewer commits)."""

    def __init__(self, state: FleetState, *, ingester: str = "coordinator", max_batch: int = 1000,
                 linger_s: float = 0.005, on_batch: Callable[[], None] | None = None) -> None:
        self.state = state
        self.ingester = ingester
        self.max_batch = max_batch
        self.linger_s = linger_s
        self.on_batch = on_batch
        self.batches = 0
        self.items = 0
        self.busy_s = 0.0  # time spent inside transactions (what ingestion costs the database)
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._submitted = 0
        self._completed = 0
        self._progress = threading.Condition()
        self._ended = False  # the thread has returned: nothing submitted from now on is ever committed
        self._thread = threading.Thread(target=self._run, name=f"fedge-writer-{ingester}", daemon=True)
        self._thread.start()

    def submit(self, what: UpdateRow | StatusRow | Op, done: Done | None = None) -> None:
        with self._progress:
            self._submitted += 1
        self._queue.put(_Item(what, done))

    def flush(self, timeout_s: float = 60.0) -> bool:
        """Wait until everything submitted so far is committed (and its callbacks ran). False when it was not:
        the timeout passed, or the writer had stopped (what came after is never acknowledged, so the broker
        delivers it again to the next session)."""
        with self._progress:
            target = self._submitted
            self._progress.wait_for(lambda: self._completed >= target or self._ended, timeout_s)
            return self._completed >= target

    def stop(self) -> None:
        """Commit what is queued, then end the thread. A second call returns at once."""
        self.flush()
        self._queue.put(None)
        self._thread.join(10)

    def _run(self) -> None:
        try:
            self._drain()
        finally:
            with self._progress:
                self._ended = True
                self._progress.notify_all()

    def _drain(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            deadline = time.monotonic() + self.linger_s
            while len(batch) < self.max_batch:
                try:
                    item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if item is None:
                    self._queue.put(None)  # stop after this batch
                    break
                batch.append(item)
            self._commit(batch)

    def _commit(self, batch: list[_Item]) -> None:
        t0 = time.perf_counter()
        try:
            with self.state.transaction():
                results = self._apply(batch)
        except Exception:
            log.exception("batch of %d writes failed; applying them one by one", len(batch))
            results = []
            for item in batch:
                try:
                    with self.state.transaction():
                        results.extend(self._apply([item]))
                except Exception:
                    log.exception("write dropped (not acknowledged, so the broker delivers it again)")
                    results.append(_FAILED)
        self.busy_s += time.perf_counter() - t0
        self.batches += 1
        self.items += len(batch)
        for item, result in zip(batch, results, strict=True):
            if item.done is not None and result is not _FAILED:
                try:
                    item.done(result)
                except Exception:
                    log.exception("callback after a committed write failed")
        with self._progress:
            self._completed += len(batch)
            self._progress.notify_all()
        if self.on_batch is not None:
            self.on_batch()

    def _apply(self, batch: list[_Item]) -> list[Any]:
        """Apply in arrival order; consecutive updates (or statuses) go to the database as one group."""
        results: list[Any] = []
        group: list[UpdateRow] | list[StatusRow] = []

        def flush_group() -> None:
            if group and isinstance(group[0], UpdateRow):
                results.extend(self.state.add_updates(group, self.ingester))  # type: ignore[arg-type]
            elif group:
                results.extend(self.state.set_device_states([(r.device_id, r.state) for r in group]))  # type: ignore[union-attr]
            group.clear()

        for item in batch:
            what = item.what
            if isinstance(what, UpdateRow | StatusRow):
                if group and type(group[0]) is not type(what):
                    flush_group()
                group.append(what)  # type: ignore[arg-type]
            else:
                flush_group()
                results.append(what(self.state))
        flush_group()
        return results


_FAILED = object()
