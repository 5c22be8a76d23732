"""Checkpoint loading: the allowlist unpickler against hostile pickles, validation errors, demo checkpoints."""

from __future__ import annotations

import hashlib
import os
import pickle
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from convert.checkpoint import expected_param_shapes, load_checkpoint
from convert.config import PRESETS
from convert.demo import make_demo_checkpoint
from convert.errors import CheckpointError
from convert.safe_pickle import safe_loads

REPO = Path(__file__).resolve().parents[1]


def _numpy_copy(raw: dict) -> dict:
    """The checkpoint dict with numpy leaves instead of jax.Arrays, for editing."""
    import jax

    return {**raw, "params": jax.tree_util.tree_map(np.array, raw["params"])}


def _write(path: Path, obj, protocol: int = 4) -> Path:
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    return path


# ---------------------------------------------------------------- demo checkpoints and what loads


def test_demo_checkpoint_loads(tiny_checkpoint, tiny_raw):
    ck = load_checkpoint(tiny_checkpoint)
    assert ck.config == PRESETS["tiny"]
    assert ck.sha256 == hashlib.sha256(tiny_checkpoint.read_bytes()).hexdigest()
    assert ck.training_complete is False  # never trained, and its own fields say so
    assert ck.finetuning_results == tiny_raw["finetuning_results"]  # carried over unchanged (the demo's may be None)
    assert ck.finetuning_results is None  # a demo checkpoint invents no fine-tuning results
    assert ck.untrained
    assert ck.variables() == {"params": ck.params}
    raw_params = tiny_raw["params"]["params"]
    shapes = expected_param_shapes(ck.config)
    for name, shape in shapes.items():
        got = _get(ck.params, name)
        want = np.asarray(_get(raw_params, name))
        assert got.shape == shape and got.dtype == np.float32
        np.testing.assert_array_equal(got, want)
    scaler = tiny_raw["label_scaler"]
    assert type(scaler).__name__ == "StandardScaler"
    np.testing.assert_array_equal(ck.scaler_mean, scaler.mean_)
    np.testing.assert_array_equal(ck.scaler_scale, scaler.scale_)
    assert ck.scaler_mean.shape == (19,) and ck.scaler_mean.dtype == np.float64
    assert np.all((0.4 <= ck.scaler_mean) & (ck.scaler_mean <= 0.7))
    assert np.all((0.03 <= ck.scaler_scale) & (ck.scaler_scale <= 0.17))


def _get(tree: dict, name: str):
    for part in name.split("/"):
        tree = tree[part]
    return tree


@pytest.mark.slow  # initialises the model twice
def test_demo_checkpoint_is_deterministic(tiny_checkpoint, tmp_path):
    again = make_demo_checkpoint(tmp_path / "again.pkl", "tiny", seed=0)
    assert again.read_bytes() == tiny_checkpoint.read_bytes()
    other = make_demo_checkpoint(tmp_path / "other.pkl", "tiny", seed=1)
    assert other.read_bytes() != tiny_checkpoint.read_bytes()
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_frozendict_numpy_and_protocol5_leaves(tiny_raw, tmp_path):
    from flax.core import FrozenDict

    ckpt = _numpy_copy(tiny_raw)
    ckpt["params"] = FrozenDict(ckpt["params"])  # older files; numpy leaves pickle via _frombuffer here
    ckpt["finetuning_results"] = {
        "best_val_correlation": np.float64(0.61),
        "total_epochs": np.int64(30),
        "convergence_achieved": np.bool_(True),
    }
    ckpt["training_complete"] = np.bool_(True)
    ck = load_checkpoint(_write(tmp_path / "fd.pkl", ckpt, protocol=5))
    assert type(ck.params) is dict and type(ck.params["final_norm"]) is dict
    np.testing.assert_array_equal(ck.params["pos_embedding"], np.asarray(ckpt["params"]["params"]["pos_embedding"]))
    assert ck.finetuning_results == {"best_val_correlation": 0.61, "total_epochs": 30, "convergence_achieved": True}
    assert not ck.untrained  # complete, with results: a trained model


def test_numpy1_module_paths_and_byte_orders():
    import jax.numpy as jnp

    obj = {
        "be": np.arange(6, dtype=">f8").reshape(2, 3),
        "fortran": np.asfortranarray(np.eye(3, 2)),
        "scalar": np.int32(7),
        "jax": jnp.arange(4.0),
        "empty": np.zeros((0, 3), np.float32),
    }
    numpy2 = pickle.dumps(obj, protocol=3)  # GLOBAL opcodes: module paths are plain text
    assert b"numpy._core.multiarray" in numpy2
    for data in (numpy2, numpy2.replace(b"cnumpy._core.", b"cnumpy.core.")):
        out = safe_loads(data)
        for key, value in obj.items():
            np.testing.assert_array_equal(out[key], np.asarray(value))
            assert np.asarray(out[key]).dtype == np.asarray(value).dtype
        assert isinstance(out["scalar"], np.int32) and out["fortran"].flags.f_contiguous


