"""Modal deployment: the same FastAPI app as `python -m runtime serve`, on an A10G or on CPUs, with memory snapshots.

One switch at deploy time, PERCEPIANO_MODAL_TARGET (read when this file is imported), picks the variant:

* `gpu` (the default): app `percepiano` on an A10G, onnxruntime-gpu, the fp16 or fp32 model.
* `cpu`: app `percepiano-cpu` on 4 CPU cores and 4 GiB (no GPU, for cost), onnxruntime (CPU) pinned to the
  gate's version, the int8 model. A separate app, so it deploys beside the GPU one rather than over it.

The image carries both switches (SERVICE_ENV), so the container's own import of this file declares the same
variant as the deploy did.

One-time setup, then one deploy command per variant (from the repository root; `--quantize auto` writes the
int8 CPU variant to artifacts/model.onnx and the fp16 GPU one beside it):

    modal secret create percepiano-api PERCEPIANO_API_TOKEN=$(openssl rand -hex 32)
    PERCEPIANO_MODEL=artifacts/model.fp16.onnx modal deploy deploy/modal_app.py            # A10G
    PERCEPIANO_MODAL_TARGET=cpu PERCEPIANO_MODEL=artifacts/model.onnx modal deploy deploy/modal_app.py   # int8, CPU

Snapshots. The CPU variant creates its onnxruntime session and warms it up (the self-check) inside
`@modal.enter(snap=True)`, so the memory snapshot holds the ready session; after a restore the self-check
runs once more (two windows) on the restored host's CPU. The GPU variant reads the model bytes before the
snapshot (no GPU then) and creates the CUDA session after restore. PERCEPIANO_GPU_SNAPSHOT=1 (experimental,
off by default; GPU memory snapshots are an alpha Modal feature) moves the CUDA session and its warm-up
before the snapshot too (`experimental_options={"enable_gpu_snapshot": True}`), again re-checked after restore.

Whole corpora, from local folders (`CorpusWorker.analyze_bytes`, resumable, reports written locally; the
GPU app, which `--modal` looks up):

    python -m runtime analyze ./recordings --recursive --out report --modal

or from the Volume (`CorpusWorker.analyze_file`):

    modal volume put percepiano-audio ./recordings recordings
    modal run deploy/modal_app.py --prefix recordings      # writes results/scores.jsonl to the Volume

The model is baked into the image (not read from a Volume): the memory snapshot holds the model bytes anyway,
so a model on a Volume could change under a snapshot that still serves the old one; baked, the image, the
snapshot and the deployment always agree, and one `modal deploy` ships code and model together. This file
only declares image, hardware, snapshot and lifecycle; everything it runs is plain `runtime` code.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Iterable
from pathlib import Path, PurePosixPath
from typing import Any

import modal

REPO = Path(__file__).resolve().parents[1]
TARGETS = ("gpu", "cpu")
SWITCHES = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False, "": False}


def deploy_switches(env=os.environ) -> tuple[str, bool]:
    """(target, gpu_snapshot) from PERCEPIANO_MODAL_TARGET and PERCEPIANO_GPU_SNAPSHOT; a bad value stops here."""
    target = env.get("PERCEPIANO_MODAL_TARGET", "").strip().lower() or "gpu"
    if target not in TARGETS:
        raise ValueError(f"PERCEPIANO_MODAL_TARGET={target!r}: choose one of {TARGETS} (default gpu)")
    raw = env.get("PERCEPIANO_GPU_SNAPSHOT", "").strip().lower()
    if raw not in SWITCHES:
        raise ValueError(f"PERCEPIANO_GPU_SNAPSHOT={raw!r} is not one of {sorted(k for k in SWITCHES if k)}")
    if SWITCHES[raw] and target != "gpu":
        raise ValueError("PERCEPIANO_GPU_SNAPSHOT=1 is for the GPU target; the CPU target snapshots its session "
                         "anyway")
    return target, SWITCHES[raw]


TARGET, GPU_SNAPSHOT = deploy_switches()
SESSION_IN_SNAPSHOT = TARGET == "cpu" or GPU_SNAPSHOT  # session created and warmed before the snapshot
APP_NAME = "percepiano" if TARGET == "gpu" else "percepiano-cpu"
GPU = "A10G" if TARGET == "gpu" else None
CPU_CORES = 4.0  # the CPU target's reservation (physical cores), and its onnxruntime threads
CPU_MEMORY_MB = 4096
SCALEDOWN_WINDOW = 180  # s; restores from a snapshot take seconds, so idle containers need not linger long
MODEL_LOCAL = Path(os.environ.get("PERCEPIANO_MODEL", REPO / "artifacts" / "model.onnx"))
MODEL_REMOTE = "/opt/percepiano/model.onnx"
SECRET_NAME = "percepiano-api"  # holds PERCEPIANO_API_TOKEN
AUDIO_VOLUME = "percepiano-audio"
AUDIO_MOUNT = "/audio"
CORPUS_INPUTS = 4  # files in flight per corpus container: some decode while the model runs the others' windows
CORPUS_BATCH_WAIT_MS = 50.0  # how long a call may wait for the windows of a file still decoding (see CorpusBatches)
WEB_CONCURRENCY = {"max_inputs": 32, "target_inputs": 8}  # requests per container; the app runs 4 (CPU: 2) at once
SERVICE_ENV = {
    # the switches again inside the container, whose import of this file must declare the same variant
    "PERCEPIANO_MODAL_TARGET": TARGET,
    "PERCEPIANO_GPU_SNAPSHOT": "1" if GPU_SNAPSHOT else "0",
    "PERCEPIANO_MODEL_PATH": MODEL_REMOTE,
    "PERCEPIANO_DEVICE": "cuda",  # fail loudly rather than serve from the CPU if CUDA does not load
    "PERCEPIANO_MAX_CONCURRENCY": "4",  # decode/features of some requests overlap inference of others
    "PERCEPIANO_MAX_QUEUE": "32",
}
if TARGET == "cpu":
    SERVICE_ENV = {**SERVICE_ENV, "PERCEPIANO_DEVICE": "cpu", "PERCEPIANO_MAX_CONCURRENCY": "2",
                   "PERCEPIANO_THREADS": str(int(CPU_CORES))}  # onnxruntime's threads: the reserved cores
# What each class asks of Modal: the hardware and the snapshot options of the chosen target.
HARDWARE = {"gpu": GPU} if TARGET == "gpu" else {"cpu": CPU_CORES, "memory": CPU_MEMORY_MB}
SNAPSHOT = {"enable_memory_snapshot": True,
            **({"experimental_options": {"enable_gpu_snapshot": True}} if GPU_SNAPSHOT else {})}

# The serving onnxruntime, pinned exactly. The parity gate ran on onnxruntime 1.32.0 (the `convert` extra), but
# PyPI has no onnxruntime-gpu 1.32.0 wheel (its newest is 1.31.1, checked with `pip index versions
# onnxruntime-gpu`), so the image takes the nearest release; the runtime logs the difference at load, and the
# self-check at start-up measures this version's CUDA kernels on the A10G against the export's stored outputs.
ONNXRUNTIME_GPU = "1.31.1"
ONNXRUNTIME_CPU = "1.32.0"  # the CPU target serves on the very version the gate (and the int8 gate) ran with

app = modal.App(APP_NAME)


def build_image(target: str) -> modal.Image:
    """debian_slim + the pinned onnxruntime of the target + the runtime and serve extras + the baked model."""
    if target == "gpu":  # the pin first, so that the gpu extra's `onnxruntime-gpu>=` floor is already met by it
        pin, extras = f"onnxruntime-gpu[cuda,cudnn]=={ONNXRUNTIME_GPU}", ["gpu", "serve"]
    else:  # the CPU wheel only: the gpu extra (onnxruntime-gpu) would own the same `onnxruntime` module
        pin, extras = f"onnxruntime=={ONNXRUNTIME_CPU}", ["runtime", "serve"]
    return (
        modal.Image.debian_slim(python_version="3.11")
        .pip_install(pin)
        .pip_install_from_pyproject(str(REPO / "pyproject.toml"), optional_dependencies=extras)
        .env(SERVICE_ENV)
        .add_local_file(MODEL_LOCAL, MODEL_REMOTE, copy=True)  # baked: see the module docstring
        # with the page's files (runtime/serve/static)
        .add_local_python_source("runtime", ignore=["**/__pycache__/**"])
    )


image = build_image(TARGET)
audio_volume = modal.Volume.from_name(AUDIO_VOLUME, create_if_missing=True)
api_secret = modal.Secret.from_name(SECRET_NAME, required_keys=["PERCEPIANO_API_TOKEN"])


class ModelContainer:
    """Container lifecycle shared by the web service and the corpus worker (plain runtime code inside)."""

    analyzer = None
    model_bytes = b""  # the GPU target's model, read before the snapshot (its session is made after restore)

    @modal.enter(snap=True)
    def load(self) -> None:
        """Before the snapshot: imports, CUDA library preload, and the model bytes into memory; on the CPU target
        (or with PERCEPIANO_GPU_SNAPSHOT=1) instead the session, created from the baked file (its weights read
        in place, runtime.model.create_session) and warmed up, so the snapshot holds it and no model bytes."""
        import onnxruntime

        import runtime.analyze
        import runtime.serve.app  # noqa: F401  (imported here so the snapshot holds FastAPI too)

        if hasattr(onnxruntime, "preload_dlls") and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
            onnxruntime.preload_dlls()  # dlopen CUDA/cuDNN from the nvidia-* wheels (no CUDA context yet)
        path = Path(os.environ.get("PERCEPIANO_MODEL_PATH", MODEL_REMOTE))
        if SESSION_IN_SNAPSHOT:  # from the file: its weights are read in place, no parse held in the snapshot
            self.create_session(path)
        else:
            self.model_bytes = path.read_bytes()

    @modal.enter(snap=False)
    def start(self) -> None:
        """After restore: create the session and warm it up, or, when the snapshot holds it, check it again here."""
        if self.analyzer is None:
            self.create_session()
            return
        from runtime.self_check import require_passed
        from runtime.serve.app import Settings

        # the host (its CPU's kernels, or its GPU) may differ from the one the snapshot was taken on
        require_passed(self.analyzer.model.run_self_check(),
                       allow_failed=Settings.from_env().allow_failed_self_check)

    def create_session(self, source: Path | None = None) -> None:
        """The session (CUDA: HEURISTIC conv search, IO binding), warmed up; the warm-up is the self-check.

        A failed self-check, an int8 model on CUDA or an fp16 one on the CPU stops the container here rather
        than serving wrong or slow scores. The app built over this Analyzer is ready at once.
        """
        from runtime.analyze import Analyzer
        from runtime.model import OnnxModel
        from runtime.serve.app import Settings, warm_up

        threads = os.environ.get("PERCEPIANO_THREADS", "").strip()
        model = OnnxModel(source or self.model_bytes, device=os.environ.get("PERCEPIANO_DEVICE", "cuda"),
                          threads=int(threads) if threads else None)
        refuse_int8_on_cuda(model)
        refuse_fp16_on_cpu(model)
        settings = Settings.from_env()  # the cap and refusal limit apply to the corpus worker too
        analyzer = Analyzer(model, cap_seconds=settings.cap_seconds, refuse_over_seconds=settings.refuse_over_seconds)
        warm_up(analyzer, allow_failed_self_check=settings.allow_failed_self_check)
        self.analyzer = analyzer
        self.model_bytes = b""  # the session holds its own copy

    def build_app(self):
        """The FastAPI app of runtime.serve.app over the warmed Analyzer (no second warm-up), bearer auth required."""
        from runtime.serve.app import Settings, create_app

        return create_app(self.analyzer, settings=Settings.from_env(require_token=True))

    def analyze_path(self, relpath: str, cap_seconds: float | None = None) -> dict[str, Any]:
        """One file of the audio Volume -> its result; any failure becomes that file's `error` (never raised)."""
        return self.corpus_batches().analyze(relpath, Path(AUDIO_MOUNT) / relpath, cap_seconds)

    def corpus_batches(self) -> CorpusBatches:
        """This container's CorpusBatches, made on first use (after the snapshot: its batcher runs a thread)."""
        with _BATCHES_LOCK:
            if getattr(self, "_batches", None) is None:
                self._batches = CorpusBatches(self.analyzer)
            return self._batches


