"""The batcher is fair (windows taken from waiting requests in turn), each caller gets its own exception, and
close() cannot race with the worker settling a caller's future. Over a fake model (tests/test_batching.py)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future

import numpy as np
import pytest

pytest.importorskip("fastapi")
from test_batching import SHAPE, Fake, in_threads, windows  # noqa: E402

import runtime.serve.batcher as batcher_module  # noqa: E402
from runtime.serve.batcher import Batcher, BatcherClosed  # noqa: E402


class Recording(Fake):
    """The fake model that also keeps each call's windows, to tell which call served which request."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.batches: list[np.ndarray] = []

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.batches.append(x.copy())
        return super().__call__(x)

    def last_call(self, x: np.ndarray) -> int:
        """The 1-based number of the last call that held any of the windows `x`."""
        return max(n for n, batch in enumerate(self.batches, 1) if np.isin(x[:, 0], batch[:, 0]).any())


def test_a_short_request_is_not_held_behind_a_long_ones_windows():
    """A 300-window recording waits first, a 2-window one just after: the short one's rows are in the next call
    (today it waited for all ten of the long one's calls)."""
    hold = threading.Event()
    fake = Recording(hold=hold)
    b = Batcher(fake, wait_ms=0, max_chunks=32, item_shape=SHAPE, outputs=2)
    try:
        first = threading.Thread(target=b.predict, args=(windows(1, 0),))
        first.start()
        while not fake.calls:  # a call is running (held): the long and the short request queue behind it
            time.sleep(0.005)
        long_x, short_x = windows(300, 1), windows(2, 2)
        done: dict[str, np.ndarray] = {}

        def call(name, x):
            done[name] = b.predict(x)

        long_t = threading.Thread(target=call, args=("long", long_x))
        long_t.start()
        while b._queued < 300:
            time.sleep(0.005)
        short_t = threading.Thread(target=call, args=("short", short_x))
        short_t.start()
        while b._queued < 302:
            time.sleep(0.005)
        hold.set()
        for t in (first, long_t, short_t):
            t.join(30)
        for name, x in (("long", long_x), ("short", short_x)):
            np.testing.assert_array_equal(done[name], np.stack([x.sum(axis=1), x[:, 0]], axis=1))
        assert fake.last_call(short_x) == 2  # the held call, then one shared call: not behind 300 windows
        assert fake.calls[1][1] == 32  # that call was full: the short request's 2 windows and 30 of the long one's
        assert fake.last_call(long_x) == 2 + (300 - 30 + 31) // 32
    finally:
        b.close()


def test_windows_are_taken_in_turn_when_more_requests_wait_than_a_call_holds():
    """Two 9-window requests and four 1-window ones wait for calls of 4: the 1-window ones are served within the
    next two calls (today: behind all 18 windows of the first two), and every call is full until the last."""
    hold = threading.Event()
    fake = Recording(hold=hold)
    b = Batcher(fake, wait_ms=0, max_chunks=4, item_shape=SHAPE, outputs=2)
    sizes = (9, 9, 1, 1, 1, 1)
    inputs = [windows(n, 10 + i) for i, n in enumerate(sizes)]
    done: list = [None] * len(sizes)

    def call(i):
        done[i] = b.predict(inputs[i])

    try:
        first = threading.Thread(target=b.predict, args=(windows(1, 0),))
        first.start()
        while not fake.calls:
            time.sleep(0.005)
        threads = []
        for i in range(len(sizes)):  # submitted in this order
            threads.append(threading.Thread(target=call, args=(i,)))
            threads[-1].start()
            while b._queued < sum(sizes[: i + 1]):
                time.sleep(0.005)
        hold.set()
        for t in (first, *threads):
            t.join(30)
        assert [rows.shape for rows in done] == [(n, 2) for n in sizes], done
        assert [fake.last_call(x) for x in inputs[2:]] == [2, 2, 3, 3]
        assert [n for _, n in fake.calls] == [1, 4, 4, 4, 4, 4, 2]
    finally:
        b.close()


def test_each_caller_gets_its_own_exception_object():
    hold = threading.Event()
    fake = Fake(fail_on={2}, hold=hold)
    b = Batcher(fake, wait_ms=0, max_chunks=64, item_shape=SHAPE, outputs=2)
    try:
        first = threading.Thread(target=b.predict, args=(windows(1, 9),))
        first.start()
        while not fake.calls:
            time.sleep(0.005)
        results: list = []
        waiters = threading.Thread(target=lambda: results.extend(in_threads(b.predict, [windows(2, i)
                                                                                        for i in range(3)])))
        waiters.start()
        while b._queued < 6:
            time.sleep(0.005)
        hold.set()
        waiters.join(30)
        first.join(30)
        assert all(isinstance(r, RuntimeError) and str(r) == "CUDA failure in call 2" for r in results), results
        assert len({id(r) for r in results}) == 3  # three objects: no traceback gathers other threads' frames
        assert all(r.__cause__ is results[0].__cause__ is not None for r in results)  # the one failure, as cause
    finally:
        b.close()


def test_close_cannot_settle_a_future_between_the_workers_check_and_its_set(monkeypatch):
    """close() runs exactly between the worker's `not done()` and its set_exception (forced by a future whose
    done() hands over to close), for a request still pending (its first call of three failed): the worker must
    neither crash (InvalidStateError) nor leave its caller waiting."""
    armed, closer = threading.Event(), []

    class RacyFuture(Future):
        def done(self):
            answer = super().done()
            in_worker = threading.current_thread().name == "percepiano-batcher"
            if armed.is_set() and in_worker and fake.calls and not answer:  # after the model call: settling
                armed.clear()
                closer.append(threading.Thread(target=batcher.close, kwargs={"timeout": 5}))
                closer[0].start()
                closer[0].join(0.5)  # close() settles the future now, unless the worker holds the lock
            return answer

    monkeypatch.setattr(batcher_module, "Future", RacyFuture)
    worker_errors: list = []
    monkeypatch.setattr(threading, "excepthook", lambda args: worker_errors.append(args.exc_value))
    fake = Fake(fail_on={1})
    batcher = Batcher(fake, wait_ms=0, max_chunks=4, item_shape=SHAPE, outputs=2)
    armed.set()
    result = in_threads(batcher.predict, [windows(10, 1)])[0]
    closer[0].join(10)
    assert not worker_errors, worker_errors
    assert isinstance(result, BatcherClosed | RuntimeError), result
    assert not batcher._worker.is_alive()
