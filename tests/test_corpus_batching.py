"""Windows of several files in one model call (corpus runner and Modal worker), and the floor beside the speed."""

from __future__ import annotations

import dataclasses
import shutil
import threading

import numpy as np
import pytest

from runtime.analyze import Analyzer
from runtime.constants import API_KEYS
from runtime.corpus import runner as corpus
from runtime.corpus.batched import batched_results
from runtime.corpus.floor import Floor, FloorMeter, Work
from runtime.corpus.report import CorpusSummary
from runtime.model import OnnxModel


@pytest.fixture(scope="module")
def model(tiny_model):
    return OnnxModel(tiny_model, device="cpu")


@pytest.fixture
def files(tmp_path, piano_clips):
    """Six real clips (5 to 8 windows each) and a file that does not decode, in the middle."""
    root = tmp_path / "corpus"
    root.mkdir()
    for i, clip in enumerate(sorted(piano_clips)[:6]):
        shutil.copy(clip, root / f"{i}{'a' if i == 3 else ''}.flac")
    (root / "3b.wav").write_bytes(b"RIFF, but not really a wave file")
    return corpus.find_audio([root])


class Calls:
    """Wraps a model's run: the size of every call."""

    def __init__(self, model):
        self.model, self.sizes = model, []
        self.info, self.input_shape, self.input_kind = model.info, model.input_shape, model.input_kind

    def run(self, windows):
        self.sizes.append(len(windows))
        return self.model.run(windows)


def scores_of(result) -> np.ndarray:
    return np.array([[c["scores"][k] for k in API_KEYS] for c in result["timeline"]])


@pytest.mark.parametrize("batch_size", [3, 16])
def test_each_file_gets_its_scores_alone_from_calls_across_files(model, files, batch_size):
    calls = Calls(model)
    analyzer = Analyzer(calls, batch_size=batch_size)
    work = Work()
    got = {r["file"]: r for r in batched_results(analyzer, work)(files)}
    assert sorted(got) == sorted(f.path for f in files)
    alone = Analyzer(model, batch_size=1)  # each window in a call of its own: no neighbours at all
    windows = 0
    for f in files:
        if f.path.endswith(".wav"):
            assert got[f.path]["error"].startswith(f.path) and "retry" not in got[f.path]
            continue
        want = alone.analyze_file(f.path).to_dict()
        assert got[f.path]["error"] is None and got[f.path]["duration_seconds"] == want["duration_seconds"]
        np.testing.assert_allclose(scores_of(got[f.path]), scores_of(want), atol=1e-6, rtol=0)
        np.testing.assert_allclose([got[f.path]["scores"][k] for k in API_KEYS],
                                   [want["scores"][k] for k in API_KEYS], atol=1e-6, rtol=0)
        windows += len(want["timeline"])
    # every call full but the last: windows of several files shared calls
    assert sum(calls.sizes) == windows == work.windows and len(calls.sizes) == -(-windows // batch_size)
    assert all(size == batch_size for size in calls.sizes[:-1]) and work.prepare_seconds > 0


def test_a_failed_call_marks_its_files_for_retry_and_the_others_go_on(model, files):
    class FailsOnce(Calls):
        def run(self, windows):
            if not self.sizes:
                self.sizes.append(len(windows))
                raise MemoryError("out of memory")
            return super().run(windows)

    got = list(batched_results(Analyzer(FailsOnce(model), batch_size=8))(files))
    retried = [r for r in got if r.get("retry")]
    starts = np.cumsum([0] + [len(Analyzer(model).prepare_file(f.path)[0]) for f in files[:3]])
    assert {r["file"] for r in retried} == {f.path for f, s in zip(files[:3], starts[:3], strict=True) if s < 8}
    assert all(r["error"].endswith("MemoryError: out of memory") for r in retried)
    assert sum(r["error"] is None for r in got) == 6 - len(retried) and len(got) == len(files)


def per_batch_int8(model) -> Analyzer:
    """The model, as if its metadata said int8 with one activation scale per call."""
    fake = Calls(model)
    fake.info = dataclasses.replace(model.info, precision="int8",
                                    variants={"build": {"batch_independent": False}})
    return Analyzer(fake, batch_size=16)


def test_scores_that_depend_on_neighbours_are_never_batched_across_files(model, files):
    analyzer = per_batch_int8(model)
    with pytest.raises(ValueError, match="batch neighbours"):
        batched_results(analyzer)
    results = list(corpus.local_results(analyzer)(files))  # the default: per file
    windows = [len(r["timeline"]) for r in results if r["timeline"]]
    assert sorted(analyzer.model.sizes) == sorted(windows)  # one call per file (none over 16 windows)


def test_batch_independence_comes_from_the_metadata_else_the_precision(model):
    info = model.info
    assert info.batch_independent  # fp32, written by the converter
    assert dataclasses.replace(info, variants={"build": {"batch_independent": True}}, precision="int8")\
        .batch_independent
    assert not dataclasses.replace(info, variants=None, precision="int8").batch_independent  # an older int8 file
    assert dataclasses.replace(info, variants=None, precision="fp16").batch_independent


def test_floor_is_full_batches_plus_decoding(model):
    calls = Calls(model)
    meter = FloorMeter(calls, 8, Work(windows=100, prepare_seconds=2.0))
    meter.start()
    floor = meter.finish(audio_seconds=3600.0)
    per_window = floor.model_ms_per_window / 1e3
    assert per_window == min(meter.per_window) and len(meter.per_window) == 6 and set(calls.sizes) == {8}
    assert floor.audio_hours_per_hour == pytest.approx(3600.0 / (100 * per_window + 2.0))
    assert 0 < per_window < 1 and (floor.windows, floor.batch_size) == (100, 8)
    assert FloorMeter(model, 8, Work()).finish(10.0) is None


def test_summary_line_sets_the_speed_beside_the_floor(tmp_path):
    summary = CorpusSummary(tmp_path, 10, 10, 0, 3600.0, 3600.0, 60.0)  # 60 audio hours per hour
    summary.floor = Floor(80.0, 20.0, 16, 1000, 5.0)
    line = corpus.summary_lines(summary)[0]
    assert "60.0 audio hours per hour (this machine's floor 80.0, measured in this run: 0.75 of it)" in line


def test_modal_worker_batches_concurrent_files_and_each_gets_its_scores_alone(model, files):
    from deploy.corpus_batches import CorpusBatches

    calls = Calls(model)
    batches = CorpusBatches(Analyzer(calls, batch_size=16), wait_ms=2000)
    audio = [f for f in files if f.path.endswith(".flac")][:4]
    results, threads = {}, []
    for f in audio:
        threads.append(threading.Thread(target=lambda f=f: results.__setitem__(f.path, batches.analyze(f.path,
                                                                                                        f.path))))
        threads[-1].start()
    for t in threads:
        t.join(timeout=60)
    batches.batcher.close()
    alone = Analyzer(model, batch_size=1)
    for f in audio:
        np.testing.assert_allclose(scores_of(results[f.path]), scores_of(alone.analyze_file(f.path).to_dict()),
                                   atol=1e-6, rtol=0)
    assert len(calls.sizes) < len(audio) and max(calls.sizes) == 16  # calls shared between files
    assert CorpusBatches(per_batch_int8(model)).batcher is None
