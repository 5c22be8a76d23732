"""Cross-request batching (runtime.serve.batcher): the same scores as alone, merged calls on /metrics, bounded waits.

Scores are compared at the project's fp32 tolerance (serving.assert_scores: 1e-6), not bit for bit: on the
CPU, onnxruntime scores a window in a batch of one up to 6e-8 differently from the same window in any larger
batch, where the bits are identical (the tiny model: batch sizes 2..64 against each other). The cause is the
graph's ReduceSum (the mean over tokens, [B, T, D] -> [B, D]): every op before it agrees bit for bit, its
output differs by 2e-5 (a sum, before the head's scaling). A lone ReduceSum over axis 1 of a [B, 64, 64]
tensor shows the same: B = 1 rows 2e-5 from B = 4's, B = 2 and B = 4 identical; onnxruntime's CPU kernel
sums in another order once the unit batch axis folds away. A one-window request alone runs at batch 1;
merged it does not. Nothing else in a merged call changes a request's rows.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from serving import assert_error, assert_scores, wait_ready  # noqa: E402

from runtime.analyze import Analyzer  # noqa: E402
from runtime.errors import ConfigError, InputError  # noqa: E402
from runtime.serve.app import Settings, create_app  # noqa: E402
from runtime.serve.batcher import Batcher, BatcherClosed  # noqa: E402
from runtime.serve.mel_input import encode_blob  # noqa: E402

N = 6  # concurrent requests
FLAC = {"content-type": "audio/flac"}
OCTET = {"content-type": "application/octet-stream"}


class Gated(Analyzer):
    """The tiny model's Analyzer whose analyses, while `gate` is set, wait until N of them are running at once.

    So the N requests are all active in the service before any submits its windows: the batcher's rule then
    waits for them (up to the bound), and the merge is certain rather than a matter of timing.
    """

    def __init__(self, model, parties: int):
        super().__init__(model)
        self.gate = False
        self.barrier = threading.Barrier(parties, timeout=30)

    def _score(self, *args, **kwargs):
        if self.gate:
            self.barrier.wait()
        return super()._score(*args, **kwargs)


def bodies(piano_clips) -> list[tuple[str, bytes, dict]]:
    """N requests of several sizes: real clips (7 windows each on the tiny set) and spectrograms of 1 and 3 windows."""
    rng = np.random.default_rng(3)
    clips = sorted(piano_clips, key=lambda p: p.stat().st_size)[:3]
    mels = [rng.uniform(-80, 0, (frames, 128)).astype(np.float32) for frames in (128, 128 + 2 * 86, 128)]
    return [*(("/v1/analyze", c.read_bytes(), FLAC) for c in clips),
            *(("/v1/analyze/mel", encode_blob(m), OCTET) for m in mels)]


def post_all(client, requests, concurrent: bool) -> list:
    answers: list = [None] * len(requests)

    def send(i: int) -> None:
        path, body, headers = requests[i]
        answers[i] = client.post(path, content=body, headers=headers)

    if not concurrent:
        for i in range(len(requests)):
            send(i)
        return answers
    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a request hung"
    return answers


def histogram(client, name: str) -> dict[str, float]:
    """{le: cumulative count, 'count': n, 'sum': s} of one histogram on /metrics."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(client.get("/metrics").text):
        if family.name == name:
            for sample in family.samples:
                if sample.name.endswith("_bucket"):
                    out[sample.labels["le"]] = sample.value
                elif sample.name.endswith(("_count", "_sum")):
                    out[sample.name.rsplit("_", 1)[1]] = sample.value
    assert out, f"{name} not on /metrics"
    return out


