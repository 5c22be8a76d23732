"""Checkpoint formats: finetuning_results (optional, reduced to JSON-safe values) and pickle protocols 0-5."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from convert.checkpoint import expected_param_shapes, load_checkpoint
from convert.errors import CheckpointError


@pytest.fixture(scope="module")
def numpy_raw(tiny_raw) -> dict:
    """The same with numpy leaves, for editing."""
    import jax

    return {**tiny_raw, "params": jax.tree_util.tree_map(np.array, tiny_raw["params"])}


def _write(path: Path, obj, protocol: int = 4) -> Path:
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    return path


def _get(tree: dict, name: str):
    for part in name.split("/"):
        tree = tree[part]
    return tree


def test_finetuning_results_none_absent_or_json_safe(numpy_raw, tmp_path):
    ckpt = numpy_raw
    none = {**ckpt, "finetuning_results": None}
    assert load_checkpoint(_write(tmp_path / "none.pkl", none)).finetuning_results is None
    absent = {k: v for k, v in ckpt.items() if k != "finetuning_results"}
    assert load_checkpoint(_write(tmp_path / "absent.pkl", absent)).finetuning_results is None
    results = {
        "best_val_correlation": np.float32(0.5),
        "history": {"val_loss": np.array([0.5, 0.25]), "epochs": (1, 2)},
        "nan": float("nan"),
        "note": "early stop",
        "flags": [True, None, np.bool_(False)],
    }
    got = load_checkpoint(_write(tmp_path / "rich.pkl", {**ckpt, "finetuning_results": results})).finetuning_results
    assert got == {
        "best_val_correlation": 0.5,
        "history": {"val_loss": [0.5, 0.25], "epochs": [1, 2]},
        "nan": None,
        "note": "early stop",
        "flags": [True, None, False],
    }
    assert json.loads(json.dumps(got, allow_nan=False)) == got
    assert type(got["best_val_correlation"]) is float and type(got["flags"][2]) is bool


def test_finetuning_results_that_metadata_cannot_hold_are_refused(numpy_raw, tmp_path):
    ckpt = numpy_raw
    for value, message in (
        ({"raw": b"\x00\x01"}, r"finetuning_results/raw in .* is a bytes; metadata holds only"),
        ({"z": np.complex64(1j)}, r"finetuning_results/z in .* is a complex"),
        ({"a": np.zeros(20_000)}, r"finetuning_results/a in .* is a float64 array of 20000 values"),
        ({"a": list(range(20_000))}, "too big for metadata"),
        ({"s": "x" * 200_000}, "too big for metadata"),
        ([1, 2], "is a list, not a dict"),
    ):
        with pytest.raises(CheckpointError, match=message):
            load_checkpoint(_write(tmp_path / "bad.pkl", {**ckpt, "finetuning_results": value}))


@pytest.mark.parametrize("protocol", [2, 3, 5])
def test_pickle_protocols_2_to_5_load_the_same(tiny_raw, tiny_checkpoint, tmp_path, protocol):
    want = load_checkpoint(tiny_checkpoint)
    path = _write(tmp_path / f"p{protocol}.pkl", {**tiny_raw, "extra": b"", "more": np.zeros((0, 3))}, protocol)
    if protocol == 2:
        assert b"_codecs" in path.read_bytes()  # bytes go through _codecs.encode at protocol 2
    got = load_checkpoint(path)
    assert got.config == want.config and got.finetuning_results == want.finetuning_results
    np.testing.assert_array_equal(got.scaler_mean, want.scaler_mean)
    for name in expected_param_shapes(want.config):
        np.testing.assert_array_equal(_get(got.params, name), _get(want.params, name))


@pytest.mark.parametrize("protocol", [0, 1])
def test_pickle_protocols_0_and_1_are_refused_by_name(tiny_raw, tmp_path, protocol):
    path = _write(tmp_path / f"p{protocol}.pkl", tiny_raw, protocol)
    with pytest.raises(CheckpointError, match="protocol 0 or 1 .*reads protocols 2 to 5: re-save"):
        load_checkpoint(path)
