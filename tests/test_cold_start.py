"""Cold start and export memory: pre-optimised exports, session options, the streaming writer, their benchmarks."""

from __future__ import annotations

import json

import numpy as np
import pytest

from runtime.model import OnnxModel, graph_section, header_metadata, load_optimization

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def preoptimized(tiny_checkpoint, tmp_path_factory):
    """The tiny preset exported with the defaults: fp32 and int8 pre-optimised for the CPU, fp16 as made."""
    from convert.export import VariantOptions, export

    return export(tiny_checkpoint, tmp_path_factory.mktemp("preopt") / "tiny.onnx",
                  variants=VariantOptions(quantize="auto"))


@pytest.fixture(scope="module")
def windows(piano_clips):
    from runtime.audio import load_audio
    from runtime.features import features_from_audio

    return features_from_audio(load_audio(piano_clips[0]))[:6]


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_export_writes_cpu_variants_pre_optimised_and_the_runtime_loads_them_as_they_are(preoptimized, windows,
                                                                                        precision):
    path = preoptimized.written[precision]
    model = OnnxModel(path, device="cpu")
    assert model.info.precision == precision and preoptimized.reports[precision]["passed"]
    assert model.graph["optimized"] == "extended" and model.graph["provider"] == "CPUExecutionProvider"
    assert model.optimization == "none" and model.spinning is None and model.prepacking
    # the gate ran on this very graph; optimising it again at load changes nothing that matters
    again = OnnxModel(path, device="cpu", optimization="all")
    assert again.optimization == "all"
    np.testing.assert_allclose(model.predict(windows), again.predict(windows), rtol=0, atol=1e-5)


def test_fp16_is_not_pre_optimised_for_the_cpu(preoptimized):
    model = OnnxModel(preoptimized.written["fp16"], device="cpu")
    assert model.graph == {"optimized": "none"} and model.optimization == "all"


def test_an_export_without_pre_optimisation_is_optimised_at_load(tiny_export, preoptimized, windows):
    model = OnnxModel(tiny_export.path, device="cpu")  # conftest exports with preoptimize="none"
    assert model.graph == {"optimized": "none"} and model.optimization == "all"
    assert tiny_export.reports["fp32"]["passed"]
    fast = OnnxModel(preoptimized.written["fp32"], device="cpu")
    np.testing.assert_allclose(model.predict(windows), fast.predict(windows), rtol=0, atol=1e-5)


def test_quantize_makes_variants_of_a_pre_optimised_export_from_the_traced_graph(preoptimized, tiny_checkpoint,
                                                                                 tmp_path):
    from convert.options import VariantOptions
    from convert.variants import quantize_file

    reports, written = quantize_file(preoptimized.written["fp32"], tiny_checkpoint, tmp_path / "m.int8.onnx",
                                     VariantOptions(quantize="int8"))
    model = OnnxModel(written["int8"], device="cpu")
    assert reports["int8"]["passed"] and model.info.precision == "int8" and model.optimization == "none"
    built = model.info.variants["build"]["quantization"]
    assert built["quantized_matmuls"] == preoptimized_build(preoptimized)["quantization"]["quantized_matmuls"]


def preoptimized_build(result) -> dict:
    return OnnxModel(result.written["int8"], device="cpu").info.variants["build"]


@pytest.mark.parametrize("options", [{"spinning": True}, {"spinning": False}, {"prepacking": False},
                                     {"optimization": "basic"}, {"optimization": "none"}])
def test_session_options_load_and_score_the_same(tiny_model, windows, options):
    reference = OnnxModel(tiny_model, device="cpu").predict(windows)
    model = OnnxModel(tiny_model, device="cpu", **options)
    if "spinning" in options:
        assert model.spinning is options["spinning"]
    np.testing.assert_allclose(model.predict(windows), reference, rtol=0, atol=1e-5)


def test_unknown_optimization_level_is_a_model_error(tiny_model):
    from runtime.errors import ModelError

    with pytest.raises(ModelError, match="unknown optimization level"):
        OnnxModel(tiny_model, device="cpu", optimization="fastest")


