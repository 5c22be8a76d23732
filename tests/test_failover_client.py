"""runtime.client and the corpus run through a service (runtime.corpus.remote, `analyze --url`): two real
`python -m runtime serve` processes on 127.0.0.1, the first killed in the middle of a corpus run; a stub server
for Retry-After and the 4xx rule (standard library http.server)."""

from __future__ import annotations

import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from runtime.client import Client, RequestRefused, Unavailable
from runtime.corpus.remote import http_results
from runtime.corpus.runner import JOURNAL_NAME, find_audio, run_corpus
from runtime.errors import ConfigError

pytestmark = pytest.mark.slow  # real servers, one killed mid-run

REPO = Path(__file__).resolve().parents[1]
TOKEN = "failover-token-0123"
FILES = 12


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, port: int, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PERCEPIANO_API_TOKEN": TOKEN}
    return subprocess.Popen([sys.executable, "-m", "runtime", "serve", "--model", str(model), "--port", str(port),
                             "--device", "cpu", "--threads", "1"], cwd=REPO, env=env,
                            stdout=log.open("wb"), stderr=subprocess.STDOUT)


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"{url} exited with {proc.returncode}"
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"{url} not ready after {timeout} s")


@pytest.fixture
def two_servers(tiny_model, tmp_path):
    ports = [free_port(), free_port()]
    procs = [start_server(tiny_model, p, tmp_path / f"server{i}.log") for i, p in enumerate(ports)]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    try:
        for url, proc in zip(urls, procs, strict=True):
            wait_ready(url, proc)
        yield urls, procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=30)


