"""The import graph keeps the architecture's rooms apart (read from the source, lazy imports included).

- the lean core (``runtime/*.py`` but the CLI) imports numpy, onnxruntime and the codecs, nothing of the HTTP
  service, the corpus runner, Modal, the web framework, the converter or the benchmarks;
- ``runtime`` as a whole never imports ``convert``, ``benchmarks``, ``deploy``, Modal, JAX, TensorFlow,
  scikit-learn or librosa;
- the corpus room knows nothing of the service; the service's plain-Python modules take no FastAPI types;
- dependencies point one way, ``benchmarks -> convert -> runtime`` (``deploy`` -> ``runtime``), and no two
  modules import each other.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("runtime", "convert", "benchmarks", "deploy")
HEAVY = {"jax", "jaxlib", "flax", "tensorflow", "tf2onnx", "sklearn", "librosa", "torch"}
WEB = {"fastapi", "starlette", "uvicorn", "pydantic", "prometheus_client", "multipart", "python_multipart"}
CORE_MAY_IMPORT = {"numpy", "onnxruntime", "soundfile", "soxr", "av", "rich"}  # and the standard library
SHELLS = {"runtime.cli", "runtime.__main__"}  # the CLI wires the rooms together (lazily)
PLAIN_SERVICE = ("runtime.serve.service", "runtime.serve.settings", "runtime.serve.batcher",
                 "runtime.serve.mel_input", "runtime.serve.original_contract")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every module named in an import statement anywhere in the file (top level or inside a function)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)  # `from runtime import cli`
    return names


GRAPH = {module_name(p): imports_of(p) for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))}


def offending(modules, banned) -> dict[str, list[str]]:
    def hit(name: str) -> bool:
        return any(name == b or name.startswith(b + ".") for b in banned)

    return {m: sorted(n for n in GRAPH[m] if hit(n)) for m in modules if any(hit(n) for n in GRAPH[m])}


def in_room(prefix: str) -> list[str]:
    return [m for m in GRAPH if m == prefix or m.startswith(prefix + ".")]


def test_the_graph_was_read():
    assert {"runtime.analyze", "runtime.serve.app", "runtime.corpus.runner", "deploy.modal_app"} <= set(GRAPH)


def test_the_lean_core_imports_only_numpy_onnxruntime_and_the_codecs():
    import sys

    core = [m for m in GRAPH if m.startswith("runtime") and m.count(".") <= 1 and m not in SHELLS
            and not m.startswith(("runtime.serve", "runtime.corpus"))]
    assert "runtime.audio" in core and "runtime.model" in core
    third_party = {}
    for m in core:
        outside = {n.split(".")[0] for n in GRAPH[m]} - {"runtime", "__future__"} - set(sys.stdlib_module_names)
        if outside - CORE_MAY_IMPORT:
            third_party[m] = sorted(outside - CORE_MAY_IMPORT)
    assert third_party == {}
    assert offending(core, ["runtime.serve", "runtime.corpus"]) == {}


def test_runtime_knows_nothing_of_modal_the_converter_or_heavy_frameworks():
    assert offending(in_room("runtime"), ["convert", "benchmarks", "deploy", "modal", *HEAVY]) == {}


def test_the_corpus_room_knows_nothing_of_the_service_or_the_web():
    assert offending(in_room("runtime.corpus"), ["runtime.serve", *WEB]) == {}


@pytest.mark.parametrize("module", PLAIN_SERVICE)
def test_the_service_s_plain_python_takes_no_web_framework_types(module):
    assert offending([module], ["fastapi", "starlette", "uvicorn"]) == {}


def test_dependencies_point_one_way():
    assert offending(in_room("convert"), ["benchmarks", "deploy"]) == {}
    assert offending(in_room("deploy"), ["convert", "benchmarks"]) == {}


def test_no_two_modules_import_each_other():
    def uses(a: str, b: str) -> bool:
        return any(n == b or n.startswith(b + ".") and n[len(b) + 1:].isidentifier() for n in GRAPH[a])

    pairs = sorted((a, b) for a in GRAPH for b in GRAPH if a < b and uses(a, b) and uses(b, a)
                   and not (b.startswith(a + ".") or a.startswith(b + ".")))  # a package's __init__ re-exports
    assert pairs == []