def test_concurrent_requests_score_as_sequential_ones_and_merge(analyzer, piano_clips):
    gated = Gated(analyzer.model, N)
    requests = bodies(piano_clips)
    direct = [analyzer.analyze_file(c).scores for c in sorted(piano_clips, key=lambda p: p.stat().st_size)[:3]]
    settings = Settings(batch_wait_ms=1000, max_batch_chunks=8, max_concurrency=N)  # 8: a clip's 7 get split
    with TestClient(create_app(gated, settings=settings)) as c:
        wait_ready(c)
        service = c.app.state.service
        assert service.batcher is not None
        sequential = post_all(c, requests, concurrent=False)
        assert service.batcher.waited_calls == 0  # each lone request ran at once, despite the 1 s bound
        alone = histogram(c, "percepiano_inference_batch_requests")
        assert alone["1.0"] == alone["count"] > 0  # one request per call while they came one by one
        gated.gate = True
        concurrent = post_all(c, requests, concurrent=True)
        for seq, con in zip(sequential, concurrent, strict=True):
            assert seq.status_code == con.status_code == 200, (seq.json(), con.json())
            s, k = seq.json(), con.json()
            assert_scores(k["scores"], s["scores"])
            assert len(k["timeline"]) == len(s["timeline"])
            for a, b in zip(k["timeline"], s["timeline"], strict=True):
                assert a["start_seconds"] == b["start_seconds"]
                assert_scores(a["scores"], b["scores"])
        for res, want in zip(concurrent, direct, strict=False):  # the clips: the same as the plain Analyzer
            assert_scores(res.json()["scores"], want)
        merged = histogram(c, "percepiano_inference_batch_requests")
        assert merged["1.0"] - alone["1.0"] < merged["count"] - alone["count"]  # some call held >= 2 requests
        chunks = histogram(c, "percepiano_inference_batch_chunks")
        assert chunks["8.0"] == chunks["count"]  # no call above max_batch_chunks
        assert chunks["4.0"] < chunks["8.0"]  # ... and some filled past half of it
        windows = sum(len(r.json()["timeline"]) for r in sequential)
        assert chunks["sum"] == 2 * windows  # every window ran once per round: nothing lost, nothing twice


def test_every_call_is_counted_with_batching_off(analyzer):
    mel = np.random.default_rng(0).uniform(-80, 0, (128 + 19 * 86, 128)).astype(np.float32)  # 20 windows
    with TestClient(create_app(analyzer, settings=Settings(batch_wait_ms=0))) as c:
        wait_ready(c)
        assert c.app.state.service.batcher is None
        res = c.post("/v1/analyze/mel", content=encode_blob(mel), headers=OCTET)
        assert res.status_code == 200 and len(res.json()["timeline"]) == 20
        chunks = histogram(c, "percepiano_inference_batch_chunks")
        assert (chunks["count"], chunks["sum"], chunks["4.0"], chunks["16.0"]) == (2, 20, 1, 2)  # 16 + 4
        requests = histogram(c, "percepiano_inference_batch_requests")
        assert requests["1.0"] == requests["count"] == 2


def test_auto_is_off_on_the_cpu_and_10_ms_on_cuda(analyzer):
    settings = Settings.from_env({})
    assert settings.batch_wait_ms is None
    assert (settings.batch_wait_for("cpu"), settings.batch_wait_for("cuda")) == (0.0, 10.0)
    assert Settings(batch_wait_ms=5).batch_wait_for("cpu") == 5
    with TestClient(create_app(analyzer, settings=settings)) as c:
        wait_ready(c)
        assert c.app.state.service.batcher is None  # the tiny model runs on the CPU here


@pytest.mark.parametrize(("env", "field", "value"), [
    ({"PERCEPIANO_BATCH_WAIT_MS": "auto"}, "batch_wait_ms", None),
    ({"PERCEPIANO_BATCH_WAIT_MS": "0"}, "batch_wait_ms", 0.0),
    ({"PERCEPIANO_BATCH_WAIT_MS": "12.5"}, "batch_wait_ms", 12.5),
    ({"PERCEPIANO_MAX_BATCH_CHUNKS": "64"}, "max_batch_chunks", 64),
])
def test_batching_settings_from_env(env, field, value):
    assert getattr(Settings.from_env(env), field) == value


