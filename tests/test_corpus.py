"""Corpus runs: folder walk, durable journal and resume, CSV and report outputs, and the Modal path run locally."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runtime.constants import API_KEYS
from runtime.corpus import runner as corpus
from runtime.corpus.report import families, write_atomic
from runtime.errors import InputError

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


@pytest.fixture
def folder(tmp_path, piano_clips) -> Path:
    """Real clips at the top, in a subfolder and two levels down, a bad .wav and a text file."""
    clips = sorted(piano_clips, key=lambda p: p.stat().st_size)[:4]
    root = tmp_path / "corpus"
    (root / "sub" / "deeper").mkdir(parents=True)
    shutil.copy(clips[0], root / "top1.flac")
    shutil.copy(clips[1], root / "top2.flac")
    shutil.copy(clips[2], root / "sub" / clips[2].name)
    shutil.copy(clips[3], root / "sub" / "deeper" / clips[3].name)
    (root / "bad.wav").write_bytes(b"RIFF, but not really a wave file")
    (root / "sub" / "notes.txt").write_text("not audio")
    return root


@pytest.fixture(scope="module")
def analyzer(tiny_model):
    return corpus.make_analyzer(tiny_model, device="cpu")


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "runtime", *args], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


def test_find_audio_walks_folders_by_suffix(folder):
    top = [Path(f.path).relative_to(folder).as_posix() for f in corpus.find_audio([folder])]
    assert top == sorted(["bad.wav", "top2.flac", "top1.flac"])
    every = [Path(f.path).relative_to(folder).as_posix() for f in corpus.find_audio([folder], recursive=True)]
    assert len(every) == 5 and "sub/notes.txt" not in every
    assert any(p.startswith("sub/deeper/") for p in every)
    again = corpus.find_audio([folder, folder / "sub", folder / "top2.flac"], recursive=True)  # overlaps once
    assert [f.path for f in again] == sorted(f.path for f in again) and len(again) == 5
    with pytest.raises(InputError, match="no such file or folder"):
        corpus.find_audio([folder / "absent"])


@pytest.mark.slow  # many files through the runtime
def test_csv_rows_equal_single_file_json(folder, tiny_model, tmp_path):
    out = tmp_path / "report"
    run = run_cli("analyze", str(folder), "--recursive", "--out", str(out), "--model", str(tiny_model))
    assert run.returncode == 1, run.stderr  # the bad file fails; the batch does not stop
    assert "5 files: 5 analysed now, 0 from the journal, 1 failed" in run.stdout
    files = [f.path for f in corpus.find_audio([folder], recursive=True)]
    single = run_cli("analyze", *files, "--json", "--model", str(tiny_model))
    expected = {r["file"]: r for r in json.loads(single.stdout)["results"]}

    rows = read_csv(out / "scores.csv")
    assert [r["path"] for r in rows] == files
    for row in rows:
        want = expected[row["path"]]
        assert row["error"] == (want["error"] or "")
        if want["error"]:
            assert row["duration_seconds"] == "" and all(row[k] == "" for k in API_KEYS)
            continue
        assert float(row["duration_seconds"]) == want["duration_seconds"]
        assert {k: float(row[k]) for k in API_KEYS} == want["scores"]
    chunks = read_csv(out / "timeline.csv")
    want_chunks = [(f, i, c) for f in files for i, c in enumerate(expected[f]["timeline"] or [])]
    assert len(chunks) == len(want_chunks) > len(files)
    for row, (f, i, c) in zip(chunks, want_chunks, strict=True):
        assert (row["path"], int(row["chunk"]), float(row["start_seconds"])) == (f, i, c["start_seconds"])
        assert {k: float(row[k]) for k in API_KEYS} == c["scores"]
    report = (out / "report.md").read_text()
    assert "1 failed" in report and "bad.wav" in report and "cannot decode" in report


SLOW_RUN = """
import sys, time
from runtime.analyze import Analyzer
real = Analyzer.prepare_file
def slow(self, source):
    time.sleep(0.4)
    return real(self, source)
