"""The deployed Modal app's corpus worker as a source of results for ``runtime.corpus.run_corpus``.

    python -m deploy analyze recordings --out report [--recursive] [--cap-seconds 30]

Each file's bytes go to ``CorpusWorker.analyze_bytes`` over parallel containers; the journal, resume and report
are the local run's (``runtime.corpus``). ``runtime`` itself knows nothing of Modal.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from runtime.corpus.runner import AudioFile, Results, failure
from runtime.errors import ConfigError

MODAL_APP = "percepiano"  # deploy/modal_app.py APP_NAME (a test keeps them equal)
MODAL_WORKER = "CorpusWorker"


def lookup_worker(app_name: str = MODAL_APP, class_name: str = MODAL_WORKER):
    """An instance handle of the deployed corpus worker (``modal deploy deploy/modal_app.py`` made it)."""
    try:
        import modal
    except ImportError as exc:
        raise ConfigError("python -m deploy analyze needs the Modal client: "
                          "pip install 'percepiano-onnx[modal]'") from exc
    return modal.Cls.from_name(app_name, class_name)()


def modal_results(worker, cap_seconds: float | None = None) -> Results:
    """Send each file's bytes to ``worker.analyze_bytes`` over parallel containers; results stream back.

    The worker names every result; an exception that still comes back (a container that died) names no file,
    so every file left without a result is reported with it, marked for retry.
    """

    def run(files: list[AudioFile]) -> Iterator[dict]:
        names = [f.path for f in files]
        read_errors: dict[str, str] = {}
        seen: set[str] = set()
        lost: list[str] = []
        outputs = _guard_modal(lambda: worker.analyze_bytes.map(
            names, _blobs(files, read_errors), kwargs={"cap_seconds": cap_seconds}, order_outputs=False,
            return_exceptions=True))
        for out in outputs:
            if not isinstance(out, dict) or out.get("file") not in names or out["file"] in seen:
                lost.append(f"{type(out).__name__}: {out}"[:300])
                continue
            seen.add(out["file"])
            yield failure(out["file"], read_errors[out["file"]]) if out["file"] in read_errors else out
        why = "; ".join(dict.fromkeys(lost)) or "the map ended without it"
        for f in files:
            if f.path not in seen:
                yield failure(f.path, f"no result from the Modal worker ({why})", retry=True)

    return run


def _blobs(files: list[AudioFile], read_errors: dict[str, str]) -> Iterator[bytes]:
    """File bytes, read only as Modal asks for the next input; an unreadable file is sent empty."""
    for f in files:
        try:
            yield Path(f.path).read_bytes()
        except OSError as exc:
            read_errors[f.path] = f"{f.path}: cannot read: {exc.strerror or exc}"
            yield b""


def _guard_modal(start_map: Callable[[], Iterable]) -> Iterator:
    """Start and iterate a Modal map; Modal's own errors (not deployed, not logged in) become one ConfigError."""
    try:
        yield from start_map()
    except Exception as exc:
        if type(exc).__module__.startswith("modal"):
            raise ConfigError(f"Modal: {exc} (deploy with `modal deploy deploy/modal_app.py`, log in with "
                              "`modal setup`; finished files are in the journal, run again to resume)") from exc
        raise