@pytest.mark.parametrize(("env", "message"), [
    ({"PERCEPIANO_BATCH_WAIT_MS": "soon"}, "PERCEPIANO_BATCH_WAIT_MS='soon' is not a valid float or 'auto'"),
    ({"PERCEPIANO_BATCH_WAIT_MS": "-1"}, "PERCEPIANO_BATCH_WAIT_MS must be 'auto' or 0 .. 1000 ms"),
    ({"PERCEPIANO_BATCH_WAIT_MS": "5000"}, "PERCEPIANO_BATCH_WAIT_MS must be"),
    ({"PERCEPIANO_BATCH_WAIT_MS": "nan"}, "PERCEPIANO_BATCH_WAIT_MS must be"),
    ({"PERCEPIANO_MAX_BATCH_CHUNKS": "0"}, "PERCEPIANO_MAX_BATCH_CHUNKS must be 1 .. 1024"),
    ({"PERCEPIANO_MAX_BATCH_CHUNKS": "8.5"}, "PERCEPIANO_MAX_BATCH_CHUNKS='8.5' is not a valid int"),
])
def test_batching_settings_refused_clearly(env, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        Settings.from_env(env)


# ----------------------------------------------------------------------------- the batcher over a fake model

SHAPE = (4,)


class Fake:
    """A model whose rows identify their windows (row = [sum, first value]), recording each call."""

    def __init__(self, fail_on: set[int] | None = None, hold: threading.Event | None = None):
        self.calls: list[tuple[float, int]] = []  # (monotonic time, windows)
        self.fail_on, self.hold = fail_on or set(), hold

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.calls.append((time.monotonic(), len(x)))
        if self.hold is not None and len(self.calls) == 1:
            assert self.hold.wait(30)
        if len(self.calls) in self.fail_on:
            raise RuntimeError(f"CUDA failure in call {len(self.calls)}")
        return np.stack([x.sum(axis=1), x[:, 0]], axis=1)


def windows(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *SHAPE)).astype(np.float32)


def in_threads(fn, args: list) -> list:
    out: list = [None] * len(args)

    def call(i):
        try:
            out[i] = fn(args[i])
        except Exception as exc:  # noqa: BLE001  (compared by the test)
            out[i] = exc

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(args))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads), "a caller hung"
    return out


def test_split_and_merged_rows_go_back_to_their_callers():
    fake = Fake()
    active = 8
    b = Batcher(fake, wait_ms=200, max_chunks=3, item_shape=SHAPE, outputs=2, active=lambda: active)
    try:
        inputs = [windows(n, seed) for seed, n in enumerate((1, 2, 3, 4, 5, 7, 1, 10))]
        results = in_threads(b.predict, inputs)
        for x, rows in zip(inputs, results, strict=True):
            np.testing.assert_array_equal(rows, np.stack([x.sum(axis=1), x[:, 0]], axis=1))
        assert max(n for _, n in fake.calls) <= 3
        assert sum(n for _, n in fake.calls) == sum(len(x) for x in inputs)
        assert len(fake.calls) < sum(len(x) for x in inputs)  # merged, not one call per window
    finally:
        b.close()


def test_a_lone_request_never_waits():
    """The only active analysis runs at once: with a 60 s bound, a wait would keep the thread past its join."""
    fake = Fake()
    b = Batcher(fake, wait_ms=60_000, max_chunks=64, item_shape=SHAPE, outputs=2, active=lambda: 1)
    try:
        assert in_threads(b.predict, [windows(2, 0)])[0].shape == (2, 2)
        assert b.waited_calls == 0
    finally:
        b.close()


def test_the_wait_for_others_is_bounded():
    """Another analysis is active but never submits: the request runs once the bound has passed, not later."""
    fake = Fake()
    b = Batcher(fake, wait_ms=50, max_chunks=64, item_shape=SHAPE, outputs=2, active=lambda: 2)
    try:
        t0 = time.monotonic()
        b.predict(windows(2, 0))
        delay = fake.calls[0][0] - t0
        assert b.waited_calls == 1
        assert 0.05 <= delay < 0.05 + 5.0  # waited for the bound (a loose ceiling: only a hang would break it)
    finally:
        b.close()


def test_a_full_batch_runs_without_waiting():
    fake = Fake()
    b = Batcher(fake, wait_ms=60_000, max_chunks=4, item_shape=SHAPE, outputs=2, active=lambda: 5)
    try:
        assert in_threads(b.predict, [windows(4, 0)])[0].shape == (4, 2)  # full: no 60 s wait for the others
    finally:
        b.close()


