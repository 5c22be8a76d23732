"""This machine's floor for a corpus run: the model at full batches plus decoding and features, measured in the run.

A run that batched perfectly and never waited would take, per file, its decode and features plus its windows at
the full-batch speed of the model. ``Work`` counts both while the run goes (the CPU seconds of the threads that
decode and compute features, so that time spent waiting for a core the model holds is not counted), and
``FloorMeter`` times full batches of the model just before the files and again once they are done, keeping the
fastest call (on a shared machine the load comes and goes; the floor is what the machine can do). The floor in
audio hours per hour is

    audio seconds / (windows x full-batch seconds per window + decode and feature seconds)

and the run's own speed divided by it says how close the run came (1.0: as fast as this machine allows).
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

FLOOR_CALLS = 3  # full-batch calls timed before and after the files, after one warm-up call each time


@dataclass
class Work:
    """What a local run did besides waiting: windows run by the model, CPU seconds spent decoding + features."""

    windows: int = 0
    prepare_seconds: float = 0.0
    model_seconds: float = 0.0  # wall time inside the model's calls: how busy the run kept the model
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @contextmanager
    def preparing(self):
        """Count the CPU time of the calling thread inside the block as decode + features."""
        start = time.thread_time()
        try:
            yield
        finally:
            spent = time.thread_time() - start
            with self._lock:
                self.prepare_seconds += spent

    def ran(self, windows: int, seconds: float = 0.0) -> None:
        with self._lock:
            self.windows += windows
            self.model_seconds += seconds


@dataclass(frozen=True)
class Floor:
    """The floor of a run in audio hours per hour, and what it is made of."""

    audio_hours_per_hour: float
    model_ms_per_window: float  # at full batches
    batch_size: int
    windows: int
    prepare_seconds: float
    model_seconds: float = 0.0  # the run's own time inside model calls

    def to_dict(self) -> dict:
        return {"audio_hours_per_hour": self.audio_hours_per_hour, "model_ms_per_window": self.model_ms_per_window,
                "batch_size": self.batch_size, "windows": self.windows, "prepare_seconds": self.prepare_seconds,
                "model_seconds": self.model_seconds}


def full_batch_seconds(model, batch_size: int, calls: int = FLOOR_CALLS, seed: int = 0) -> list[float]:
    """Seconds per window of `calls` calls of the model at `batch_size` windows each (after one untimed call)."""
    rng = np.random.default_rng(seed)
    if len(model.input_shape) == 2:  # log-mel windows in dB (0 at each window's peak, floored at -80)
        windows = rng.uniform(-80.0, 0.0, (batch_size, *model.input_shape)).astype(np.float32)
    else:  # audio chunks
        windows = rng.uniform(-0.5, 0.5, (batch_size, *model.input_shape)).astype(np.float32)
    model.run(windows)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        model.run(windows)
        times.append((time.perf_counter() - start) / batch_size)
    return times


class FloorMeter:
    """Times the model at full batches before a run (``start``) and after it (``finish``): the run's floor."""

    def __init__(self, model, batch_size: int, work: Work) -> None:
        self.model, self.batch_size, self.work = model, batch_size, work
        self.per_window: list[float] = []

    def start(self) -> None:
        self.per_window += full_batch_seconds(self.model, self.batch_size)

    def finish(self, audio_seconds: float) -> Floor | None:
        """The floor for `audio_seconds` of audio given what `work` counted (None if nothing was run)."""
        if self.work.windows == 0 or audio_seconds <= 0:
            return None
        self.per_window += full_batch_seconds(self.model, self.batch_size)
        per_window = min(self.per_window)
        seconds = self.work.windows * per_window + self.work.prepare_seconds
        return Floor(audio_seconds / seconds, per_window * 1e3, self.batch_size, self.work.windows,
                     self.work.prepare_seconds, self.work.model_seconds)
