"""Cross-request batching: concurrent analyses' model windows merged into shared inference calls.

One worker thread owns the inference calls. A caller submits its windows and blocks until its own rows
come back; the worker merges what is pending into calls of at most ``max_chunks`` windows and scatters each
call's rows back by offset, so every caller gets the rows of its own windows, in order. A call takes windows
from the waiting requests in turn (one each, round after round, oldest first), so a request larger than a
call is split across calls and shares each with whoever else waits: a short request's latency does not grow
with a long one's length. A request served in a call that still has windows left goes to the back of the line.

The waiting rule (``wait_ms``): the worker runs at once unless more work is known to be coming. It waits
for more only while all of these hold:

* fewer windows are pending than ``max_chunks`` (a full call never waits);
* more analyses are active (``active()``, in the service: analyses running in its pool) than callers are
  inside ``predict`` (pending, or in the call now running): an active analysis that has not submitted yet is
  still decoding or computing features, and will submit soon;
* the oldest pending request was submitted less than ``wait_ms`` ago.

So a lone request (the only active analysis) never waits, and no request waits more than ``wait_ms`` for
others (it may still queue behind an inference call already running, as it would for the model anyway).

Every inference call, batched or not, is reported to ``observe(windows, requests)`` (the service's
histograms on /metrics). A failed call fails every request with rows in it, each with its own copy of the
exception (one object raised in many threads would gather their tracebacks); ``close()`` fails whatever is
still pending, so no caller is left waiting. Every future is settled under the lock, so close() and the
worker never both settle one.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future

import numpy as np

from runtime.errors import InputError

log = logging.getLogger(__name__)

Run = Callable[[np.ndarray], np.ndarray]  # (B, *item_shape) float32 -> (B, outputs) float32
Observe = Callable[[int, int], None]  # (windows in the call, requests with rows in it)


class BatcherClosed(RuntimeError):
    """The batcher was closed (the service is shutting down) before this request's windows ran."""


def run_in_batches(run: Run, windows: np.ndarray, batch_size: int, observe: Observe | None = None) -> np.ndarray:
    """The direct path: windows in calls of at most batch_size, each call reported to observe (one request)."""
    outs = []
    for i in range(0, len(windows), batch_size):
        part = windows[i : i + batch_size]
        outs.append(run(part))
        if observe is not None:
            observe(len(part), 1)
    return np.concatenate(outs)


class _Pending:
    """One caller's windows, the rows filled in so far, and the future its caller waits on."""

    def __init__(self, windows: np.ndarray, outputs: int):
        self.windows = windows
        self.taken = 0  # windows handed to a call so far
        self.left = len(windows)  # rows not yet back
        self.rows = np.empty((len(windows), outputs), np.float32)
        self.future: Future = Future()
        self.submitted = time.monotonic()


