"""Modal deployment: the same FastAPI app as `python -m runtime serve`, on an A10G or on CPUs, with memory snapshots.

One switch at deploy time, PERCEPIANO_MODAL_TARGET (read when this file is imported), picks the variant:

* `gpu` (the default): app `percepiano` on an A10G, onnxruntime-gpu, the fp16 or fp32 model.
* `cpu`: app `percepiano-cpu` on 4 CPU cores and 4 GiB (no GPU, for cost), onnxruntime (CPU) pinned to the
  gate's version, the int8 model. A separate app, so it deploys beside the GPU one rather than over it.

The image carries both switches (SERVICE_ENV), so the container's own import of this file declares the same
variant as the deploy did.

One-time setup, then one deploy command per variant (from the repository root; `--quantize auto` writes the
int8 CPU variant to artifacts/model.onnx and the fp16 GPU one beside it; `--input audio --out
artifacts/model-audio.onnx` the waveform-in model, the GPU's recommended artifact: docs/gpu-and-modal.md):

    modal secret create percepiano-api PERCEPIANO_API_TOKEN=$(openssl rand -hex 32)
    python -m deploy check --target gpu && modal deploy deploy/modal_app.py                  # A10G
    PERCEPIANO_MODAL_TARGET=cpu modal deploy deploy/modal_app.py                             # int8, CPU

`modal deploy` runs the same check (deploy.checks) when it imports this file and stops on a model that cannot
serve on the target: int8 on the GPU, fp16 on the CPU, a demo model (unless PERCEPIANO_DEPLOY_ALLOW_DEMO=1),
a failed export gate, a missing file. Without PERCEPIANO_MODEL the GPU deploys the first of
artifacts/model-audio.fp16.onnx, model.fp16.onnx, model-audio.fp32.onnx, model.fp32.onnx (never the int8 file).

Snapshots. The CPU variant creates its onnxruntime session and warms it up (the self-check) inside
`@modal.enter(snap=True)`, so the memory snapshot holds the ready session; after a restore the self-check
runs once more (two windows) on the restored host's CPU. The GPU variant reads the model bytes before the
snapshot (no GPU then) and creates the CUDA session after restore. PERCEPIANO_GPU_SNAPSHOT=1 (experimental,
off by default; GPU memory snapshots are an alpha Modal feature) moves the CUDA session and its warm-up
before the snapshot too (`experimental_options={"enable_gpu_snapshot": True}`), again re-checked after restore.

Whole corpora, from local folders (`CorpusWorker.analyze_bytes`, resumable, reports written locally; the
GPU app, which `python -m deploy analyze` looks up):

    python -m deploy analyze ./recordings --recursive --out report

or from the Volume (`CorpusWorker.analyze_file`):

    modal volume put percepiano-audio ./recordings recordings
    modal run deploy/modal_app.py --prefix recordings      # writes results/scores.jsonl to the Volume

Warm hours. PERCEPIANO_WARM_SCHEDULE (deploy/schedule.py has the syntax; checked when this file is imported, so a
bad value stops `modal deploy` with one line) keeps containers of the Service warm inside its windows and lets them
scale to zero outside: `apply_warm_schedule` runs every 15 min (modal.Cron, UTC) and sets the Service's
`min_containers` with `update_autoscaler` (a redeploy resets it to 0; the next tick sets it again):

    PERCEPIANO_WARM_SCHEDULE="mon-fri 08:00-20:00 Europe/Berlin min=1" modal deploy deploy/modal_app.py

The model is baked into the image (not read from a Volume): the memory snapshot holds the model bytes anyway,
so a model on a Volume could change under a snapshot that still serves the old one; baked, the image, the
snapshot and the deployment always agree, and one `modal deploy` ships code and model together. This file
only declares image, hardware, snapshot and lifecycle; everything it runs is plain `runtime` code.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from collections.abc import Callable, Iterable
from pathlib import Path, PurePosixPath
from typing import Any

import modal

from deploy import schedule as warm_schedule

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
WARM_SCHEDULE_TEXT = os.environ.get(warm_schedule.ENV, "").strip()
WARM_SCHEDULE = warm_schedule.parse(WARM_SCHEDULE_TEXT)  # a bad schedule stops the deploy here, in one line
SESSION_IN_SNAPSHOT = TARGET == "cpu" or GPU_SNAPSHOT  # session created and warmed before the snapshot
APP_NAME = "percepiano" if TARGET == "gpu" else "percepiano-cpu"
GPU = "A10G" if TARGET == "gpu" else None
CPU_CORES = 4.0  # the CPU target's reservation (physical cores), and its onnxruntime threads
CPU_MEMORY_MB = 4096
# The GPU target's CPUs feed its GPU: decode, resample (and, for a mel-input model, the features) of every request
# run there. Without a reservation Modal gives 0.125 cores and 128 MiB. Sized with `python -m benchmarks.cpu_cost`
# (docs/gpu-and-modal.md; process CPU ms per 30 s request, 44.1 kHz stereo): the worst format (m4a) costs 188 ms
# with the mel-input model (features 125 ms of it) and 64 ms with the waveform-in model (the GPU's recommended
# artifact). Reserved for GPU_TARGET_RPS requests/s per container with the mel-input model, so the waveform-in
# one has room to spare: benchmarks.cpu_cost.reservation(GPU_CPU_MS_PER_REQUEST, GPU_TARGET_RPS) (tested).
GPU_TARGET_RPS = 8.0
GPU_CPU_MS_PER_REQUEST = 187.7
GPU_CPU_CORES = 3.5
GPU_MEMORY_MB = 3712
GPU_THREADS = 2  # onnxruntime's intra-op threads beside CUDA (only shape ops run on its CPU provider)
SCALEDOWN_WINDOW = 180  # s; restores from a snapshot take seconds, so idle containers need not linger long
MODAL_COMMANDS = ("deploy", "serve", "run")  # the `modal` CLI commands that build and ship the image


def shipping(argv: list[str] | None = None, env=os.environ) -> bool:
    """True when this import is `modal deploy|serve|run` on the local machine (not the container's import, not a
    test or `python -m deploy`); PERCEPIANO_DEPLOY_CHECK=1/0 forces it on or off."""
    forced = env.get("PERCEPIANO_DEPLOY_CHECK", "").strip().lower()
    if forced in SWITCHES and forced:
        return SWITCHES[forced]
    argv = sys.argv if argv is None else argv
    cli = len(argv) > 1 and Path(argv[0]).name in ("modal", "__main__.py") and argv[1] in MODAL_COMMANDS
    return cli and modal.is_local()


def local_model(target: str, env=os.environ) -> Path:
    """PERCEPIANO_MODEL, else the target's default (deploy.checks.DEFAULTS: on the GPU the recommended GPU
    artifact, never the int8 file)."""
    if env.get("PERCEPIANO_MODEL", "").strip():
        return Path(env["PERCEPIANO_MODEL"])
    if not modal.is_local():  # the container's import: the model is already baked (MODEL_REMOTE)
        return REPO / "artifacts" / "model.onnx"
    from deploy.checks import default_model

    return default_model(target, REPO / "artifacts")


MODEL_LOCAL = local_model(TARGET)
if shipping():  # refuse, one line each, a model that cannot serve on this target before anything is built
    from deploy.checks import enforce

    enforce(MODEL_LOCAL, TARGET, allow_demo=SWITCHES.get(
        os.environ.get("PERCEPIANO_DEPLOY_ALLOW_DEMO", "").strip().lower(), False))
MODEL_REMOTE = "/opt/percepiano/model.onnx"
SECRET_NAME = "percepiano-api"  # holds PERCEPIANO_API_TOKEN
AUDIO_VOLUME = "percepiano-audio"
AUDIO_MOUNT = "/audio"
# The CPU target's requests per container and analyses at once: derived from the load test's knee for CPU_CORES
# cores (docs/load-test.md, `python -m benchmarks.load --sweep auto`; re-derive if CPU_CORES changes). The GPU
# target's are not measured (no GPU where the load test ran).
CPU_LOAD = {"max_inputs": 2, "target_inputs": 1, "analyses_at_once": 4}
WEB_CONCURRENCY = {"max_inputs": 32, "target_inputs": 8} if TARGET == "gpu" else \
    {key: CPU_LOAD[key] for key in ("max_inputs", "target_inputs")}  # requests per container
CORPUS_INPUTS = 4  # files in flight per corpus container: some decode while the model runs the others' windows
SERVICE_ENV = {
    # the switches again inside the container, whose import of this file must declare the same variant
    "PERCEPIANO_MODAL_TARGET": TARGET,
    "PERCEPIANO_GPU_SNAPSHOT": "1" if GPU_SNAPSHOT else "0",
    "PERCEPIANO_MODEL_PATH": MODEL_REMOTE,
    "PERCEPIANO_DEVICE": "cuda",  # fail loudly rather than serve from the CPU if CUDA does not load
    "PERCEPIANO_THREADS": str(GPU_THREADS),  # not the host's core count, which onnxruntime would take by default
    "PERCEPIANO_MAX_CONCURRENCY": "4",  # decode/features of some requests overlap inference of others
    "PERCEPIANO_MAX_QUEUE": "32",
    "PERCEPIANO_PRICE_CONTAINER": "modal-a10g",  # the cost metrics' rate (runtime/serve/prices.json)
}
if TARGET == "cpu":
    SERVICE_ENV = {**SERVICE_ENV, "PERCEPIANO_DEVICE": "cpu",
                   "PERCEPIANO_MAX_CONCURRENCY": str(CPU_LOAD["analyses_at_once"]),
                   "PERCEPIANO_THREADS": str(int(CPU_CORES)),  # onnxruntime's threads: the reserved cores
                   "PERCEPIANO_PRICE_CONTAINER": "modal-cpu-4"}  # prices.json: 4 cores, 4 GiB, as reserved
# What each class asks of Modal: the hardware and the snapshot options of the chosen target.
HARDWARE = {"gpu": GPU, "cpu": GPU_CPU_CORES, "memory": GPU_MEMORY_MB} if TARGET == "gpu" else \
    {"cpu": CPU_CORES, "memory": CPU_MEMORY_MB}
SNAPSHOT = {"enable_memory_snapshot": True,
            **({"experimental_options": {"enable_gpu_snapshot": True}} if GPU_SNAPSHOT else {})}

# The serving onnxruntime, pinned exactly. The parity gate ran on onnxruntime 1.32.0 (the `convert` extra), but
# PyPI has no onnxruntime-gpu 1.32.0 wheel (its newest is 1.31.1), so the image takes the nearest release; the
# runtime logs the difference at load, and the self-check at start-up measures this version's CUDA kernels on the
# A10G against the export's stored outputs. The GPU image installs the lock GPU_LOCK: onnxruntime-gpu and the NVIDIA
# wheels it resolves to (CUDA 13, cuDNN 9; driver 580.65.06 or newer: runtime/cuda.py), written by
# `python -m deploy.image_lock --write`; ONNXRUNTIME_GPU is its pin (tests/test_image_lock.py checks both).
GPU_LOCK = REPO / "deploy" / "requirements-gpu.txt"
ONNXRUNTIME_GPU = "1.31.1"
ONNXRUNTIME_CPU = "1.32.0"  # the CPU target serves on the very version the gate (and the int8 gate) ran with

app = modal.App(APP_NAME)


def build_image(target: str) -> modal.Image:
    """debian_slim + the pinned onnxruntime of the target + the runtime and serve extras + the baked model."""
    base = modal.Image.debian_slim(python_version="3.11")
    if target == "gpu":  # the lock first, so that the gpu extra's `onnxruntime-gpu>=` floor is already met by it
        base, extras = base.pip_install_from_requirements(str(GPU_LOCK)), ["gpu", "serve"]
    else:  # the CPU wheel only: the gpu extra (onnxruntime-gpu) would own the same `onnxruntime` module
        base, extras = base.pip_install(f"onnxruntime=={ONNXRUNTIME_CPU}"), ["runtime", "serve"]
    return (
        base
        .pip_install_from_pyproject(str(REPO / "pyproject.toml"), optional_dependencies=extras)
        .env(SERVICE_ENV)
        .add_local_file(MODEL_LOCAL, MODEL_REMOTE, copy=True)  # baked: see the module docstring
        # with the page's files (runtime/serve/static)
        .add_local_python_source("runtime", "deploy", ignore=["**/__pycache__/**"])  # deploy: this file's imports
    )


image = build_image(TARGET)
# The warm-hours scheduler: no model, no onnxruntime (Debian's tzdata serves zoneinfo); the switches and the
# schedule again inside, so its import of this file declares the same app and the same schedule.
scheduler_image = (
    modal.Image.debian_slim(python_version="3.11")
    .env({k: SERVICE_ENV[k] for k in ("PERCEPIANO_MODAL_TARGET", "PERCEPIANO_GPU_SNAPSHOT")}
         | {warm_schedule.ENV: WARM_SCHEDULE_TEXT})
    .add_local_python_source("deploy", ignore=["**/__pycache__/**"])
)
audio_volume = modal.Volume.from_name(AUDIO_VOLUME, create_if_missing=True)
api_secret = modal.Secret.from_name(SECRET_NAME, required_keys=["PERCEPIANO_API_TOKEN"])


class ModelContainer:
    """Container lifecycle shared by the web service and the corpus worker (plain runtime code inside)."""

    analyzer = None
    settings = None  # runtime.serve.settings.Settings, read when the session is created
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
        from deploy.checks import refuse_fp16_on_cpu, refuse_int8_on_cuda  # the container's own guards
        from runtime.analyze import Analyzer
        from runtime.model import OnnxModel
        from runtime.serve.app import Settings, warm_up

        threads = os.environ.get("PERCEPIANO_THREADS", "").strip()
        model = OnnxModel(source or self.model_bytes, device=os.environ.get("PERCEPIANO_DEVICE", "cuda"),
                          threads=int(threads) if threads else None, tf32=Settings.from_env().cuda_tf32)
        refuse_int8_on_cuda(model)
        refuse_fp16_on_cpu(model)
        settings = Settings.from_env()
        # No cap in the Analyzer: as in `runtime serve`, PERCEPIANO_CAP_SECONDS is the default that a request's
        # own ?cap_seconds= (within the refusal limit) replaces; the service and analyze_path apply it per call.
        analyzer = Analyzer(model, refuse_over_seconds=settings.refuse_over_seconds)
        warm_up(analyzer, allow_failed_self_check=settings.allow_failed_self_check)
        self.analyzer, self.settings = analyzer, settings
        self.model_bytes = b""  # the session holds its own copy

    def build_app(self):
        """The FastAPI app of runtime.serve.app over the warmed Analyzer (no second warm-up), bearer auth required."""
        from runtime.serve.app import Settings, create_app
        from runtime.serve.request_log import configure_request_log

        settings = Settings.from_env(require_token=True)
        configure_request_log(settings.request_log)  # nothing else configures logging in a Modal container
        return create_app(self.analyzer, settings=settings)

    def cap_for(self, cap_seconds: float | None) -> float | None:
        """The call's cap, else the deployment's PERCEPIANO_CAP_SECONDS (the same rule as the web service)."""
        return cap_seconds if cap_seconds is not None else self.settings.cap_seconds

    def analyze_path(self, relpath: str, cap_seconds: float | None = None) -> dict[str, Any]:
        """One file of the audio Volume -> its result; any failure becomes that file's `error` (never raised)."""
        return self.corpus_batches().analyze(relpath, Path(AUDIO_MOUNT) / relpath, self.cap_for(cap_seconds))

    def corpus_batches(self):
        """This container's deploy.corpus_batches.CorpusBatches, made on first use (after the snapshot: its
        batcher runs a thread)."""
        from deploy.corpus_batches import CorpusBatches

        with _BATCHES_LOCK:
            if getattr(self, "_batches", None) is None:
                self._batches = CorpusBatches(self.analyzer)
            return self._batches


_BATCHES_LOCK = threading.Lock()


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
        return self.corpus_batches().analyze(name, data, self.cap_for(cap_seconds))


@app.function(image=scheduler_image, timeout=60,
              schedule=modal.Cron(warm_schedule.TICK_CRON) if WARM_SCHEDULE.rules else None)
def apply_warm_schedule() -> dict:
    """Every 15 min (only when PERCEPIANO_WARM_SCHEDULE has rules): the Service's warm containers for now."""
    from datetime import UTC, datetime

    # the deployed Service by name: the same class whether this runs on the Cron or from `modal run` (whose own
    # ephemeral app's Service would not be the one serving)
    warm = warm_schedule.apply(WARM_SCHEDULE, datetime.now(UTC), modal.Cls.from_name(APP_NAME, "Service")())
    print(f"warm containers: {warm} ({warm_schedule.describe(WARM_SCHEDULE)})")
    return {"min_containers": warm, "schedule": WARM_SCHEDULE_TEXT}


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