@pytest.mark.parametrize("which", ["written by write_model", "saved by onnxruntime"])
def test_header_metadata_reads_what_onnxruntime_reads(preoptimized, tiny_model, tmp_path, which):
    from runtime.model import save_optimized

    path = preoptimized.written["fp32"]
    if which == "saved by onnxruntime":  # metadata after the graph, as protobuf orders fields
        path = save_optimized(tiny_model, tmp_path / "saved.onnx", "basic")
    model = OnnxModel(path, device="cpu")
    props = header_metadata(path)
    assert props == model.session.get_modelmeta().custom_metadata_map and "percepiano" in props
    assert header_metadata(path.read_bytes()) == props
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\xff" * 64)
    assert header_metadata(junk) == {} and graph_section({}) == {}
    assert graph_section(header_metadata(preoptimized.written["fp32"]))["optimized"] == "extended"
    assert load_optimization({"optimized": "extended"}, "cpu") == "none"
    assert load_optimization({"optimized": "extended"}, "cuda") == "all"
    assert load_optimization({}, "cpu") == "all"


def test_write_model_writes_the_same_model_without_serializing_it_whole(tiny_model, tmp_path):
    import onnx

    from convert.files import write_model

    proto = onnx.load(str(tiny_model))
    out = write_model(tmp_path / "copy.onnx", proto)
    assert onnx.load(str(out)).SerializeToString() == proto.SerializeToString()
    assert header_metadata(out) == header_metadata(tiny_model)
    assert [p.name for p in tmp_path.iterdir()] == ["copy.onnx"]  # no temporary file left


def test_session_benchmark_measures_every_configuration_in_fresh_processes(tiny_model, tmp_path):
    from benchmarks.session import BY_NAME, measure, session_table

    names = ("baseline", "runtime", "preopt-extended", "external-data", "ort-format", "no-prepack", "no-spin")
    rows = measure(tiny_model, tmp_path, [0], runs=1, warm_runs=2, configs=tuple(BY_NAME[n] for n in names),
                   note=lambda m: None)
    assert tuple(rows) == names
    for name, r in rows.items():
        assert r["session_s"] > 0 and r["first_run_s"] > 0 and r["warm_median_s"] > 0, name
        assert r["peak_rss_bytes"] > r["file_bytes"] > 0, name
        assert r["scores_checksum"] == pytest.approx(rows["baseline"]["scores_checksum"], rel=1e-4), name
    assert (tmp_path / f"{tiny_model.stem}.external.onnx.data").is_file()
    section = {"runs": 1, "warm_runs": 2, "batch": 15, "cpus": [0], "results": {"fp32": rows},
               "configs": {n: BY_NAME[n].note for n in names}}
    title, headers, table = session_table(section)
    assert len(table) == len(names) and len(table[0]) == len(headers) and "fresh processes" in title


def test_export_memory_benchmark_reports_peak_and_phases(tmp_path):
    from benchmarks.export_memory import format_table, measure

    result = measure("fp32", "tiny", tmp_path)
    assert result["rc"] == 0 and result["peak_rss_bytes"] > 0
    phases = [p["phase"] for p in result["phases"]]
    assert phases[0] == "start" and any(p.startswith("parity gate (fp32)") for p in phases)
    assert result["peak_rss_bytes"] == max(result["vmhwm_bytes"], result["sampled_peak_bytes"])
    assert result["sampled_peak_bytes"] == max(p["rss_peak_bytes"] for p in result["phases"])
    assert all(p["rss_peak_bytes"] >= p["rss_start_bytes"] > 0 for p in result["phases"])
    assert result["parity"]["fp32"]["passed"] is True and result["files"]["model.onnx"] > 0
    report = json.loads((tmp_path / "fp32" / "report.json").read_text())
    assert report["fp32"]["max_abs_model"] == result["parity"]["fp32"]["max_abs_model"]
    assert "fp32" in format_table({"fp32": result})
