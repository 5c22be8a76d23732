"""A corpus's windows in model calls, decoding the next files meanwhile; across file boundaries where allowed.

Files are decoded and cut into windows by a small pool of threads, a few files ahead; the model takes windows
in file order, ``batch_size`` at a time, and a file's result is given as soon as its last window has run. Across
files (the default), a call takes its windows whatever file they come from: only for models whose scores do not
depend on the other windows of a call (``ModelInfo.batch_independent``: fp32, fp16, static or per-row int8). Each
file then gets the scores it gets alone, and a killed and resumed run ends with the same results as an
uninterrupted one. Per file, a call holds one file's windows only, as ``Analyzer.chunk_scores`` would run them.
Either way one call runs at a time: two files' calls at once on one session made each slower
(docs/corpus-speed.md). A model call that fails marks every file with a window in it for retry; decoding and
feature errors are the file's own, as in ``analyze_one``.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from runtime.analyze import build_analysis
from runtime.constants import NUM_DIMENSIONS
from runtime.corpus.floor import Work
from runtime.corpus.outcome import failure, named_error
from runtime.errors import AudioError, InputError, ModelOutputError

logger = logging.getLogger(__name__)

DEFAULT_AHEAD = 4  # files decoded ahead of the model (memory: their windows wait, 64 KiB each)


@dataclass
class _Open:
    """A decoded file whose windows are (partly) still to run."""

    name: str
    windows: np.ndarray
    duration: float
    next_row: int = 0  # first window not yet sent to the model
    scores: list[np.ndarray] = field(default_factory=list)
    done_rows: int = 0


def _prepare(analyzer, name: str, work: Work) -> _Open | dict:
    try:
        with work.preparing():
            windows, duration = analyzer.prepare_file(name)
        return _Open(name, windows, duration)
    except (AudioError, InputError, ModelOutputError) as exc:
        return failure(name, named_error(name, str(exc)))
    except Exception as exc:
        logger.exception("decoding %s failed", name)
        return failure(name, named_error(name, f"{type(exc).__name__}: {exc}"), retry=True)


def batched_results(analyzer, work: Work | None = None, *, decoders: int = 1, ahead: int = DEFAULT_AHEAD,
                    across_files: bool = True):
    """A ``Results`` source (runtime.corpus.runner) that runs one model call at a time, filled across files
    (``across_files``) or with one file's windows.

    ``decoders`` threads decode and compute features, at most ``ahead`` files ahead of the model.
    """
    if across_files and not analyzer.model.info.batch_independent:
        raise ValueError(f"{analyzer.model.info.version}: its scores depend on their batch neighbours "
                         "(int8 with one activation scale per call): batch per file instead")
    work = work if work is not None else Work()

    def run(files) -> Iterator[dict]:
        model = analyzer.model.info.summary()
        todo = iter(files)
        with ThreadPoolExecutor(decoders, thread_name_prefix="corpus-decode") as pool:
            coming: deque[Future] = deque()

            def refill() -> None:
                while len(coming) < ahead and (f := next(todo, None)) is not None:
                    coming.append(pool.submit(_prepare, analyzer, f.path, work))

            refill()
            opened: deque[_Open] = deque()
            while coming or opened:
                while coming and sum(len(o.windows) - o.next_row for o in opened) < analyzer.batch_size:
                    got = coming.popleft().result()
                    refill()
                    if isinstance(got, dict):
                        yield got
                    else:
                        opened.append(got)
                yield from _run_call(analyzer, opened, model, work, across_files)

    return run


def _run_call(analyzer, opened: deque[_Open], model: dict, work: Work, across_files: bool) -> Iterator[dict]:
    """One model call over the next windows of the open files (of the first only, unless ``across_files``); the
    results of the files it completes."""
    parts, size = [], 0
    for o in opened:
        take = min(len(o.windows) - o.next_row, analyzer.batch_size - size)
        if take > 0:
            parts.append((o, o.next_row, take))
            size += take
            if not across_files:
                break
    if size:
        batch = np.concatenate([o.windows[start : start + n] for o, start, n in parts])
        began = time.perf_counter()
        try:
            scores = analyzer.model.run(batch)
        except Exception as exc:
            logger.exception("a model call over %d files failed", len(parts))
            failed = {id(o) for o, _, _ in parts}
            for o, _, _ in parts:
                yield failure(o.name, named_error(o.name, f"{type(exc).__name__}: {exc}"), retry=True)
            for o in [o for o in opened if id(o) in failed]:
                opened.remove(o)
            return
        work.ran(size, time.perf_counter() - began)
        offset = 0
        for o, start, n in parts:
            o.scores.append(scores[offset : offset + n])
            o.next_row, o.done_rows, offset = start + n, o.done_rows + n, offset + n
    while opened and opened[0].done_rows == len(opened[0].windows):
        o = opened.popleft()
        rows = np.concatenate(o.scores) if o.scores else np.zeros((0, NUM_DIMENSIONS), np.float32)
        try:
            yield {"file": o.name, **build_analysis(rows, o.duration).to_dict(), "model": model, "error": None}
        except ModelOutputError as exc:  # NaN scores: final, a retry would give them again
            yield failure(o.name, named_error(o.name, str(exc)))