_BATCHES_LOCK = threading.Lock()


class CorpusBatches:
    """The corpus worker's concurrent files, their windows in shared model calls where the scores allow it.

    For a model whose scores do not depend on their batch neighbours (``ModelInfo.batch_independent``: fp32,
    fp16, per-row int8) the windows of the files in flight go through one runtime.serve.batcher.Batcher: full
    calls of the analyzer's batch size across files, each file still getting the scores it gets alone. A call
    waits at most CORPUS_BATCH_WAIT_MS for a file that is still decoding. Any other model runs each file in its
    own calls, as before. Plain Python (no Modal): tests drive it directly.
    """

    def __init__(self, analyzer, wait_ms: float = CORPUS_BATCH_WAIT_MS) -> None:
        from runtime.constants import NUM_DIMENSIONS
        from runtime.serve.batcher import Batcher

        self.analyzer, self.running, self._lock = analyzer, 0, threading.Lock()
        model = analyzer.model
        self.batcher = Batcher(model.run, wait_ms=wait_ms, max_chunks=analyzer.batch_size,
                               item_shape=model.input_shape, outputs=NUM_DIMENSIONS,
                               active=lambda: self.running) if model.info.batch_independent else None

    def analyze(self, name: str, source, cap_seconds: float | None = None) -> dict[str, Any]:
        """runtime.corpus.runner.analyze_one, its windows through the shared batcher (if any)."""
        from runtime.corpus.runner import analyze_one

        with self._lock:
            self.running += 1
        try:
            return analyze_one(self.analyzer, name, source, cap_seconds,
                               infer=self.batcher.predict if self.batcher else None)
        finally:
            with self._lock:
                self.running -= 1


