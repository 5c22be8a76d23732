"""A deployed service (local or Modal) as a source of results for ``runtime.corpus.runner.run_corpus``.

    python -m runtime analyze recordings --out report --url http://127.0.0.1:8000,http://127.0.0.1:8001

Each file's bytes go to ``/v1/analyze`` through ``runtime.client.Client`` (the first endpoint that answers, the
next on failure), ``workers`` files at a time; every result carries the endpoint that scored it, which the journal
and the report record. The journal, resume and report are the local run's.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from runtime.client import Client, RequestRefused, Unavailable
from runtime.corpus.runner import AudioFile, Results, failure, in_flight

DEFAULT_WORKERS = 4  # files in flight: a service runs several analyses at once (and may be several containers)


def http_results(client: Client, cap_seconds: float | None = None, workers: int = DEFAULT_WORKERS) -> Results:
    """Send the files to the service, ``workers`` at a time; results (each with its ``endpoint``) as they come.

    A file the service refuses (a 4xx: not audio, too long) is a final error; one that no endpoint answered is an
    error marked ``retry`` (the next run sends it again). A wrong token (ConfigError) stops the run: the files
    finished so far are in the journal.
    """

    def run(files: list[AudioFile]) -> Iterator[dict]:
        return in_flight(lambda f: score_one(client, f, cap_seconds), files, max(1, workers), "corpus-http")

    return run


def score_one(client: Client, f: AudioFile, cap_seconds: float | None) -> dict:
    """One file through the client -> its result named ``f.path`` (never raises but for a ConfigError)."""
    try:
        data = Path(f.path).read_bytes()
    except OSError as exc:
        return failure(f.path, f"{f.path}: cannot read: {exc.strerror or exc}")
    try:
        answer = client.analyze(data, cap_seconds=cap_seconds)
    except RequestRefused as exc:
        return {**failure(f.path, f"{f.path}: {exc.status} {exc.error_type}: {exc}"), "endpoint": exc.endpoint}
    except Unavailable as exc:
        return failure(f.path, f"{f.path}: {exc}", retry=True)
    keep = ("duration_seconds", "scores", "timeline", "model")
    return {"file": f.path, **{k: answer.result.get(k) for k in keep}, "error": None, "endpoint": answer.endpoint,
            "attempts": answer.attempts}

