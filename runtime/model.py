"""Load an exported ONNX model with its metadata and run it with onnxruntime."""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from runtime.constants import AUDIO_INPUT_NAME, DIMENSIONS, FEATURES, INPUT_NAME, NUM_DIMENSIONS, OUTPUT_NAME
from runtime.cuda import CUDA, TF32_ATOL, cuda_options, preload, why_cuda_did_not_start
from runtime.errors import InputError, ModelError
from runtime.protowire import EXTERNAL_MIN_BYTES, external_weights_graph, header_metadata
from runtime.self_check import SelfCheckResult, run_self_check

log = logging.getLogger(__name__)

METADATA_KEY = "percepiano"  # one JSON document in the ONNX model's metadata_props
FORMAT_VERSION = 1
PRECISIONS = ("fp32", "int8", "fp16")
DEVICES = ("auto", "cpu", "cuda")
DEMO_NOTE = "DEMO model (exported from a checkpoint that was never trained to the end): its scores mean nothing"
# What a model takes per batch item, by input kind (metadata io.input): log-mel windows, or 3 s audio chunks
# when the graph holds the front end (convert.frontend).
INPUT_SHAPES = {INPUT_NAME: (FEATURES.n_frames, FEATURES.n_mels), AUDIO_INPUT_NAME: (FEATURES.chunk_samples,)}


@dataclass(frozen=True)
class ModelInfo:
    """What an exported model says about itself (the `percepiano` metadata entry)."""

    precision: str
    dimensions: tuple[tuple[str, str], ...]
    features: dict[str, Any]
    model_config: dict[str, Any]
    label_scaler: dict[str, Any]
    source: dict[str, Any]
    versions: dict[str, str] = field(default_factory=dict)
    parity: dict[str, Any] | None = None
    variants: dict[str, Any] | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def api_keys(self) -> tuple[str, ...]:
        return tuple(key for _, key in self.dimensions)

    @property
    def sha256(self) -> str:
        """sha256 of the source checkpoint."""
        return str(self.source.get("sha256", ""))

    @property
    def demo(self) -> bool:
        """A model exported from an untrained checkpoint (a demo stand-in, or one whose training_complete is false
        or that has no fine-tuning results): its scores mean nothing."""
        return self.source.get("demo") is True

    @property
    def version(self) -> str:
        return f"percepiano-ast-{self.sha256[:12] or 'unknown'}-{self.precision}"

    @property
    def input_kind(self) -> str:
        """'mel' (log-mel windows) or 'audio' (3 s chunks: the front end is in the graph)."""
        return str((self.raw.get("io") or {}).get("input", INPUT_NAME))

    @property
    def gate_atol(self) -> float | None:
        """This variant's export gate tolerance, end to end (the model's when none), or None when none was recorded."""
        gate = ((self.variants or {}).get("gates") or {}).get(self.precision) or {}
        atol = gate.get("atol_end_to_end") or gate.get("atol")
        return float(atol) if atol else None

    @property
    def batch_independent(self) -> bool:
        """Whether a window's scores are the same whatever other windows share its batch.

        Written by the converter per variant (`variants.build.batch_independent`); a file without it is judged
        by its precision: int8 then has onnxruntime's one activation scale per call (its scores depend on the
        batch), fp32 and fp16 do not.
        """
        build = (self.variants or {}).get("build") or {}
        if "batch_independent" in build:
            return bool(build["batch_independent"])
        return self.precision != "int8"

    def summary(self) -> dict[str, Any]:
        """The short description returned with every result."""
        return {"version": self.version, "sha256": self.sha256, "precision": self.precision}


def build_metadata(**sections: Any) -> dict[str, str]:
    """The metadata_props of an exported model: one JSON document under METADATA_KEY."""
    doc = {"format_version": FORMAT_VERSION, **sections}
    return {METADATA_KEY: json.dumps(doc, sort_keys=True)}


