"""Importing deploy/modal_app.py as `modal deploy` would, with what it asks of Modal recorded (no credentials)."""

from __future__ import annotations

import importlib
import sys
import tomllib
from pathlib import Path

import modal

REPO = Path(__file__).resolve().parents[1]


def fresh_import():
    sys.modules.pop("deploy.modal_app", None)
    return importlib.import_module("deploy.modal_app")


def import_recording(monkeypatch, **env):
    """Import the Modal file (with `env` set) with Modal's decorators and image steps wrapped to record what the
    file asks of them: [(kind, name, kwargs)], the image steps as ("image", step, {"args": ..., **kwargs}).

    The real decorators and image methods still run, so an option Modal 1.x does not accept fails the import.
    """
    for key in ("PERCEPIANO_MODAL_TARGET", "PERCEPIANO_GPU_SNAPSHOT"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    calls: list[tuple[str, str, dict]] = []

    names: dict[int, str] = {}  # what an inner decorator returned -> the name of what it wrapped

    def name_of(target) -> str:
        return names.get(id(target)) or target.__name__

    def recording(kind: str, make_decorator):
        def decorator(target):
            calls.append((kind, name_of(target), kwargs_of[id(decorator)]))
            result = make_decorator()(target)
            names[id(result)] = name_of(target)
            return result

        return decorator

    kwargs_of: dict[int, dict] = {}

    def wrap_factory(kind: str, real):
        def factory(*args, **kwargs):
            deco = recording(kind, lambda: real(*args, **kwargs))
            kwargs_of[id(deco)] = kwargs
            return deco

        return factory

    for kind in ("enter", "asgi_app", "method", "concurrent"):
        monkeypatch.setattr(modal, kind, wrap_factory(kind, getattr(modal, kind)))
    for kind in ("cls", "function"):
        real = getattr(modal.App, kind)
        monkeypatch.setattr(modal.App, kind, lambda self, _real=real, _kind=kind, **kw:
                            wrap_factory(_kind, lambda **k: _real(self, **k))(**kw))
    for step in ("pip_install", "pip_install_from_requirements", "pip_install_from_pyproject", "env"):
        real = getattr(modal.Image, step)
        monkeypatch.setattr(modal.Image, step, lambda self, *a, _real=real, _step=step, **kw:
                            calls.append(("image", _step, {"args": a, **kw})) or _real(self, *a, **kw))
    return fresh_import(), calls


def options(calls, kind: str, name: str) -> dict:
    found = [kw for k, n, kw in calls if k == kind and n == name]
    assert len(found) == 1, (kind, name, calls)
    return found[0]


def image_steps(calls, step: str) -> list[dict]:
    return [kw for kind, name, kw in calls if kind == "image" and name == step]


def gate_onnxruntime() -> str:
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    return next(d for d in extras["convert"] if d.startswith("onnxruntime==")).split("==")[1]