def test_expected_param_shapes_match_flax():
    import jax
    import jax.numpy as jnp

    from convert.model import ProductionASTForRegression

    for name, config in PRESETS.items():
        x = jnp.zeros((1, config.n_frames, config.n_mels))
        abstract = jax.eval_shape(ProductionASTForRegression(config).init, jax.random.PRNGKey(0), x)
        flat = {
            "/".join(k.key for k in path): leaf.shape
            for path, leaf in jax.tree_util.tree_flatten_with_path(abstract["params"])[0]
        }
        assert flat == expected_param_shapes(config), name
    total = sum(int(np.prod(s)) for s in expected_param_shapes(PRESETS["production"]).values())
    assert total == 85_706_003


def test_loads_without_jax_flax_or_sklearn(tiny_checkpoint):
    script = textwrap.dedent(f"""
        import sys
        BLOCKED = {{"jax", "jaxlib", "flax", "sklearn"}}

        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ImportError(f"{{name}} is blocked in this test")

        sys.meta_path.insert(0, Block())
        from convert.checkpoint import load_checkpoint
        ck = load_checkpoint({str(tiny_checkpoint)!r})
        assert ck.num_params == {sum(int(np.prod(s)) for s in expected_param_shapes(PRESETS["tiny"]).values())}
        assert ck.scaler_scale.shape == (19,)
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
        assert not loaded, loaded
        print("OK")
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr


# ---------------------------------------------------------------- hostile pickles
# Payloads are written as raw opcodes from a small notation: G("mod:name") is a GLOBAL, a tuple
# (f, *args) is the call f(*args) (MARK ... TUPLE REDUCE), a str is a BINUNICODE, a list a list,
# bytes are raw opcodes.


class G(str):
    """A global, 'module:name'."""


def _ops(x) -> bytes:
    if isinstance(x, G):
        return "c{}\n{}\n".format(*x.split(":")).encode()
    if isinstance(x, str):
        return b"X" + struct.pack("<I", len(x.encode())) + x.encode()
    if isinstance(x, bytes):
        return x
    if isinstance(x, list):
        return b"](" + b"".join(map(_ops, x)) + b"e"
    return _ops(x[0]) + b"(" + b"".join(map(_ops, x[1:])) + b"tR"  # a call


def _pickle(*parts) -> bytes:
    return b"\x80\x04" + b"".join(map(_ops, parts)) + b"."


class _Reduce:
    """Pickles as fn(*args), as a malicious checkpoint would."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _hostile(marker: Path) -> dict[str, tuple[bytes, str]]:
    """name -> (pickle bytes, text the error must contain); each payload tries `touch marker`."""
    cmd, py = f"touch {marker}", f"__import__('os').system('touch {marker}')"
    os_system = _pickle((G("os:system"), cmd))
    inner = str(marker.with_name("inner.pkl"))  # numpy.load's target: written by the test
    tree = {"patch_embedding": {"kernel": [np.zeros(2), _Reduce(os.system, cmd)]}}
    ckpt_like = {"params": {"params": tree}, "model_config": PRESETS["tiny"].checkpoint_dict()}
    jax_array, t, f = G("jax._src.array:_reconstruct_array"), b"\x88", b"\x89"
    import_os = (G("importlib:import_module"), "os")
    return {
        "os.system": (os_system, "'os.system'"),
        "posix.system via __reduce__": (pickle.dumps(_Reduce(os.system, cmd)), "'posix.system'"),
        "builtins.eval": (_pickle((G("builtins:eval"), py)), "'builtins.eval'"),
        "builtins.exec": (_pickle((G("builtins:exec"), py)), "'builtins.exec'"),
        "subprocess.Popen": (_pickle((G("subprocess:Popen"), ["touch", str(marker)])), "'subprocess.Popen'"),
        "subprocess.check_output": (
            pickle.dumps(_Reduce(subprocess.check_output, ["touch", str(marker)])),
            "'subprocess.check_output'",
        ),
        "getattr(__import__('os'), 'system')": (
            _pickle(((G("builtins:getattr"), (G("builtins:__import__"), "os"), "system"), cmd)),
            "'builtins.getattr'",
        ),
        "INST opcode": (_pickle(b"(", cmd, b"ios\nsystem\n"), "'os.system'"),
        "admitted FrozenDict around system()": (
            _pickle((G("flax.core.frozen_dict:FrozenDict"), (G("posix:system"), cmd))),
            "'posix.system'",
        ),
        "reduce in a list in the params tree": (pickle.dumps(ckpt_like), "'posix.system'"),
        "jax _reconstruct_array with fun=os.system": (
            _pickle((jax_array, G("os:system"), b"(", cmd, b"t)}")),
            "'os.system'",
        ),
        "jax _reconstruct_array with fun=numpy.dtype": (
            _pickle((jax_array, G("numpy:dtype"), b"(", "f4", f + t + b"t)}")),
            "rather than numpy's _reconstruct",
        ),
        "numpy object array holding a reduce": (
            pickle.dumps(np.array([_Reduce(os.system, cmd), 1], dtype=object)),
            "numpy dtype 'O",
        ),
        "numpy.load of a pickle": (_pickle((G("numpy:load"), inner, b"N" + t)), "'numpy.load'"),
        "numpy.testing runstring": (
            _pickle((G("numpy.testing._private.utils:runstring"), py, b"}")),
            "'numpy.testing._private.utils.runstring'",
        ),
        "copyreg._reconstructor(Popen)": (
            _pickle(
                (G("copyreg:_reconstructor"), G("subprocess:Popen"), G("subprocess:Popen"), ["touch", str(marker)])
            ),
            "'copyreg._reconstructor'",
        ),
        "nested pickle.loads": (
            _pickle((G("pickle:loads"), b"B" + struct.pack("<I", len(os_system)) + os_system)),
            "'pickle.loads'",
        ),
        "operator.attrgetter": (
            _pickle((((G("operator:attrgetter"), "system"), import_os), cmd)),
            "'operator.attrgetter'",
        ),
        "importlib.import_module + methodcaller": (
            _pickle(import_os, b"p0\n0", ((G("operator:methodcaller"), "system", cmd), b"g0\n")),
            "'importlib.import_module'",
        ),
        "StandardScaler state holding a reduce": (
            _pickle(
                G("sklearn.preprocessing._data:StandardScaler"), b")\x81}", "mean_", (G("posix:system"), cmd), b"sb"
            ),
            "'posix.system'",
        ),
        "numpy.ndarray stand-in called": (_pickle((G("numpy:ndarray"), cmd)), "'numpy.ndarray'"),
    }


def test_hostile_payload_really_runs_under_plain_pickle(tmp_path):
    marker = tmp_path / "pwned"
    pickle.loads(_hostile(marker)["os.system"][0])  # what `pickle.load` of an untrusted checkpoint does
    assert marker.exists()


_CASES = list(_hostile(Path("/nonexistent/pwned")))


@pytest.mark.parametrize("case", _CASES)
def test_hostile_pickle_is_refused(case, tmp_path):
    assert len(_CASES) >= 12
    marker = tmp_path / "pwned"
    cases = _hostile(marker)
    (tmp_path / "inner.pkl").write_bytes(cases["os.system"][0])
    path = tmp_path / "evil.pkl"
    path.write_bytes(cases[case][0])
    with pytest.raises(CheckpointError, match="refusing") as err:
        load_checkpoint(path)
    assert cases[case][1] in str(err.value)
    if "Popen" in case or "check_output" in case:
        time.sleep(0.2)  # a process started by mistake would touch the marker asynchronously
    assert not marker.exists()


# ---------------------------------------------------------------- broken files


def test_unreadable_files(tiny_checkpoint, tmp_path):
    data = tiny_checkpoint.read_bytes()
    cases = {
        "truncated.pkl": (data[: len(data) // 2], "cannot unpickle"),
        "random.pkl": (np.random.default_rng(0).bytes(4096), "cannot unpickle|refusing"),
        "empty.pkl": (b"", "empty"),
        "list.pkl": (pickle.dumps([1, 2]), "not the checkpoint dict"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointError, match=message):
            load_checkpoint(tmp_path / name)
    with pytest.raises(CheckpointError, match="directory"):
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pkl")


def test_missing_keys_and_bad_config(tiny_raw, tmp_path):
    ckpt = _numpy_copy(tiny_raw)
    partial = {k: ckpt[k] for k in ("params", "model_config")}
    with pytest.raises(CheckpointError, match=r"lacks the keys \['label_scaler', 'training_complete'\]"):
        load_checkpoint(_write(tmp_path / "partial.pkl", partial))
    bad = {**ckpt, "model_config": {**ckpt["model_config"], "num_heads": 7}}
    with pytest.raises(CheckpointError, match="bad model_config.*not divisible"):
        load_checkpoint(_write(tmp_path / "badcfg.pkl", bad))
    for key, value, message in (
        ("num_heads", 0, "num_heads is 0; expected 1..8192"),
        ("num_heads", 128, "embed_dim 64 is not divisible by num_heads 128"),
        ("num_layers", -1, "num_layers is -1; expected 1..64"),
        ("num_layers", 10**9, "num_layers is 1000000000; expected 1..64"),
        ("embed_dim", 2**62, "embed_dim is 4611686018427387904; expected 1..8192"),
        ("patch_size", 0, "patch_size is 0; expected 1..128"),
        ("patch_size", 4.0, r"patch_size is 4.0 \(a float\); expected an integer"),
        ("embed_dim", float("inf"), r"embed_dim is inf \(a float\); expected an integer"),
        ("num_heads", "4", r"num_heads is '4' \(a str\); expected an integer"),
        ("num_layers", True, r"num_layers is True \(a bool\); expected an integer"),
        ("num_outputs", 18, "num_outputs is 18; expected 19"),
        ("n_frames", 64, "n_frames is 64; expected 128"),
    ):
        absurd = {**ckpt, "model_config": {**ckpt["model_config"], key: value}}
        with pytest.raises(CheckpointError, match="bad model_config .*: " + message):
            load_checkpoint(_write(tmp_path / "absurd.pkl", absurd))
    numpy_ints = {**ckpt, "model_config": {k: np.int64(v) for k, v in ckpt["model_config"].items()}}
    assert load_checkpoint(_write(tmp_path / "np.pkl", numpy_ints)).config == PRESETS["tiny"]
    unknown = {**ckpt, "model_config": {**ckpt["model_config"], "dropout": 0.1}}
    with pytest.raises(CheckpointError, match="unknown model_config keys"):
        load_checkpoint(_write(tmp_path / "unknown.pkl", unknown))


def test_params_mismatch_listed_in_one_error(tiny_raw, tmp_path):
    ckpt = _numpy_copy(tiny_raw)
    tree = ckpt["params"]["params"]
    del tree["attention_layer1"]["key"]["bias"]
    tree["final_norm"]["extra"] = np.zeros(3, np.float32)
    tree["patch_embedding"]["kernel"] = tree["patch_embedding"]["kernel"][:, :63]
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(_write(tmp_path / "mismatch.pkl", ckpt))
    message = str(err.value)
    assert "- attention_layer1/key/bias (4, 16)" in message
    assert "+ final_norm/extra (3,)" in message
    assert "~ patch_embedding/kernel: got (256, 63), expected (256, 64)" in message


def test_non_finite_weight_is_named(tiny_raw, tmp_path):
    ckpt = _numpy_copy(tiny_raw)
    ckpt["params"]["params"]["mlp_dense2_layer0"]["kernel"][3, 5] = np.nan
    with pytest.raises(CheckpointError, match=r"non-finite weights .*mlp_dense2_layer0/kernel \(1 NaN"):
        load_checkpoint(_write(tmp_path / "nan.pkl", ckpt))


def test_bad_label_scaler(tiny_raw, tmp_path):
    from sklearn.preprocessing import StandardScaler

    ckpt = _numpy_copy(tiny_raw)
    short = {**ckpt, "label_scaler": StandardScaler().fit(np.random.default_rng(0).random((50, 18)))}
    with pytest.raises(CheckpointError, match=r"label_scaler.mean_ .*shape \(18,\); expected \(19,\)"):
        load_checkpoint(_write(tmp_path / "short.pkl", short))
    zero = StandardScaler().fit(np.random.default_rng(0).random((50, 19)))
    zero.scale_[4] = 0.0
    with pytest.raises(CheckpointError, match="non-positive"):
        load_checkpoint(_write(tmp_path / "zero.pkl", {**ckpt, "label_scaler": zero}))
    odd = StandardScaler().fit(np.random.default_rng(0).random((50, 19)))
    odd.with_mean = np.ones(3)  # its truth value would raise ValueError
    with pytest.raises(CheckpointError, match=r"label_scaler.with_mean .* is array\(\[1., 1., 1.\]\), not a bool"):
        load_checkpoint(_write(tmp_path / "odd.pkl", {**ckpt, "label_scaler": odd}))
    with pytest.raises(CheckpointError, match="not a fitted sklearn StandardScaler"):
        load_checkpoint(_write(tmp_path / "dict.pkl", {**ckpt, "label_scaler": {"mean_": [0.5] * 19}}))