def parse_metadata(props: dict[str, str], where: str = "model") -> ModelInfo:
    """Parse and validate the metadata; refuse a model this runtime would score wrongly."""
    if METADATA_KEY not in props:
        raise ModelError(f"{where} has no '{METADATA_KEY}' metadata: export it with `python -m convert export`")
    try:
        doc = json.loads(props[METADATA_KEY])
    except json.JSONDecodeError as exc:
        raise ModelError(f"{where}: metadata is not valid JSON ({exc})") from None
    if doc.get("format_version") != FORMAT_VERSION:
        raise ModelError(f"{where}: metadata format {doc.get('format_version')!r}, this runtime reads {FORMAT_VERSION}")
    try:
        dims = tuple((d["label"], d["key"]) for d in doc["dimensions"])
        info = ModelInfo(
            precision=doc["precision"],
            dimensions=dims,
            features=doc["features"],
            model_config=doc["model_config"],
            label_scaler=doc["label_scaler"],
            source=doc["source"],
            versions=doc.get("versions", {}),
            parity=doc.get("parity"),
            variants=doc.get("variants"),
            raw=doc,
        )
    except (KeyError, TypeError) as exc:
        raise ModelError(f"{where}: metadata lacks {exc}; re-export the model") from None
    if info.dimensions != DIMENSIONS:
        raise ModelError(f"{where}: its 19 dimensions differ from the PercePiano set this runtime serves")
    if info.features != FEATURES.to_dict():
        diff = {k: v for k, v in info.features.items() if FEATURES.to_dict().get(k) != v}
        raise ModelError(f"{where}: feature parameters differ from this runtime's: {diff}")
    if info.precision not in PRECISIONS:
        raise ModelError(f"{where}: unknown precision {info.precision!r}; expected one of {PRECISIONS}")
    return info


def provider_plan(device: str, precision: str = "fp32", tf32: bool = False,
                  available: list[str] | None = None) -> list[Any]:
    """The providers (with their options) a session on `device` gets for a model of `precision`; opens nothing.

    `auto` means CUDA when `available` lists it. The CPU provider stays in the list behind CUDA: onnxruntime's
    CUDA provider itself places the small shape computations (Shape -> Gather -> Concat) on the CPU, so a
    session with CPU fallback disabled (`session.disable_cpu_ep_fallback`) would refuse this graph on a working
    GPU. Whether CUDA really started is checked on the session instead (`check_providers`).
    """
    if device not in DEVICES:
        raise ModelError(f"unknown device {device!r}; choose one of {DEVICES}")
    if device == "cuda" or (device == "auto" and CUDA in (available or [])):
        return [(CUDA, cuda_options(precision, tf32)), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def pick_providers(device: str = "auto", precision: str = "fp32", tf32: bool = False) -> list[Any]:
    """provider_plan on this machine: CUDA when asked or available (its libraries preloaded first), else CPU."""
    import onnxruntime as ort

    if device not in DEVICES:
        raise ModelError(f"unknown device {device!r}; choose one of {DEVICES}")
    available = ort.get_available_providers()
    if device == "cuda" and CUDA not in available:
        raise ModelError(f"device 'cuda' asked for, but onnxruntime has no CUDAExecutionProvider here "
                         f"(available: {available}): {why_cuda_did_not_start()}")
    plan = provider_plan(device, precision, tf32, available)
    if plan[0] != "CPUExecutionProvider":
        preload()  # CUDA and cuDNN from the nvidia-* wheels, before the session needs them
    return plan


def check_providers(actual: list[str], requested: list[Any], device: str, where: str) -> list[str]:
    """The session's real providers; CUDA asked for but not started is an error, under `auto` a warning."""
    wanted_cuda = any((p[0] if isinstance(p, tuple) else p) == CUDA for p in requested)
    if not wanted_cuda or (actual and actual[0] == CUDA):
        return list(actual)
    why = (f"onnxruntime's CUDA provider did not start for {where} (the session has {actual}): "
           f"{why_cuda_did_not_start()}")
    if device == "cuda":
        raise ModelError(f"device 'cuda' asked for, but {why}")
    log.warning("device 'auto': %s; running on the CPU", why)
    return list(actual)


def check_version(info: ModelInfo, serving: str) -> None:
    """Log when the serving onnxruntime differs from the one the export's gate ran with."""
    gated = info.versions.get("onnxruntime")
    if gated and gated != serving:
        log.warning("serving with onnxruntime %s, but the model's parity gate ran on %s: its figures are evidence "
                    "for that version; the self-check at load measures this one", serving, gated)


def graph_section(props: dict[str, str]) -> dict[str, Any]:
    """The `graph` section of a model's metadata (how its graph was saved), {} when it has none."""
    try:
        return dict(json.loads(props[METADATA_KEY]).get("graph") or {})
    except (KeyError, ValueError, TypeError, AttributeError):
        return {}


def header_precision(props: dict[str, str]) -> str:
    """The precision a model's metadata declares, read before any session ("fp32" when unreadable: the session's
    own metadata check refuses a bad model later)."""
    try:
        return str(json.loads(props[METADATA_KEY]).get("precision") or "fp32")
    except (KeyError, ValueError, TypeError, AttributeError):
        return "fp32"


def load_optimization(graph: dict[str, Any], device: str) -> str:
    """The optimisation level to load with under `auto`: none for a graph saved optimised for the CPU, on the CPU.

    Such a graph was optimised by onnxruntime at export (convert.staging); optimising it again costs the
    session creation time it saves. On CUDA the level stays `all` (CUDA's own fusions still apply).
    """
    return "none" if graph.get("optimized") in ("extended", "all") and device == "cpu" else "all"


def session_options(threads: int | None = None, optimization: str = "all", *, spinning: bool | None = None,
                    prepacking: bool = True):
    """onnxruntime SessionOptions: thread count, graph optimization level, intra-op spinning, weight prepacking."""
    import onnxruntime as ort

    levels = {
        "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    if optimization not in levels:
        raise ModelError(f"unknown optimization level {optimization!r}; choose one of {sorted(levels)}")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = levels[optimization]
    if threads:
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
    if spinning is not None:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    if not prepacking:
        opts.add_session_config_entry("session.disable_prepacking", "1")
    opts.log_severity_level = 3  # errors only; the runtime logs what matters itself
    return opts


def save_optimized(source: str | os.PathLike | bytes, out: str | os.PathLike, level: str = "extended", *,
                   external: bool = False, ort_format: bool = False) -> Path:
    """Write `source` as onnxruntime optimises it for the CPU at `level` (a session with optimized_model_filepath).

    `external`: the weights go to OUT.data beside it; `ort_format`: the ORT flatbuffer format instead of ONNX.
    EXTENDED keeps standard and onnxruntime contrib ops only; ALL adds this CPU's layouts (not portable).
    """
    import onnxruntime as ort

    out = Path(out)
    opts = session_options(None, level)
    opts.optimized_model_filepath = str(out)
    if external:
        opts.add_session_config_entry("session.optimized_model_external_initializers_file_name", out.name + ".data")
        opts.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes",
                                      str(EXTERNAL_MIN_BYTES))
    if ort_format:
        opts.add_session_config_entry("session.save_model_format", "ORT")
    src = source if isinstance(source, bytes) else str(source)
    ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])
    return out


