"""The documented commands run as commands: `convert demo-checkpoint`, `export --input audio --quantize auto`,
`--threads` on analyze and serve, the quick modes of the memory benchmarks, and scripts/demo.sh."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from runtime import cli

REPO = Path(__file__).resolve().parents[1]


def run(*args: str, cwd: Path = REPO, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python ARGS` with this checkout first on the path, as the scripts' venv runs it."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args}: exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.mark.slow
def test_demo_checkpoint_command_writes_the_original_format(tmp_path):
    out = tmp_path / "ckpt.pkl"
    proc = run("-m", "convert", "demo-checkpoint", str(out), "--preset", "tiny", "--seed", "3")
    assert f"wrote {out} (tiny preset, seed 3" in proc.stdout
    ckpt = pickle.loads(out.read_bytes())  # docs/spec.md §2: a plain dict, jax.Array leaves, a fitted StandardScaler
    assert set(ckpt) == {"params", "model_config", "finetuning_results", "label_scaler", "training_complete"}
    assert ckpt["model_config"] == {"embed_dim": 64, "num_layers": 2, "num_heads": 4, "patch_size": 16,
                                    "num_outputs": 19}
    assert type(ckpt["label_scaler"]).__name__ == "StandardScaler" and ckpt["label_scaler"].scale_.shape == (19,)
    assert type(ckpt["params"]["params"]["pos_embedding"]).__module__.startswith("jax")
    again = tmp_path / "again.pkl"
    run("-m", "convert", "demo-checkpoint", str(again), "--preset", "tiny", "--seed", "3")
    assert again.read_bytes() == out.read_bytes()  # same seed, same bytes


@pytest.mark.slow
def test_export_audio_input_quantize_auto_goes_through_every_gate(tiny_checkpoint, tmp_path, capsys):
    from convert import cli as convert_cli

    out = tmp_path / "audio.onnx"
    report = tmp_path / "report.json"
    code = convert_cli.main(["export", "--checkpoint", str(tiny_checkpoint), "--out", str(out), "--input", "audio",
                             "--quantize", "auto", "--report", str(report)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    reports = json.loads(report.read_text())
    assert set(reports) == {"fp32", "int8", "fp16"}
    for precision, rep in reports.items():
        assert rep["passed"] and rep["precision"] == precision, (precision, rep.get("max_abs"))
        assert rep["max_abs_end_to_end"] <= rep["tolerance"]["end_to_end"]
    written = {line.split()[1]: line.split()[2].strip("(,") for line in printed.splitlines()
               if line.startswith("wrote ")}
    assert set(written.values()) == {"fp32", "int8", "fp16"}, written
    from runtime.model import OnnxModel

    for path in written:
        model = OnnxModel(path, device="cpu")
        assert model.input_kind == "audio" and model.run_self_check().status == "passed", path


@pytest.fixture
def session_threads(monkeypatch) -> list[int]:
    """The intra-op thread count of every onnxruntime session the runtime opens."""
    import runtime.model

    seen: list[int] = []
    real = runtime.model.session_options

    def spy(*args, **kwargs):
        opts = real(*args, **kwargs)
        seen.append(opts.intra_op_num_threads)
        return opts

    monkeypatch.setattr(runtime.model, "session_options", spy)
    return seen


def test_analyze_threads_reaches_the_session_and_keeps_the_scores(tiny_model, piano_clips, session_threads,
                                                                  capsys):
    args = ["analyze", str(piano_clips[0]), "--model", str(tiny_model), "--device", "cpu", "--json"]
    assert cli.main(args) == 0
    default = json.loads(capsys.readouterr().out)["results"][0]["scores"]
    assert session_threads and set(session_threads) == {0}  # onnxruntime's default: all cores
    session_threads.clear()
    assert cli.main([*args, "--threads", "1"]) == 0
    one = json.loads(capsys.readouterr().out)["results"][0]["scores"]
    assert session_threads and set(session_threads) == {1}
    np.testing.assert_allclose(list(one.values()), list(default.values()), rtol=0, atol=1e-6)


def test_serve_threads_reaches_the_session(tiny_model, session_threads, monkeypatch):
    import runtime.serve.app

    served = []
    monkeypatch.setattr(runtime.serve.app, "serve", lambda analyzer, **kw: served.append(analyzer))
    assert cli.main(["serve", "--model", str(tiny_model), "--device", "cpu", "--threads", "2"]) == 0
    (analyzer,) = served
    assert set(session_threads) == {2}
    assert analyzer.model.session.get_session_options().intra_op_num_threads == 2


@pytest.mark.slow
def test_upload_memory_benchmark_quick(tiny_model):
    proc = run("-m", "benchmarks.upload_memory", "--model", str(tiny_model), "--clients", "2", "--bursts", "1",
               "--max-bytes", "3000000", timeout=300)
    doc = json.loads(proc.stdout)
    assert doc["clients"] == 2 and len(doc["bursts"]) == 1 and doc["body_bytes"] <= 3_000_000
    rss = doc["rss_mb"]
    assert 0 < rss["baseline"] <= rss["peak_sampled"] and rss["peak_vmhwm"] >= rss["baseline"]


@pytest.mark.slow
def test_decode_memory_benchmark_quick(tiny_model, tmp_path):
    out = tmp_path / "decode.json"
    proc = run("-m", "benchmarks.decode_memory", "--model", str(tiny_model), "--seconds", "4", "--out", str(out),
               timeout=300)
    doc = json.loads(out.read_text())
    assert doc["seconds"] == 4 and {r["rate"] for r in doc["rows"]} == {384_000, 22_050}
    for row in doc["rows"]:
        assert row["analyze_peak_rss_mb"] > row["load_audio_peak_rss_mb"] > 0, row
    assert "| after (this tree) | 384000 Hz |" in proc.stdout


# --- scripts/demo.sh: a production-size export, a few minutes ------------------------------------------------


@pytest.mark.slow
@pytest.mark.production
def test_demo_script_exports_and_scores_the_shipped_clips(demo_run):
    out = demo_run["stdout"]
    assert "passed" in out and "wrote " in out and demo_run["model"].is_file()
    assert "DEMO model" in demo_run["stderr"]  # the runtime says its scores mean nothing
    clips = sorted((REPO / "convert" / "clips").glob("*.flac"))
    for clip in clips:
        assert f"convert/clips/{clip.name}  (" in out
    from runtime.model import OnnxModel

    model = OnnxModel(demo_run["model"], device="cpu")
    assert model.info.demo and model.input_kind == "mel"
