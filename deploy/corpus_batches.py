"""The corpus worker's cross-file batching, plain Python (no Modal): deploy/modal_app.py's CorpusWorker uses it."""

from __future__ import annotations

import threading
from typing import Any

BATCH_WAIT_MS = 50.0  # how long a call may wait for the windows of a file still decoding


class CorpusBatches:
    """The corpus worker's concurrent files, their windows in shared model calls where the scores allow it.

    For a model whose scores do not depend on their batch neighbours (``ModelInfo.batch_independent``: fp32,
    fp16, static or per-row int8) the windows of the files in flight go through one runtime.serve.batcher.Batcher: full
    calls of the analyzer's batch size across files, each file still getting the scores it gets alone. A call
    waits at most BATCH_WAIT_MS for a file that is still decoding. Any other model runs each file in its
    own calls, as before. Plain Python (no Modal): tests drive it directly.
    """

    def __init__(self, analyzer, wait_ms: float = BATCH_WAIT_MS) -> None:
        from runtime.constants import NUM_DIMENSIONS
        from runtime.serve.batcher import Batcher

        self.analyzer, self.running, self._lock = analyzer, 0, threading.Lock()
        model = analyzer.model
        self.batcher = Batcher(model.run, wait_ms=wait_ms, max_chunks=analyzer.batch_size,
                               item_shape=model.input_shape, outputs=NUM_DIMENSIONS,
                               active=lambda: self.running) if model.info.batch_independent else None

    def analyze(self, name: str, source, cap_seconds: float | None = None) -> dict[str, Any]:
        """runtime.corpus.runner.analyze_one, its windows through the shared batcher (if any)."""
        from runtime.corpus.runner import analyze_one

        with self._lock:
            self.running += 1
        try:
            return analyze_one(self.analyzer, name, source, cap_seconds,
                               infer=self.batcher.predict if self.batcher else None)
        finally:
            with self._lock:
                self.running -= 1