@pytest.fixture
def corpus(piano_clips, tmp_path):
    """FILES copies of the two shortest clips under distinct names."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    clips = sorted(piano_clips, key=lambda p: p.stat().st_size)[:2]
    for i in range(FILES):
        shutil.copy(clips[i % 2], folder / f"take{i:02d}.flac")
    return folder, clips


def test_the_first_server_killed_mid_run_loses_nothing_and_the_report_names_the_endpoints(
        two_servers, corpus, tiny_model, tmp_path):
    from runtime.analyze import Analyzer

    (first, second), procs = two_servers
    folder, clips = corpus
    client = Client([first, second], token=TOKEN, timeout=30, rounds=3, backoff=0.2)
    source = http_results(client, workers=3)
    seen: list[dict] = []

    def killing(files):  # after 4 results the first server dies, with up to 3 requests in flight to it
        for result in source(files):
            seen.append(result)
            yield result
            if len(seen) == 4:
                procs[0].kill()
                procs[0].wait(timeout=30)

    started = time.perf_counter()
    summary = run_corpus(find_audio([folder]), tmp_path / "report", killing, model=None)
    wall = time.perf_counter() - started
    journal = [json.loads(line) for line in (tmp_path / "report" / JOURNAL_NAME).read_text().splitlines()]

    names = sorted(Path(e["path"]).name for e in journal)
    assert names == [f"take{i:02d}.flac" for i in range(FILES)]  # every file exactly once
    assert summary.files == FILES and summary.failed == 0 and all(e["error"] is None for e in journal)
    by_endpoint = {url: [e for e in journal if e["endpoint"] == url] for url in (first, second)}
    assert len(by_endpoint[first]) >= 4 and len(by_endpoint[second]) >= 1
    assert len(by_endpoint[first]) + len(by_endpoint[second]) == FILES
    # after the kill only the second answers, but for the requests the first had already answered then: up to
    # the 3 in flight, whose results can still be waiting to be taken when the kill comes (a race, not a loss)
    assert all(r["endpoint"] == second for r in seen[4 + 3:])
    failed_over = [r for r in seen if r["attempts"] > 1]
    assert failed_over  # the requests in flight to (or sent to) the killed server went to the next one
    # the scores are the model's, whichever server gave them
    analyzer = Analyzer.from_path(tiny_model, device="cpu")
    expected = [analyzer.analyze_file(c).scores for c in clips]
    for e in journal:
        want = expected[int(Path(e["path"]).stem[4:]) % 2]
        np.testing.assert_allclose([e["result"]["scores"][k] for k in want], list(want.values()), atol=1e-5)
    report = (tmp_path / "report" / "report.md").read_text()
    assert f"| {first} | {len(by_endpoint[first])} |" in report
    assert f"| {second} | {len(by_endpoint[second])} |" in report
    for e in journal:
        assert f"| {e['path']} | {e['endpoint']} |" in report
    print(f"\nfail-over: {FILES} files, {len(by_endpoint[first])} scored by the first server, "
          f"{len(by_endpoint[second])} by the second, {len(failed_over)} failed over mid-request "
          f"({sum(r['attempts'] for r in seen) - FILES} extra attempts), {wall:.1f} s")

    # resume: nothing left to do, even with the first endpoint gone
    again = run_corpus(find_audio([folder]), tmp_path / "report", http_results(client), model=None)
    assert (again.analysed, again.from_journal, again.failed) == (0, FILES, 0)


def test_the_cli_scores_through_the_second_url_when_the_first_is_down(two_servers, corpus, tmp_path):
    (_, second), procs = two_servers
    procs[0].terminate()
    procs[0].wait(timeout=30)
    dead = f"http://127.0.0.1:{free_port()}"
    folder, _ = corpus
    env = {**os.environ, "PYTHONPATH": str(REPO), "PERCEPIANO_API_TOKEN": TOKEN}
    cmd = [sys.executable, "-m", "runtime", "analyze", str(folder), "--out", str(tmp_path / "r"),
           "--url", f"{dead},{second}"]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert f"{FILES} files: {FILES} analysed now, 0 from the journal, 0 failed" in out.stdout
    journal = [json.loads(line) for line in (tmp_path / "r" / JOURNAL_NAME).read_text().splitlines()]
    assert len(journal) == FILES and {e["endpoint"] for e in journal} == {second}
    wrong = subprocess.run([*cmd[:-2], "--url", second, "--token", "wrong", "--out", str(tmp_path / "w")], cwd=REPO,
                           env=env, capture_output=True, text=True, timeout=300)
    assert wrong.returncode == 2 and "401" in wrong.stderr and "--token" in wrong.stderr
    assert "Traceback" not in wrong.stderr


class Stub(http.server.BaseHTTPRequestHandler):
    """Answers POSTs from a script of (status, headers, body) shared by the class; records what it got."""

    script: list[tuple[int, dict, dict]] = []
    got: list[dict] = []

    def do_POST(self):  # noqa: N802 (http.server's name)
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        type(self).got.append({"path": self.path, "auth": self.headers.get("Authorization")})
        status, headers, body = type(self).script.pop(0) if type(self).script else (500, {}, {})
        raw = json.dumps(body).encode()
        self.send_response(status)
        for k, v in {**headers, "Content-Type": "application/json", "Content-Length": str(len(raw))}.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(raw)

    def log_message(self, *args):
        pass


@pytest.fixture
def stubs():
    """Two stub servers, each with its own script."""
    servers = []
    for _ in range(2):
        handler = type("StubN", (Stub,), {"script": [], "got": []})
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append((server, handler))
    yield [(f"http://127.0.0.1:{server.server_address[1]}", handler) for server, handler in servers]
    for server, _ in servers:
        server.shutdown()
        server.server_close()


OK = (200, {}, {"status": "success", "scores": {"a": 1.0}, "duration_seconds": 3.0, "timeline": []})


def test_503_retry_after_is_honoured_before_going_round_again(stubs):
    (a, sa), (b, sb) = stubs
    sa.script = [(503, {"Retry-After": "3"}, {"error_type": "busy"}), OK]
    sb.script = [(503, {"Retry-After": "2"}, {"error_type": "busy"}), OK]
    waits: list[float] = []
    client = Client([a, b], token="t", sleep=waits.append, rounds=2)
    answer = client.analyze(b"x", cap_seconds=30)
    assert waits == [2.0]  # both busy: the shorter Retry-After, once
    assert answer.endpoint == a and answer.attempts == 3  # busy is no failure: the first endpoint stays first
    assert sa.got[0] == {"path": "/v1/analyze?cap_seconds=30", "auth": "Bearer t"}


def test_a_4xx_is_final_and_5xx_or_a_dead_endpoint_fails_over(stubs):
    (a, sa), (b, sb) = stubs
    sa.script = [(415, {}, {"error_type": "unsupported_media_type", "error": "not audio"})]
    client = Client([a, b], sleep=lambda s: None)
    with pytest.raises(RequestRefused, match="not audio") as err:
        client.analyze(b"x")
    assert err.value.status == 415 and sb.got == []  # the other endpoint would say the same: not asked
    sa.script, sb.script = [(500, {}, {"error_type": "internal_error"})], [OK]
    assert client.analyze(b"x").endpoint == b
    dead = f"http://127.0.0.1:{free_port()}"
    sb.script = [OK]
    answer = Client([dead, b], sleep=lambda s: None).analyze(b"x")
    assert answer.endpoint == b and "ConnectionRefusedError" in answer.failed_over[0]


def test_no_answer_anywhere_is_unavailable_after_the_rounds_with_backoff():
    dead = f"http://127.0.0.1:{free_port()}"
    waits: list[float] = []
    with pytest.raises(Unavailable, match="no endpoint answered"):
        Client([dead], rounds=3, backoff=0.5, sleep=waits.append).analyze(b"x")
    assert waits == [0.5, 1.0]


def test_a_wrong_token_stops_with_a_config_error(stubs):
    (a, sa), _ = stubs
    sa.script = [(401, {}, {"error": "missing or wrong bearer token"})]
    with pytest.raises(ConfigError, match="401 missing or wrong bearer token"):
        Client([a]).analyze(b"x")


@pytest.mark.parametrize("urls", ["", "ftp://x", "127.0.0.1:8000", "http://"])
def test_bad_urls_are_refused(urls):
    with pytest.raises(ConfigError):
        Client(urls)
