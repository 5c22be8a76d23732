"""Analyse a whole corpus: find the audio under folders, journal each file's result durably, resume, write reports.

    from runtime.corpus.runner import analyze_corpus
    summary = analyze_corpus(["recordings"], "report", model="artifacts/model.onnx", recursive=True)

The journal (``REPORT_DIR/journal.jsonl``) gets one JSON line per analysed file, flushed and fsynced, with the
file's path, size and modification time, the model and cap used, and the result or the error; a crash loses at
most the files in progress. A run over the same report folder skips the files whose entry still matches and
re-analyses changed ones. ``scores.csv``, ``timeline.csv`` and ``report.md`` are rebuilt from the journal at the
end of every run. ``run_corpus`` takes any source of results: ``local_results`` here, a deployed service's over
HTTP in ``runtime.corpus.remote`` (which records the endpoint that scored each file), the deployed Modal worker's
in ``deploy.modal_corpus``. Locally, a model whose scores do not depend on their batch neighbours runs its
windows in full calls across files (``runtime.corpus.batched``). The summary sets the run's speed beside
this machine's floor, measured in the same run (``runtime.corpus.floor``).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from runtime.corpus.floor import FloorMeter, Work
from runtime.corpus.outcome import failure, named_error
from runtime.corpus.report import CorpusSummary, write_outputs
from runtime.errors import AudioError, InputError, ModelOutputError

logger = logging.getLogger(__name__)

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3", ".m4a", ".aac", ".opus")  # what a folder walk picks up
JOURNAL_NAME = "journal.jsonl"
DEFAULT_WORKERS = 2  # locally: one thread decodes and computes features while the model runs

Results = Callable[[list["AudioFile"]], Iterable[dict]]


@dataclass(frozen=True)
class AudioFile:
    """One file of the corpus as found: ``path`` as written under the folder given, ``key`` resolved."""

    path: str
    key: str
    size: int
    mtime_ns: int


def find_audio(roots: Sequence[str | os.PathLike], *, recursive: bool = False) -> list[AudioFile]:
    """Audio files (by suffix) in the given folders, and the given files themselves, sorted by path."""
    found: dict[str, AudioFile] = {}
    for root in map(Path, roots):
        if root.is_dir():
            candidates = sorted(root.rglob("*") if recursive else root.iterdir())
            paths = [p for p in candidates if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file()]
        elif root.is_file():
            paths = [root]  # named explicitly: analysed whatever its suffix
        else:
            raise InputError(f"{root}: no such file or folder")
        for p in paths:
            try:
                st, key = p.stat(), str(p.resolve())
            except OSError as exc:  # gone or unreadable since the folder was listed
                logger.warning("skipping %s: %s", p, exc)
                continue
            found.setdefault(key, AudioFile(str(p), key, st.st_size, st.st_mtime_ns))
    return sorted(found.values(), key=lambda f: f.path)


def analyze_one(analyzer, name: str, source: str | os.PathLike | bytes, cap_seconds: float | None = None,
                work: Work | None = None, infer=None) -> dict:
    """One file -> its result dict named ``name``; never raises: every failure becomes ``error``.

    An error that is the file's fault (AudioError, InputError) or the model's on this file (ModelOutputError: NaN
    scores, which a retry would give again) is final; any other (out of memory, a model
    failure) is marked ``retry`` so that the next run tries the file again. This is the corpus worker's logic.
    ``work`` counts its decode + features and windows (the floor); ``infer`` (windows -> scores) replaces the
    analyzer's own batches (the Modal worker's cross-file batcher).
    """
    from runtime.analyze import build_analysis

    try:
        model = analyzer.model.info.summary()  # inside the try: nothing may escape the worker
        if cap_seconds is not None:
            analyzer = _with_cap(analyzer, cap_seconds)
        work = work if work is not None else Work()
        with work.preparing():
            windows, duration = analyzer.prepare_file(source)
        began = time.perf_counter()
        scores = (infer or analyzer.chunk_scores)(windows)
        work.ran(len(windows), time.perf_counter() - began)
        return {"file": name, **build_analysis(scores, duration).to_dict(), "model": model, "error": None}
    except (AudioError, InputError, ModelOutputError) as exc:
        return failure(name, named_error(name, str(exc)))
    except Exception as exc:
        logger.exception("analysing %s failed", name)
        return failure(name, named_error(name, f"{type(exc).__name__}: {exc}"), retry=True)


def make_analyzer(model: str | os.PathLike, *, device: str = "auto", threads: int | None = None,
                  batch_size: int = 16, cap_seconds: float | None = None):
    """An Analyzer over the ONNX model at ``model`` that analyses the first ``cap_seconds`` of each file."""
    from runtime.analyze import Analyzer
    from runtime.model import OnnxModel

    return Analyzer(OnnxModel(model, device=device, threads=threads), batch_size=batch_size, cap_seconds=cap_seconds)


def _with_cap(analyzer, cap_seconds: float):
    from runtime.analyze import Analyzer

    return Analyzer(analyzer.model, batch_size=analyzer.batch_size, cap_seconds=cap_seconds,
                    refuse_over_seconds=analyzer.refuse_over_seconds)


# --- a source of results: local threads (deploy.modal_corpus has the Modal worker's) -------------------------


def local_results(analyzer, workers: int = DEFAULT_WORKERS, work: Work | None = None,
                  across_files: bool | None = None) -> Results:
    """Analyse files here: ``workers - 1`` threads decode and compute features while the model runs one call at a
    time (runtime.corpus.batched).

    ``across_files`` (default: whenever the model's scores do not depend on their batch neighbours) fills each
    model call with windows of several files; otherwise each call holds one file's windows. ``work`` counts for
    the floor.
    """
    from runtime.corpus.batched import batched_results

    if across_files is None:
        across_files = analyzer.model.info.batch_independent
    return batched_results(analyzer, work if work is not None else Work(), decoders=max(1, workers - 1),
                           across_files=across_files)


def in_flight(fn: Callable, items: Iterable, workers: int, name: str = "corpus") -> Iterator:
    """``fn`` over ``items`` in ``workers`` threads, at most ``workers`` at a time; results as they finish."""
    todo = iter(items)
    with ThreadPoolExecutor(workers, thread_name_prefix=name) as pool:
        pending = {pool.submit(fn, x) for x in _take(todo, workers)}
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            pending |= {pool.submit(fn, x) for x in _take(todo, len(done))}
            yield from (d.result() for d in done)


def _take(it: Iterator, n: int) -> list:
    return [x for _, x in zip(range(n), it, strict=False)]


# --- the journal ----------------------------------------------------------------------------------------------


class Journal:
    """Append-only JSON lines, one per analysed file, each flushed and fsynced before the next file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fh = None

    def load(self) -> dict[str, dict]:
        """The latest entry per file key; a torn last line (a crash while writing) is ignored."""
        entries: dict[str, dict] = {}
        if not self.path.exists():
            return entries
        for n, line in enumerate(self.path.read_text(encoding="utf-8").splitlines(), 1):
            try:
                entry = json.loads(line)
                entries[entry["key"]] = entry
            except (ValueError, KeyError, TypeError):
                logger.warning("%s line %d is not a journal entry (a crash while writing?): ignored", self.path, n)
        return entries

    def __enter__(self) -> Journal:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        torn = self.path.exists() and self.path.stat().st_size > 0 and not self.path.read_bytes().endswith(b"\n")
        self._fh = self.path.open("a", encoding="utf-8")
        if torn:
            self._fh.write("\n")  # end the torn line so the next entry starts on its own
        return self

    def __exit__(self, *exc) -> None:
        self._fh.close()

    def append(self, entry: dict) -> None:
        self._fh.write(json.dumps(entry, separators=(",", ":")) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())


def journal_entry(f: AudioFile, result: dict, model: str | None, cap_seconds: float | None) -> dict:
    """The journal line of one file: what it was (path, size, mtime), how it was analysed, and the outcome."""
    keep = ("duration_seconds", "scores", "timeline")
    return {"path": f.path, "key": f.key, "size": f.size, "mtime_ns": f.mtime_ns,
            "model": (result.get("model") or {}).get("version") or model, "cap_seconds": cap_seconds,
            "result": None if result.get("error") else {k: result[k] for k in keep},
            "error": result.get("error"), "retry": bool(result.get("retry")),
            **({"endpoint": result["endpoint"]} if result.get("endpoint") else {})}  # runtime.corpus.remote


def is_current(entry: dict | None, f: AudioFile, model: str | None, cap_seconds: float | None) -> bool:
    """Whether a journal entry still stands for ``f``: same size, mtime, cap and (if known) model; no retry."""
    if entry is None or entry.get("retry"):
        return False
    same_file = (entry.get("size"), entry.get("mtime_ns")) == (f.size, f.mtime_ns)
    same_model = model is None or entry.get("model") == model
    return same_file and same_model and entry.get("cap_seconds") == cap_seconds


# --- the run ---------------------------------------------------------------------------------------------------


def analyze_corpus(roots: Sequence[str | os.PathLike], out_dir: str | os.PathLike, *,
                   model: str | os.PathLike = "artifacts/model.onnx", recursive: bool = False,
                   cap_seconds: float | None = None, batch_size: int = 16, device: str = "auto",
                   threads: int | None = None, workers: int = DEFAULT_WORKERS, progress: bool = False,
                   plots: bool = True, analyzer=None, across_files: bool | None = None) -> CorpusSummary:
    """Analyse every audio file under ``roots`` here, with the model at ``model``, into ``out_dir``.

    The summary carries this machine's floor, measured in the run (runtime.corpus.floor).
    """
    files = find_audio(roots, recursive=recursive)
    if analyzer is None:  # `analyzer`: one already loaded (and checked) by the caller, e.g. the CLI
        analyzer = make_analyzer(model, device=device, threads=threads, batch_size=batch_size,
                                 cap_seconds=cap_seconds)
    work = Work()
    return run_corpus(files, out_dir, local_results(analyzer, workers, work, across_files),
                      model=analyzer.model.info.version, cap_seconds=cap_seconds, progress=progress, plots=plots,
                      floor=FloorMeter(analyzer.model, analyzer.batch_size, work))


def run_corpus(files: list[AudioFile], out_dir: str | os.PathLike, results: Results, *, model: str | None,
               cap_seconds: float | None = None, progress: bool = False, plots: bool = True,
               floor=None) -> CorpusSummary:
    """Journal the results of the files whose journal entry is not current, then write the outputs.

    ``model`` is the version string results will carry (None: whatever the remote worker runs). ``floor``
    (a runtime.corpus.floor.FloorMeter) times the model before and after the files, outside the run's time.
    """

    out = Path(out_dir)
    journal = Journal(out / JOURNAL_NAME)
    entries = journal.load()
    todo = [f for f in files if not is_current(entries.get(f.key), f, model, cap_seconds)]
    by_path = {f.path: f for f in todo}
    if floor is not None and todo:
        floor.start()
    start, cpu, seconds = time.perf_counter(), time.process_time(), 0.0
    logger.info("%d files: %d to analyse, %d from the journal", len(files), len(todo), len(files) - len(todo))
    with journal, _Progress(todo, progress) as bar:
        for result in results(todo):
            f = by_path[result["file"]]
            entry = journal_entry(f, result, model, cap_seconds)
            journal.append(entry)
            entries[f.key] = entry
            seconds += (entry["result"] or {}).get("duration_seconds") or 0.0
            bar.advance(f, seconds)
    rows = [entries[f.key] for f in files]
    summary = CorpusSummary(out, len(files), len(todo), len(files) - len(todo),
                            sum(r["result"]["duration_seconds"] for r in rows if r["result"]), seconds,
                            time.perf_counter() - start, [(r["path"], r["error"]) for r in rows if r["error"]])
    summary.cpu_seconds = time.process_time() - cpu
    if floor is not None and todo and seconds > 0:
        summary.floor = floor.finish(seconds)
    summary.plots = write_outputs(out, rows, summary, plots=plots)
    return summary


class _Progress:
    """A rich progress bar on stderr (files, audio hours, ETA from bytes), or nothing."""

    def __init__(self, files: list[AudioFile], enabled: bool) -> None:
        self.total_files = len(files)
        self.total_bytes = sum(f.size for f in files) or 1
        self.done = 0
        self.bar = self.task = None
        if enabled and files:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("analysing"), BarColumn(), TextColumn("{task.fields[files]} files"),
                                TextColumn("{task.fields[hours]:.2f} h audio"), TimeRemainingColumn(),
                                console=Console(stderr=True))
            self.task = self.bar.add_task("corpus", total=self.total_bytes, files=f"0/{self.total_files}", hours=0.0)

    def __enter__(self) -> _Progress:
        if self.bar:
            self.bar.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.bar:
            self.bar.stop()

    def advance(self, f: AudioFile, audio_seconds: float) -> None:
        self.done += 1
        if self.bar:
            self.bar.update(self.task, advance=f.size, files=f"{self.done}/{self.total_files}",
                            hours=audio_seconds / 3600)


def summary_lines(summary: CorpusSummary, limit: int = 20) -> list[str]:
    """A few readable lines: counts, audio hours, speed, and why files failed."""
    speed = f", {summary.speed:.1f} audio hours per hour" if summary.speed else ""
    if summary.speed and summary.floor:
        speed += (f" (this machine's floor {summary.floor.audio_hours_per_hour:.1f}, measured in this run: "
                  f"{summary.speed / summary.floor.audio_hours_per_hour:.2f} of it)")
    lines = [f"{summary.files} files: {summary.analysed} analysed now, {summary.from_journal} from the journal, "
             f"{summary.failed} failed; {summary.audio_seconds / 3600:.3f} h of audio scored{speed}",
             f"outputs in {summary.out_dir}: scores.csv, timeline.csv, report.md"
             + ("" if summary.plots else " (without plots: see report.md)")]
    lines += [f"  failed: {path}: {error.removeprefix(path + ': ')}" for path, error in summary.failures[:limit]]
    if summary.failed > limit:
        lines.append(f"  ... and {summary.failed - limit} more (see report.md)")
    return lines