def refuse_int8_on_cuda(model) -> None:
    """int8 is the CPU variant (dynamic quantization's kernels are CPU kernels): on CUDA deploy fp16 or fp32."""
    from runtime.errors import ModelError

    if model.device == "cuda" and model.info.precision == "int8":
        gpu = ((model.info.variants or {}).get("recommended") or {}).get("gpu", "fp16")
        raise ModelError(f"this is the int8 model, the variant for CPUs; on the GPU deploy the {gpu} variant "
                         f"written beside it: PERCEPIANO_MODEL=artifacts/model.{gpu}.onnx modal deploy "
                         "deploy/modal_app.py")


def refuse_fp16_on_cpu(model) -> None:
    """fp16 is the GPU variant (onnxruntime's CPU provider has few fp16 kernels): on the CPU deploy int8 or fp32."""
    from runtime.errors import ModelError

    if model.device == "cpu" and model.info.precision == "fp16":
        variants = model.info.variants or {}
        cpu = (variants.get("recommended") or {}).get("cpu", "int8")
        name = (variants.get("files") or {}).get(cpu, "model.onnx")
        raise ModelError(f"this is the fp16 model, the variant for GPUs; on the CPU deploy the {cpu} variant "
                         f"written beside it: PERCEPIANO_MODAL_TARGET=cpu PERCEPIANO_MODEL=artifacts/{name} "
                         "modal deploy deploy/modal_app.py")