Analyzer.prepare_file = slow
from runtime.cli import main
sys.exit(main(sys.argv[1:]))
"""


def journal_lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


@pytest.mark.slow  # many files through the runtime
def test_killed_run_resumes_to_the_same_csv(folder, tiny_model, analyzer, tmp_path):
    for i in range(6):  # more files, so that the kill lands mid-way
        shutil.copy(folder / "top1.flac", folder / "sub" / f"copy{i}.flac")
    total = len(corpus.find_audio([folder], recursive=True))
    out = tmp_path / "killed"
    args = ["analyze", str(folder), "--recursive", "--out", str(out), "--model", str(tiny_model)]
    proc = subprocess.Popen([sys.executable, "-c", SLOW_RUN, *args], cwd=REPO, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while len(journal_lines(out / corpus.JOURNAL_NAME)) < 3 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    kept = journal_lines(out / corpus.JOURNAL_NAME)
    assert 3 <= len(kept) < total, "the kill must land mid-way"
    assert not (out / "scores.csv").exists()
    with (out / corpus.JOURNAL_NAME).open("a") as fh:
        fh.write('{"path": "torn')  # as if killed in the middle of writing a line

    resumed = run_cli(*args)
    assert f"{total} files: {total - len(kept)} analysed now, {len(kept)} from the journal" in resumed.stdout

    whole = corpus.analyze_corpus([folder], tmp_path / "whole", model=tiny_model, recursive=True, device="cpu",
                                  plots=False)
    assert (whole.files, whole.analysed, whole.failed) == (total, total, 1)
    assert (out / "scores.csv").read_text() == (tmp_path / "whole" / "scores.csv").read_text()
    assert (out / "timeline.csv").read_text() == (tmp_path / "whole" / "timeline.csv").read_text()
    paths = [r["path"] for r in read_csv(out / "scores.csv")]
    assert len(paths) == len(set(paths)) == total
    entries = [json.loads(line) for line in journal_lines(out / corpus.JOURNAL_NAME) if line.startswith('{"path":"')]
    assert sorted(e["path"] for e in entries) == sorted(paths)  # every file journaled exactly once


def test_changed_files_are_reanalysed_and_unchanged_skipped(folder, analyzer, tmp_path):
    out = tmp_path / "report"
    files = corpus.find_audio([folder], recursive=True)
    version = analyzer.model.info.version
    first = corpus.run_corpus(files, out, corpus.local_results(analyzer), model=version, plots=False)
    assert (first.analysed, first.from_journal) == (5, 0)
    target = folder / "top2.flac"
    other = next((folder / "sub").glob("*.flac"))
    target.write_bytes(other.read_bytes())  # new content (and size)
    touched = next((folder / "sub" / "deeper").iterdir())
    os.utime(touched, ns=(0, 10**18))  # same bytes, new modification time
    seen = []

    def record(todo):
        seen.extend(f.path for f in todo)
        return corpus.local_results(analyzer)(todo)

    second = corpus.run_corpus(corpus.find_audio([folder], recursive=True), out, record, model=version, plots=False)
    assert sorted(seen) == sorted([str(target), str(touched)])
    assert (second.analysed, second.from_journal, second.failed) == (2, 3, 1)
    rows = {r["path"]: r for r in read_csv(out / "scores.csv")}
    want = analyzer.analyze_file(other).scores
    assert {k: float(rows[str(target)][k]) for k in API_KEYS} == want
    other_model = corpus.run_corpus(corpus.find_audio([folder], recursive=True), out, record, model="another",
                                    plots=False)
    assert other_model.analysed == 5  # results of a different model are not reused


def test_unexpected_errors_are_recorded_and_retried(folder, analyzer, tmp_path):
    class Flaky:
        model = analyzer.model
        batch_size = analyzer.batch_size
        fail = True

        def prepare_file(self, source):
            if self.fail and str(source).endswith("top2.flac"):
                raise MemoryError("out of memory")
            return analyzer.prepare_file(source)

        def chunk_scores(self, windows):
            return analyzer.chunk_scores(windows)

    flaky = Flaky()
    files = corpus.find_audio([folder], recursive=True)
    out = tmp_path / "report"
    version = analyzer.model.info.version
    first = corpus.run_corpus(files, out, corpus.local_results(flaky), model=version, plots=False)
    assert dict(first.failures)[str(folder / "top2.flac")] == f"{folder / 'top2.flac'}: MemoryError: out of memory"
    flaky.fail = False
    second = corpus.run_corpus(files, out, corpus.local_results(flaky), model=version, plots=False)
    assert (second.analysed, second.failed) == (1, 1)  # only the retry; the bad file's own error stands
    assert [p for p, _ in second.failures] == [str(folder / "bad.wav")]


class FakeWorker:
    """Stands in for modal.Cls.from_name(...)(): .analyze_bytes.map runs the worker's logic on the local analyzer."""

    def __init__(self, analyzer, lose: str | None = None) -> None:
        self.analyzer, self.lose, self.calls = analyzer, lose, []
        self.analyze_bytes = self

    def map(self, names, blobs, *, kwargs, order_outputs, return_exceptions):
        self.calls.append({"names": list(names), "kwargs": kwargs, "order_outputs": order_outputs,
                           "return_exceptions": return_exceptions})
        outs = []
        for name, data in zip(names, blobs, strict=True):
            lost = self.lose and name.endswith(self.lose)
            outs.append(RuntimeError("container died") if lost else corpus.analyze_one(self.analyzer, name, data,
                                                                                        **kwargs))
        return reversed(outs)  # in completion order, not input order