FOLDER_CONFIG = "session.model_external_initializers_file_folder_path"


def create_session(source: str | bytes, make_options, providers: list[Any], external_weights: bool = True):
    """An onnxruntime InferenceSession of `source`, and how its weights were read: "file" or "parsed".

    With `external_weights`, a model file is given to onnxruntime as its graph with the large weights left in
    the file (runtime.protowire.external_weights_graph), so they are read from it once instead of parsed and
    copied. A file that is not a well-formed model, fails to load that way, or changed meanwhile (another inode,
    size or mtime: an export published over it) is loaded the usual way, whose errors are onnxruntime's own.
    `make_options()` returns fresh SessionOptions for each attempt.
    """
    import onnxruntime as ort

    if external_weights and not isinstance(source, bytes):
        real = os.path.realpath(source)  # onnxruntime refuses external data outside the model's own folder
        try:
            before = os.stat(real)
            graph = external_weights_graph(real)
        except (OSError, ValueError):
            graph = None
        if graph is not None:
            opts = make_options()
            opts.add_session_config_entry(FOLDER_CONFIG, os.path.dirname(real))
            try:
                session = ort.InferenceSession(graph, opts, providers=providers)
                after = os.stat(real)
            except Exception as exc:  # onnxruntime raises its own types; the usual load below decides
                log.debug("%s: loading the weights from the file failed (%s); parsing it", source, exc)
            else:
                same = ("st_ino", "st_dev", "st_size", "st_mtime_ns")
                if all(getattr(before, k) == getattr(after, k) for k in same):
                    return session, "file"
                log.warning("%s changed while it was loading: loading it again", source)
    return ort.InferenceSession(source, make_options(), providers=providers), "parsed"