class Batcher:
    """Merges concurrent callers' windows into inference calls of at most ``max_chunks`` (see the module doc)."""

    def __init__(self, run: Run, *, wait_ms: float, max_chunks: int, item_shape: tuple[int, ...], outputs: int,
                 active: Callable[[], int] = lambda: 1, observe: Observe | None = None):
        if wait_ms < 0 or max_chunks < 1:
            raise ValueError(f"wait_ms must be >= 0 and max_chunks >= 1, got {wait_ms} and {max_chunks}")
        self.run, self.wait, self.max_chunks = run, wait_ms / 1000.0, max_chunks
        self.item_shape, self.outputs = tuple(item_shape), outputs
        self.active, self.observe = active, observe
        self._pending: deque[_Pending] = deque()
        self._queued = 0  # windows pending and not yet handed to a call
        self._inside = 0  # callers inside predict: submitted, their rows not yet back
        self._cond = threading.Condition()
        self._closed = False
        self.waited_calls = 0  # calls for which the worker waited for more requests (none while one is alone)
        # a daemon: a call stuck in the model cannot keep the process from exiting; close() joins it when it can
        self._worker = threading.Thread(target=self._loop, name="percepiano-batcher", daemon=True)
        self._worker.start()

    def predict(self, windows: np.ndarray) -> np.ndarray:
        """(n, *item_shape) windows -> (n, outputs) rows, run in shared calls; blocks until all are back."""
        windows = np.ascontiguousarray(windows, dtype=np.float32)
        if windows.shape[1:] != self.item_shape:  # checked here: one bad shape must not break a shared call
            raise InputError(f"expected windows of shape (n, {', '.join(map(str, self.item_shape))}), "
                             f"got {windows.shape}")
        if len(windows) == 0:
            return np.zeros((0, self.outputs), np.float32)
        item = _Pending(windows, self.outputs)
        with self._cond:
            if self._closed:
                raise BatcherClosed("the batcher is closed")
            self._pending.append(item)
            self._queued += len(windows)
            self._inside += 1
            self._cond.notify_all()
        try:
            return item.future.result()
        finally:
            with self._cond:
                self._inside -= 1

    def close(self, timeout: float = 10.0) -> None:
        """Stop: callers still pending get BatcherClosed at once; a call already running may finish (up to timeout)."""
        with self._cond:
            self._closed = True
            self._fail_pending()
            self._cond.notify_all()
        self._worker.join(timeout)

    def _fail_pending(self) -> None:
        for item in self._pending:
            if not item.future.done():
                item.future.set_exception(BatcherClosed("the service is shutting down"))
        self._pending.clear()
        self._queued = 0

    # --- the worker
    def _should_wait(self) -> bool:
        if self._closed or self._queued >= self.max_chunks:
            return False
        oldest = min(item.submitted for item in self._pending)
        return self._inside < self.active() and time.monotonic() < oldest + self.wait

    def _next_call(self) -> list[tuple[_Pending, int, int]] | None:
        """Wait for work (and, by the rule above, for more of it); take at most max_chunks windows. None: closed."""
        with self._cond:
            while True:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if self._pending and self._should_wait():
                    self.waited_calls += 1
                while self._pending and self._should_wait():
                    oldest = min(item.submitted for item in self._pending)
                    self._cond.wait(max(0.0, oldest + self.wait - time.monotonic()))
                if self._closed:
                    self._fail_pending()
                    return None
                for item in [i for i in self._pending if i.future.done()]:  # failed in an earlier call: drop it
                    self._pending.remove(item)
                    self._queued -= len(item.windows) - item.taken
                if self._pending:
                    break
            return self._take_in_turn()

    def _take_in_turn(self) -> list[tuple[_Pending, int, int]]:
        """Up to max_chunks windows, one from each pending request in turn (oldest first), round after round;
        served requests with windows left go to the back of the line. Called under the lock."""
        counts = dict.fromkeys(range(len(self._pending)), 0)
        room = self.max_chunks
        while room and any(i.taken + counts[n] < len(i.windows) for n, i in enumerate(self._pending)):
            for n, item in enumerate(self._pending):
                if room and item.taken + counts[n] < len(item.windows):
                    counts[n] += 1
                    room -= 1
        parts, served = [], []
        for n, item in enumerate(self._pending):
            if counts[n]:
                parts.append((item, item.taken, item.taken + counts[n]))
                item.taken += counts[n]
                served.append(item)
        rest = [i for i in self._pending if i not in served]
        self._pending = deque(rest + [i for i in served if i.taken < len(i.windows)])
        self._queued -= self.max_chunks - room
        return parts

    def _loop(self) -> None:
        try:
            while (parts := self._next_call()) is not None:
                self._run_call(parts)
        except BaseException:  # a bug in the worker itself: refuse new work and fail what waits, never hang
            log.exception("the batcher's worker failed; batching stops")
            with self._cond:
                self._closed = True
                self._fail_pending()
            raise

    def _run_call(self, parts: list[tuple[_Pending, int, int]]) -> None:
        """One inference call over the parts' windows; each caller's rows back, or the call's error to each."""
        try:
            windows = parts[0][0].windows[parts[0][1] : parts[0][2]] if len(parts) == 1 else \
                np.concatenate([item.windows[a:b] for item, a, b in parts])
            rows = np.asarray(self.run(windows))
            if rows.shape != (len(windows), self.outputs):
                raise RuntimeError(f"the model returned {rows.shape} for {len(windows)} windows")
            if self.observe is not None:
                self.observe(len(windows), len(parts))
        except BaseException as exc:  # (every caller in this call gets its own copy; the worker goes on)
            with self._cond:
                for item, _, _ in parts:
                    if not item.future.done():
                        item.future.set_exception(_own_copy(exc))
            return
        with self._cond:  # settled under the lock: close() cannot settle a future between check and set
            offset = 0
            for item, a, b in parts:
                item.rows[a:b] = rows[offset : offset + b - a]
                offset += b - a
                item.left -= b - a
                if item.left == 0 and not item.future.done():
                    item.future.set_result(item.rows)


def _own_copy(exc: BaseException) -> BaseException:
    """A caller's own exception object for a call's failure (the same type and message; the original as cause)."""
    try:
        own = copy.copy(exc)
    except Exception:  # an exception type that cannot be copied: a plain one that says what it was
        own = RuntimeError(f"the inference call failed: {type(exc).__name__}: {exc}")
    own.__traceback__ = None
    own.__cause__ = exc
    return own