@pytest.mark.slow  # many files through the runtime
def test_modal_path_with_the_local_analyzer(folder, analyzer, tiny_model, tmp_path, monkeypatch):
    from deploy import modal_corpus
    from deploy.__main__ import main

    local = corpus.analyze_corpus([folder], tmp_path / "local", model=tiny_model, recursive=True, device="cpu",
                                  plots=False)
    worker = FakeWorker(analyzer, lose="top2.flac")
    monkeypatch.setattr(modal_corpus, "lookup_worker", lambda: worker)
    out = tmp_path / "modal"
    assert main(["analyze", str(folder), "--recursive", "--out", str(out)]) == 1
    assert worker.calls[0]["kwargs"] == {"cap_seconds": None}
    assert worker.calls[0]["order_outputs"] is False and worker.calls[0]["return_exceptions"] is True
    rows = {r["path"]: r for r in read_csv(out / "scores.csv")}
    lost = rows.pop(str(folder / "top2.flac"))
    assert "no result from the Modal worker (RuntimeError: container died)" in lost["error"]
    bad = rows.pop(str(folder / "bad.wav"))
    assert bad["error"].startswith(f"{folder / 'bad.wav'}: ") and "cannot decode" in bad["error"]
    want = {r["path"]: r for r in read_csv(tmp_path / "local" / "scores.csv")}
    assert rows == {p: want[p] for p in rows} and len(rows) == 3

    worker.lose = None  # resume: only the lost file is sent again
    assert main(["analyze", str(folder), "--recursive", "--out", str(out)]) == 1
    assert worker.calls[1]["names"] == [str(folder / "top2.flac")]
    rows = {r["path"]: r for r in read_csv(out / "scores.csv")}
    assert rows.pop(str(folder / "bad.wav"))["error"] == bad["error"]
    assert rows == {p: r for p, r in want.items() if p != str(folder / "bad.wav")} and local.failed == 1


UNREACHABLE = """
import sys
import deploy.modal_corpus as c
class NotFoundError(Exception):
    __module__ = "modal.exception"
class Worker:
    class analyze_bytes:
        def map(*args, **kwargs):
            raise NotFoundError("App 'percepiano' not found")
c.lookup_worker = Worker
from deploy.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


def test_modal_unreachable_is_one_line(folder, tmp_path):
    run = subprocess.run([sys.executable, "-c", UNREACHABLE, "analyze", str(folder), "--out", str(tmp_path / "r")],
                         cwd=REPO, env=ENV, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.startswith("error: Modal: App 'percepiano' not found")
    assert len(run.stderr.strip().splitlines()) == 1


def test_report_without_matplotlib_still_writes_the_csvs(folder, analyzer, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    summary = corpus.run_corpus(corpus.find_audio([folder]), tmp_path / "r", corpus.local_results(analyzer),
                                model=analyzer.model.info.version)
    assert summary.plots is False
    assert len(read_csv(tmp_path / "r" / "scores.csv")) == 3
    report = (tmp_path / "r" / "report.md").read_text()
    assert "plots skipped" in report and "percepiano-onnx[report]" in report and ".png" not in report
    assert not list((tmp_path / "r").glob("*.png"))


def test_report_plots_every_family(folder, analyzer, tmp_path):
    pytest.importorskip("matplotlib")
    summary = corpus.run_corpus(corpus.find_audio([folder], recursive=True), tmp_path / "r",
                                corpus.local_results(analyzer), model=analyzer.model.info.version)
    assert summary.plots is True
    report = (tmp_path / "r" / "report.md").read_text()
    pngs = sorted(p.name for p in (tmp_path / "r").glob("*.png"))
    assert len(pngs) == len(families()) == 8
    for name in pngs:
        assert f"]({name})" in report and (tmp_path / "r" / name).read_bytes()[:4] == b"\x89PNG"
    for key in API_KEYS:
        assert f"| {key} |" in report


def test_families_partition_the_dimensions_in_model_order():
    fams = families()
    assert [name for name, _ in fams] == ["Timing", "Articulation", "Pedal", "Timbre", "Dynamic", "Music Making",
                                          "Emotion & Mood", "Interpretation"]
    assert [k for _, keys in fams for k in keys] == list(API_KEYS)


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "scores.csv"
    write_atomic(target, "old\n")

    def broken(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(OSError, match="disk full"):
        write_atomic(target, "new\n")
    assert target.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["scores.csv"]


def test_cli_user_errors_are_one_line(tmp_path):
    for args in (["analyze", str(tmp_path), "--recursive"], ["analyze", str(tmp_path / "absent"), "--out",
                                                              str(tmp_path / "r"), "--model", "absent.onnx"]):
        run = run_cli(*args)
        assert run.returncode == 2 and run.stderr.startswith("error: ") and "Traceback" not in run.stderr
