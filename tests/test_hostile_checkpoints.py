"""Resource attacks on the checkpoint loader: each is refused with one CheckpointError line, quickly, in bounded memory.

The corpus is generated here: deep nesting, shared-reference blowups ("billion laughs") in every field,
absurd configs, memo and declared-size tricks, trailing data, old pickle protocols. Every sample is
loaded in one subprocess under an address-space limit, so a regression fails the test (a MemoryError
traceback, a crash or a timeout) instead of hanging or killing the machine running it.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from sklearn.preprocessing import StandardScaler

from convert.checkpoint import expected_param_shapes
from convert.config import PRESETS

REPO = Path(__file__).resolve().parents[1]
MEMORY_LIMIT = 1 << 30  # bytes of address space for the loading process
CPU_SECONDS = 1.0  # per sample


def _base() -> dict:
    """A valid tiny checkpoint with numpy leaves (no JAX needed to write it)."""
    rng = np.random.default_rng(0)
    tree: dict = {}
    for name, shape in expected_param_shapes(PRESETS["tiny"]).items():
        *parents, leaf = name.split("/")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = rng.standard_normal(shape).astype(np.float32)
    return {
        "params": {"params": tree},
        "model_config": PRESETS["tiny"].checkpoint_dict(),
        "finetuning_results": None,
        "label_scaler": StandardScaler().fit(rng.random((50, 19))),
        "training_complete": True,
    }


class _Reduce:
    """Pickles as fn(*args), or fn(*args) then BUILD(state) when a state is given."""

    def __init__(self, fn, args, state=None):
        self.fn, self.args, self.state = fn, args, state

    def __reduce__(self):
        return (self.fn, self.args) if self.state is None else (self.fn, self.args, self.state)


def _dag(kind=list, levels: int = 60):
    """A container of 2**levels leaves as a tree, `levels` objects as a DAG (pickle's memo shares them)."""
    x = kind()
    for _ in range(levels):
        x = kind((x, x))
    return x


def _with(base: dict, **changes) -> bytes:
    return pickle.dumps({**base, **changes}, protocol=4)


def _in_params(base: dict, leaf) -> bytes:
    tree = {**base["params"]["params"], "patch_embedding": {"kernel": leaf, "bias": np.zeros(64, np.float32)}}
    return _with(base, params={"params": tree})


def _array(shape, data: bytes, dtype=np.float32):
    """A numpy array pickled as numpy does (_reconstruct + BUILD), with whatever shape and data we say."""
    fn, args, _ = np.zeros(1, dtype).__reduce__()
    return _Reduce(fn, args, (1, shape, np.dtype(dtype), False, data))


def _deep_tuple(n: int) -> bytes:
    return b")" + b"\x85" * n  # EMPTY_TUPLE, then TUPLE1 n times


def corpus(base: dict) -> dict[str, tuple[bytes, str]]:
    """name -> (pickle bytes, regex the one-line error must match)."""
    p4, stop = b"\x80\x04", b"."
    dag_work = p4 + b"}(" + b"".join(b"X" + struct.pack("<I", 6) + b"k%05d" % i + b"N" for i in range(5000))
    dag_work += b"u\x940" + b"\x8c\x15flax.core.frozen_dict\x8c\nFrozenDict\x93h\x00\x85R0" * 300 + b"N."
    scalar_fn = np.float32(1).__reduce__()[0]
    scaler = StandardScaler().fit(np.random.default_rng(0).random((50, 19)))
    scaler.extra_ = _dag()
    valid = pickle.dumps(base, protocol=4)
    deep = "containers nested more than 64 deep"
    tree = "more than 1,000,000 items as a tree"
    return {
        # 1. deep nesting (today: a segfault while hashing the frozenset key, before any depth check)
        "tuple nested 1e6 deep": (p4 + _deep_tuple(10**6) + stop, deep),
        "1e6-deep tuple in a frozenset dict key": (p4 + b"}(" + _deep_tuple(10**6) + b"\x91Ns" + stop, deep),
        "frozenset dict key": (p4 + b"}(K\x01\x91Ns" + stop, "a frozenset"),
        "tuple dict key": (p4 + b"}K\x01\x85Ns" + stop, "a dict key that is not a name"),
        "list nested 4e4 deep": (p4 + b"]" * 40_000 + b"a" * 39_999 + stop, deep),
        "1e5 open MARKs": (p4 + b"(" * 100_000 + stop, "open MARKs"),
        "dicts nested 300 deep in params": (_in_params(base, _deep_dict(300)), deep),
        # 2. shared references: small as a DAG, exponential as a tree
        "DAG in the params tree": (_in_params(base, _dag()), tree),
        "DAG in model_config": (_with(base, model_config={"embed_dim": _dag(tuple)}), tree),
        "DAG as training_complete": (_with(base, training_complete=_dag()), tree),
        "DAG in finetuning_results": (_with(base, finetuning_results={"history": _dag()}), tree),
        "DAG in the scaler's state": (_with(base, label_scaler=scaler), tree),
        "DAG as a numpy scalar's data": (_with(base, training_complete=_Reduce(scalar_fn, (np.dtype("?"), _dag()))),
                                         tree),
        "DAG as an array's shape": (_in_params(base, _array(_dag(tuple), b"")), tree),
        "DAG through DUP": (p4 + b"]" + b"2\x86" * 60 + stop, tree),
        "one dict copied by 300 FrozenDict calls": (dag_work, "calls whose arguments hold more than"),
        # ... and DAGs small enough for the pre-scan (2**15 as a tree) meet the validators' own bounds
        "small DAG in finetuning_results": (_with(base, finetuning_results={"h": _dag(levels=15)}),
                                            "too big for metadata"),
        "small DAG of dicts in params": (_in_params(base, _dag_dict(12)),
                                         r"params in .* hold more than \d+ entries; its model_config .* has 41 par"),
        "small DAG as training_complete": (_with(base, training_complete=_dag(levels=15)),
                                           r"training_complete in .* is \[\[\[\[\.\.\.\]"),
        "small DAG in model_config": (_with(base, model_config={"embed_dim": _dag(tuple, 15)}),
                                      r"embed_dim is \(\(\(\(\.\.\.\)"),
        # 3. absurd configurations (today: minutes of shape computation, or a traceback)
        "num_layers 1e9": (_with(base, model_config={**base["model_config"], "num_layers": 10**9}), "num_layers"),
        "num_heads 0": (_with(base, model_config={**base["model_config"], "num_heads": 0}), "num_heads is 0"),
        "embed_dim 2**62": (_with(base, model_config={**base["model_config"], "embed_dim": 2**62}), "embed_dim"),
        "patch_size inf": (_with(base, model_config={**base["model_config"], "patch_size": float("inf")}),
                           "expected an integer"),
        # 4. memo and declared-size tricks
        "9-byte file, LONG_BINPUT 2**31": (p4 + b"Nr\xf0\xff\xff\x7f" + stop, "memo index 2147483632 beyond"),
        "PUT 99999999999": (p4 + b"Np99999999999\n" + stop, "memo index 99999999999 beyond"),
        "Python 2 str": (p4 + b"U\x03abc" + stop, "a Python 2 str"),
        "Python 2 str of 5 kB": (p4 + b"T" + struct.pack("<i", 5000) + b"a" * 5000 + stop, "a Python 2 str"),
        "BINGET of an unset entry": (p4 + b"h\x05" + stop, "never set"),
        "BINBYTES8 of 2**62 bytes": (p4 + b"\x8e" + struct.pack("<Q", 2**62) + b"xx" + stop, "expected .* bytes"),
        "BINUNICODE8 of 2**62 bytes": (p4 + b"\x8d" + struct.pack("<Q", 2**62) + b"xx" + stop, "expected .* bytes"),
        "BYTEARRAY8 of 2**62 bytes": (b"\x80\x05\x96" + struct.pack("<Q", 2**62) + b"xx" + stop, "expected .* bytes"),
        "BINBYTES of 4 GB": (p4 + b"B" + struct.pack("<I", 2**32 - 1) + b"xx" + stop, "expected .* bytes"),
        "FRAME of 2**60 bytes": (p4 + b"\x95" + struct.pack("<Q", 2**60) + b"N" + stop, "a FRAME of"),
        "LONG4 of a million bytes": (p4 + b"\x8b" + struct.pack("<i", 10**6) + b"\x01" * 10**6 + stop,
                                     "beyond 64 bits"),
        "array of 1e18 floats with 4 bytes of data": (_in_params(base, _array((10**9, 10**9), b"\0" * 4)),
                                                      "does not fit shape"),
        "150,000 opcodes": (p4 + b"N0" * 75_000 + b"N" + stop, "more than 100,000 opcodes"),
        # 5. anything after STOP
        "a second pickle appended": (valid + pickle.dumps(1), "trailing data after the pickle's STOP opcode"),
        "one zero byte appended": (valid + b"\0", r"trailing data after the pickle's STOP opcode \(1 bytes"),
        # 7. protocols 0 and 1
        "protocol 0": (pickle.dumps(base, protocol=0), "protocol 0 or 1"),
        "protocol 1": (pickle.dumps(base, protocol=1), "protocol 0 or 1"),
    }


def _dag_dict(levels: int) -> dict:
    d: dict = {"w": np.zeros(1, np.float32)}
    for _ in range(levels):
        d = {"a": d, "b": d}
    return d


def _deep_dict(n: int) -> dict:
    d: dict = {}
    for _ in range(n):
        d = {"x": d}
    return d


_LOADER = textwrap.dedent("""
    import json, os, resource, sys, time
    resource.setrlimit(resource.RLIMIT_AS, (int(sys.argv[1]), int(sys.argv[1])))
    from convert.checkpoint import load_checkpoint
    from convert.errors import CheckpointError
    for path in sys.argv[2:]:
        start = time.process_time()
        try:
            load_checkpoint(path)
            outcome = "loaded"
        except CheckpointError as exc:
            outcome = str(exc)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps({"path": path, "outcome": outcome, "cpu": time.process_time() - start, "rss_mb": rss}),
              flush=True)
""")


def _env() -> dict:
    # one BLAS thread: OpenBLAS reserves address space per thread, which the limit would count
    return {**os.environ, "PYTHONPATH": str(REPO), "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def samples(tmp_path_factory) -> dict[str, tuple[Path, str]]:
    root = tmp_path_factory.mktemp("hostile")
    base = _base()
    out = {"valid (control)": (root / "valid.pkl", "loaded")}
    out["valid (control)"][0].write_bytes(pickle.dumps(base, protocol=4))
    for i, (name, (data, message)) in enumerate(corpus(base).items()):
        path = root / f"sample{i:02d}.pkl"
        path.write_bytes(data)
        out[name] = (path, message)
    return out


def test_corpus_is_refused_quickly_in_bounded_memory(samples):
    assert len(samples) > 30
    paths = [str(path) for path, _ in samples.values()]
    proc = subprocess.run([sys.executable, "-c", _LOADER, str(MEMORY_LIMIT), *paths], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=300)
    results = {r["path"]: r for r in map(json.loads, proc.stdout.splitlines())}
    assert proc.returncode == 0, proc.stderr[-3000:]  # a crash, or an error other than CheckpointError
    assert "Traceback" not in proc.stderr
    for name, (path, message) in samples.items():
        result = results[str(path)]
        outcome = result["outcome"]
        if message == "loaded":
            assert outcome == "loaded", (name, outcome)
            continue
        assert "\n" not in outcome and len(outcome) < 600, (name, outcome)
        assert re.search(message, outcome), (name, outcome)
        assert result["cpu"] < CPU_SECONDS, (name, result)


@pytest.mark.parametrize("name", ["tuple nested 1e6 deep", "9-byte file, LONG_BINPUT 2**31",
                                  "DAG in finetuning_results"])
def test_cli_export_refuses_with_one_line(samples, name, tmp_path):
    path, message = samples[name]
    out = tmp_path / "model.onnx"
    proc = subprocess.run([sys.executable, "-m", "convert", "-q", "export", "--checkpoint", str(path),
                           "--out", str(out)], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: refusing to load"), proc.stderr[-3000:]
    assert re.search(message, lines[0])
    assert not out.exists()