def test_an_error_reaches_every_caller_in_the_call_and_the_batcher_goes_on():
    hold = threading.Event()
    fake = Fake(fail_on={2}, hold=hold)
    b = Batcher(fake, wait_ms=0, max_chunks=64, item_shape=SHAPE, outputs=2)
    try:
        first = threading.Thread(target=b.predict, args=(windows(1, 9),))
        first.start()
        while not fake.calls:  # the first call is running (held): the next three queue behind it
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
        assert len(fake.calls) == 2 and fake.calls[1][1] == 6  # the three merged into the failing call
        assert all(isinstance(r, RuntimeError) and str(r) == "CUDA failure in call 2" for r in results), results
        assert b.predict(windows(3, 5)).shape == (3, 2)  # the next call works
    finally:
        b.close()


def test_close_fails_pending_callers_and_refuses_new_ones():
    hold = threading.Event()
    fake = Fake(hold=hold)
    b = Batcher(fake, wait_ms=0, max_chunks=64, item_shape=SHAPE, outputs=2)
    running = threading.Thread(target=lambda: b.predict(windows(1, 0)))
    running.start()
    while not fake.calls:  # the first call is running (held)
        time.sleep(0.005)
    pending: list = []
    waiter = threading.Thread(target=lambda: pending.extend(in_threads(b.predict, [windows(1, 1)])))
    waiter.start()
    while b._queued < 1:
        time.sleep(0.005)
    b.close(timeout=0.1)  # the held call is still running: close does not wait for it beyond the timeout
    waiter.join(30)
    assert isinstance(pending[0], BatcherClosed)
    with pytest.raises(BatcherClosed):
        b.predict(windows(1, 2))
    hold.set()
    running.join(30)
    assert not running.is_alive()


def test_bad_window_shapes_are_refused_before_they_reach_a_shared_call():
    b = Batcher(Fake(), wait_ms=10, max_chunks=8, item_shape=SHAPE, outputs=2)
    try:
        with pytest.raises(InputError, match=r"expected windows of shape \(n, 4\)"):
            b.predict(np.zeros((2, 5), np.float32))
        assert b.predict(np.zeros((0, 4), np.float32)).shape == (0, 2)
    finally:
        b.close()


def test_a_failing_model_answers_500_to_every_concurrent_request(analyzer, piano_clips):
    gated = Gated(analyzer.model, 3)
    requests = bodies(piano_clips)[3:]  # the three spectrograms
    with TestClient(create_app(gated, settings=Settings(batch_wait_ms=1000, max_concurrency=3))) as c:
        wait_ready(c)
        batcher = c.app.state.service.batcher

        def broken(x):
            raise RuntimeError("CUDA failure")

        real, batcher.run = batcher.run, broken
        gated.gate = True
        for res in post_all(c, requests, concurrent=True):
            assert_error(res, 500, "internal_error")
        batcher.run, gated.gate = real, False
        path, body, headers = requests[0]
        assert c.post(path, content=body, headers=headers).status_code == 200  # still serving


# ----------------------------------------------------------------------------- the benchmark's structure

def test_concurrency_benchmark_section(tiny_model, piano_clips):
    from benchmarks.concurrency import concurrency_section, format_concurrency

    clip = min(piano_clips, key=lambda p: p.stat().st_size)
    section = concurrency_section(tiny_model, clip, 1, [1, 2], rounds=1)
    assert [(r["concurrency"], r["batching"]) for r in section["levels"]] == \
        [(1, "off"), (1, "on"), (2, "off"), (2, "on")]
    for row in section["levels"]:
        assert row["requests"] == row["concurrency"]
        assert row["requests_per_s"] > 0 and row["chunks_per_s"] > 0 and row["median_latency_s"] > 0
        assert row["chunks_per_s"] == pytest.approx(row["requests_per_s"] * section["chunks_per_request"])
        assert row["requests_per_call"] >= 1
    table = format_concurrency(section)
    assert table.count("\n| ") == 1 + 4 and "requests/s" in table  # header + a row per level and mode