@app.cls(image=image, **HARDWARE, **SNAPSHOT, scaledown_window=SCALEDOWN_WINDOW, timeout=300, secrets=[api_secret])
@modal.concurrent(**WEB_CONCURRENCY)
class Service(ModelContainer):
    """The HTTP API (same app as local serving) at the URL `modal deploy` prints."""

    @modal.asgi_app()
    def web(self):
        return self.build_app()


@app.cls(image=image, **HARDWARE, **SNAPSHOT, scaledown_window=60, timeout=600, volumes={AUDIO_MOUNT: audio_volume},
         max_containers=20)
@modal.concurrent(max_inputs=CORPUS_INPUTS)  # some files decode while the model runs the others' windows
class CorpusWorker(ModelContainer):
    """Analyses corpus files; the callers fan out over many of these with `.map` (order_outputs=False).

    Every method returns a result named by its file and never raises for a file (an exception returned by
    `.map(return_exceptions=True)` would not say which file it belonged to).
    """

    @modal.method()
    def analyze_file(self, relpath: str, cap_seconds: float | None = None) -> dict[str, Any]:
        """A file of the audio Volume (path relative to its root)."""
        return self.analyze_path(relpath, cap_seconds)

    @modal.method()
    def analyze_bytes(self, name: str, data: bytes, cap_seconds: float | None = None) -> dict[str, Any]:
        """A file sent by `python -m deploy analyze DIR --out REPORT` (deploy.modal_corpus.modal_results)."""
        return self.corpus_batches().analyze(name, data, cap_seconds)