class OnnxModel:
    """An exported PercePiano model: mel batches (B, 128, 128) in, label-unit scores (B, 19) out."""

    def __init__(
        self,
        source: str | os.PathLike | bytes,
        *,
        device: str = "auto",
        threads: int | None = None,
        optimization: str = "auto",
        io_binding: bool | None = None,
        spinning: bool | None = None,
        prepacking: bool = True,
        external_weights: bool = True,
        tf32: bool = False,
    ):
        """`optimization`: auto (none for a graph the export saved optimised for the CPU, when it runs on the
        CPU; else all), or none / basic / extended / all. `spinning`: onnxruntime's intra-op spin-waiting
        (None: its default, on). `prepacking`: onnxruntime's weight prepacking (off: less memory, slower
        runs). `external_weights`: a file's weights are read from it in place (create_session; off: onnxruntime
        parses the whole file). `tf32`: let CUDA run float GEMMs in TF32 (off: fp32 is fp32; on, the self-check
        uses runtime.cuda.TF32_ATOL). The figures behind these defaults: `python -m benchmarks.run --session-table`."""
        import onnxruntime as ort

        where = "model bytes" if isinstance(source, bytes) else str(source)
        if not isinstance(source, bytes):
            path = Path(source)
            if not path.is_file():
                raise ModelError(f"model file not found: {path}")
            source = str(path)
        props = header_metadata(source)
        providers = pick_providers(device, header_precision(props), tf32)
        self.graph = graph_section(props)  # how the export saved the graph ({}: as traced)
        on_cpu = not any((p[0] if isinstance(p, tuple) else p) == CUDA for p in providers)
        self.optimization = load_optimization(self.graph, "cpu" if on_cpu else "cuda") if optimization == "auto" \
            else optimization
        self.spinning = spinning  # None: onnxruntime's default (on)
        self.prepacking = prepacking
        def make_options():
            return session_options(threads, self.optimization, spinning=spinning, prepacking=prepacking)

        started = time.perf_counter()
        try:
            self.session, self.weights = create_session(source, make_options, providers, external_weights)
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidProtobuf types
            raise ModelError(f"{where}: onnxruntime cannot load it ({str(exc).splitlines()[0]})") from None
        self.load_seconds = time.perf_counter() - started  # session creation (reported by /metrics)
        self.info = parse_metadata(self.session.get_modelmeta().custom_metadata_map, where)
        self.input_kind = self.info.input_kind
        if self.input_kind not in INPUT_SHAPES:
            raise ModelError(f"{where}: unknown input kind {self.input_kind!r}; expected one of {sorted(INPUT_SHAPES)}")
        self.input_shape = INPUT_SHAPES[self.input_kind]  # of one batch item
        self._check_signature(where)
        self.providers = check_providers(self.session.get_providers(), providers, device, where)
        self.device = "cuda" if self.providers[0] == CUDA else "cpu"
        if self.device == "cuda":
            self.session.disable_fallback()  # a CUDA failure at run time raises instead of re-running on the CPU
        self.io_binding = self.device == "cuda" if io_binding is None else io_binding
        self.tf32 = tf32 and self.device == "cuda"
        # TF32 has its own self-check tolerance (runtime.self_check reads it); None: the stored one
        self.self_check_atol = TF32_ATOL if self.tf32 else None
        self.self_check: SelfCheckResult | None = None  # set by run_self_check (the warm-up)
        self.warmed = False  # set by runtime.serve.app.warm_up
        self.warmup_seconds: float | None = None  # likewise
        log.info("loaded %s (%s, weights %s) on %s with onnxruntime %s", where, self.info.precision, self.weights,
                 self.providers, ort.__version__)
        check_version(self.info, ort.__version__)

    def _check_signature(self, where: str) -> None:
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        kind, shape = self.input_kind, list(self.input_shape)
        if [i.name for i in inputs] != [kind] or [o.name for o in outputs] != [OUTPUT_NAME]:
            raise ModelError(f"{where}: expected input '{kind}' and output '{OUTPUT_NAME}'")
        if list(inputs[0].shape[1:]) != shape or outputs[0].shape[1] != NUM_DIMENSIONS:
            raise ModelError(f"{where}: expected {kind} [batch, {', '.join(map(str, shape))}] -> scores [batch, 19], "
                             f"got {inputs[0].shape} -> {outputs[0].shape}")

    def run(self, mel: np.ndarray) -> np.ndarray:
        """One batch: float32 (B, 128, 128) log-mel (or (B, 66150) audio chunks) -> float32 (B, 19) label units."""
        mel = np.ascontiguousarray(mel, dtype=np.float32)
        if mel.shape[1:] != self.input_shape:
            raise InputError(f"expected {self.input_kind} of shape (batch, {', '.join(map(str, self.input_shape))}), "
                             f"got {mel.shape}")
        if not self.io_binding:
            return self.session.run([OUTPUT_NAME], {self.input_kind: mel})[0]
        binding = self.session.io_binding()
        binding.bind_cpu_input(self.input_kind, mel)
        binding.bind_output(OUTPUT_NAME, self.device)
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]

    def predict(self, mel: np.ndarray, batch_size: int = 16) -> np.ndarray:
        """Any number of windows, run in batches of at most batch_size."""
        if batch_size < 1:
            raise InputError(f"batch size must be at least 1, got {batch_size}")
        if len(mel) == 0:
            return np.zeros((0, NUM_DIMENSIONS), np.float32)
        return np.concatenate([self.run(mel[i : i + batch_size]) for i in range(0, len(mel), batch_size)])

    def run_self_check(self) -> SelfCheckResult:
        """The load-time warm-up: the stored reference windows on this device, compared (runtime.self_check)."""
        self.self_check = run_self_check(self)
        return self.self_check

    def warmup(self, batch_size: int = 1) -> None:
        """Run once so the first real request does not pay for lazy initialisation."""
        self.run(np.full((batch_size, *self.input_shape), -40.0 if self.input_kind == INPUT_NAME else 0.0, np.float32))