def list_audio(root: Path, prefix: str = "") -> list[str]:
    """Audio files under root/prefix, as sorted paths relative to root."""
    from runtime.corpus.runner import AUDIO_SUFFIXES

    base = root / prefix
    files = base.rglob("*") if base.is_dir() else []
    return sorted(str(PurePosixPath(p.relative_to(root))) for p in files
                  if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES)


def run_corpus(root: Path, prefix: str, output: str, analyze_many: Callable[[list[str]], Iterable[Any]]) -> dict:
    """Analyse every audio file under root/prefix with analyze_many; write JSON lines to root/output.

    Every file gets exactly one line: an exception that came back instead of a result names no file, so the
    files left without a result get a line with an `error` that quotes it.
    """
    files = list_audio(root, prefix)
    wanted = set(files)
    out = root / output
    out.parent.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    lost: list[str] = []
    failed = 0
    with out.open("w") as fh:
        for result in analyze_many(files):
            if not isinstance(result, dict) or result.get("file") not in wanted or result["file"] in seen:
                lost.append(f"{type(result).__name__}: {result}"[:300])
                continue
            seen.add(result["file"])
            failed += result.get("error") is not None
            fh.write(json.dumps(result) + "\n")
        why = "; ".join(dict.fromkeys(lost)) or "the map ended without it"
        for relpath in (f for f in files if f not in seen):
            failed += 1
            fh.write(json.dumps({"file": relpath, "error": f"no result from the worker ({why})"}) + "\n")
    return {"files": len(files), "failed": failed, "output": str(PurePosixPath(output))}


@app.function(image=image, volumes={AUDIO_MOUNT: audio_volume}, timeout=6 * 3600)
def analyze_corpus(prefix: str = "", output: str = "results/scores.jsonl", cap_seconds: float | None = None) -> dict:
    """Fan the Volume's files under prefix out over parallel containers; results to output on the Volume."""
    worker = CorpusWorker()

    def analyze_many(files: list[str]) -> Iterable[dict]:
        return worker.analyze_file.map(files, kwargs={"cap_seconds": cap_seconds}, order_outputs=False,
                                       return_exceptions=True)

    summary = run_corpus(Path(AUDIO_MOUNT), prefix, output, analyze_many)
    audio_volume.commit()
    return summary


@app.local_entrypoint()
def main(prefix: str = "", output: str = "results/scores.jsonl", cap_seconds: float = 0.0) -> None:
    """`modal run deploy/modal_app.py --prefix DIR [--cap-seconds 30]`: analyse a corpus on the Volume (0: no cap)."""
    print(json.dumps(analyze_corpus.remote(prefix, output, cap_seconds or None), indent=2))
