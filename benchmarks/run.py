"""`python -m benchmarks.run`: the runtime against native JAX, side by side, on this machine.

Every variant gets the same 30 s clip of real piano (15 windows) and the same CPUs. Cold start is
measured in fresh processes from process start to the 19 scores; warm latency after warm-up in the
same process; parity in score units against JAX. Writes results.json, summary.md, latency.png and
cold_start.png to --out, and prints the tables. Two studies are opt-in: --session-table (session creation
per way of saving and loading the model, benchmarks.session) and --breakdown (where a warm batch-15 run
spends its time, by kind of op, benchmarks.breakdown).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from benchmarks.errors import BenchmarkError
from benchmarks.progress import Display
from convert.config import PRESETS
from runtime.model import DEVICES

log = logging.getLogger(__name__)

VARIANTS = {
    "jax": "native JAX as the original served it: pickle.load -> Flax -> jit -> run; librosa features",
    "jax-cached": "native JAX with its persistent compilation cache (filled by a first run, also reported)",
    "ort-fp32": "the runtime: onnxruntime, fp32 model; numpy features; no JAX",
    "ort-int8": "the runtime: onnxruntime, int8 (dynamic quantization) model, on the CPU",
    "ort-fp16": "the runtime: onnxruntime, fp16 model, on a CUDA device only",
}
BASELINE = "jax"
GEMM_REPEATS = 7


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, help="original pickled checkpoint (default: a demo one)")
    parser.add_argument("--preset", choices=tuple(PRESETS), default="production",
                        help="size of the demo checkpoint when --checkpoint is not given")
    parser.add_argument("--model", type=Path, help="an fp32 ONNX export of --checkpoint to measure (default: export)")
    parser.add_argument("--audio", type=Path, help="audio file to loop/cut to 30 s (default: tests/data/piano)")
    parser.add_argument("--quick", action="store_true", help="tiny preset: a smoke test in seconds")
    parser.add_argument("--out", type=Path, default=Path("bench-results"),
                        help="output directory (default %(default)s); artifacts in it are reused")
    parser.add_argument("--threads", type=int, help="CPUs for every variant (default: all this process may use)")
    parser.add_argument("--device", choices=DEVICES, default="auto",
                        help="auto: CUDA for JAX and ORT fp32/fp16 where available, else the CPU")
    parser.add_argument("--batches", default="1,15,32", help="warm batch sizes (default %(default)s)")
    parser.add_argument("--runs", type=int, default=20, help="timed warm runs per batch size (default %(default)s)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs before them (default %(default)s)")
    parser.add_argument("--cold-runs", type=int, help="cold starts per variant, the median reported (default 3; "
                        "1 with --quick)")
    parser.add_argument("--gemm-size", type=int, default=2048, help="square float32 matmul for the GEMM rate")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots (no matplotlib needed)")
    parser.add_argument("--concurrency", default="1,2,4",
                        help="clients for the throughput table of the CPU model, batching off and on (default "
                        "%(default)s; empty skips it)")
    studies = parser.add_argument_group("opt-in studies (not run by default)")
    studies.add_argument("--session-table", action="store_true",
                         help="also measure session creation and the first run per way of saving and loading the CPU "
                              "models, in fresh processes (benchmarks.session)")
    studies.add_argument("--session-runs", type=int, help="with --session-table: fresh processes per configuration "
                         "(default: --cold-runs)")
    studies.add_argument("--breakdown", action="store_true",
                         help="also profile where a warm batch-15 run of each CPU model spends its time, by kind of op "
                              "(benchmarks.breakdown)")
    studies.add_argument("--profile-runs", type=int, default=5, help="with --breakdown: profiled batch-15 runs per "
                         "CPU model (default %(default)s)")
    parser.add_argument("--corpus-copies", type=int, default=2,
                        help="corpus speed beside this machine's floor (benchmarks.corpus_speed) over this many copies "
                        "of the piano clips, for the CPU models (default %(default)s, 0 skips it)")
    return parser


def ort_devices(device: str) -> dict[str, str | None]:
    """The device of each ORT variant, or None where it cannot run here."""
    import onnxruntime as ort

    has_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    if device == "cuda" and not has_cuda:
        raise BenchmarkError("--device cuda: onnxruntime has no CUDAExecutionProvider here; install the 'gpu' extra")
    gpu = has_cuda and device != "cpu"
    return {"fp32": "cuda" if gpu else "cpu", "int8": "cpu", "fp16": "cuda" if gpu else None}


def run_variants(art, args, cpus: list[int], devices: dict[str, str | None], display: Display) -> dict[str, dict]:
    """Every measuring process, one after another; returns each variant's raw worker output or why it is missing."""
    from benchmarks.artifacts import clear_cache
    from benchmarks.workers import WorkerError, median_cold, run_module

    common = ["--audio", str(art.audio), "--cpus", ",".join(map(str, cpus))]
    warm = ["--mel", str(art.mel), "--batches", args.batches, "--runs", str(args.runs), "--warmup", str(args.warmup)]
    jax = ["jax", "--checkpoint", str(art.checkpoint), *common]
    cache = args.out / "jax-cache"
    raw: dict[str, dict] = {}

    def measure(name: str, label: str, argv: list[str], warm_argv: list[str], times: int) -> dict | None:
        """`times` cold starts (the first one also measures warm latency); None if one fails."""
        runs = []
        for i in range(times):
            display.step(f"{label}: cold start{' + warm' if i == 0 and warm_argv else ''}"
                         + (f" ({i + 1}/{times})" if times > 1 else ""))
            try:
                runs.append(run_module("benchmarks.cold", [*argv, *(warm_argv if i == 0 else [])], cpus,
                                       args.device, display.note))
            except WorkerError as exc:
                log.error("%s", exc)
                raw[name] = {"failed": str(exc)}
                return None
        return median_cold(runs)

    if (out := measure("jax", "JAX native", jax, warm, args.cold_runs)) is not None:
        raw["jax"] = out
    clear_cache(cache)
    cached = [*jax, "--cache-dir", str(cache)]
    if (populate := measure("jax-cached", "JAX cached, first run (fills the cache)", cached, [], 1)) and (
            out := measure("jax-cached", "JAX cached", cached, [], args.cold_runs)):
        raw["jax-cached"] = out | {"populate": populate, "cache_bytes": dir_bytes(cache)}
    for precision, device in devices.items():
        name, model = f"ort-{precision}", art.models[precision]
        if device is None:
            raw[name] = {"unavailable": "needs a CUDA device (onnxruntime here has no CUDAExecutionProvider)"}
        elif not model.available:
            raw[name] = {"unavailable": model.reason}
        elif out := measure(name, f"ORT {precision} ({device})",
                            ["ort", "--model", str(model.path), "--device", device, *common], warm, args.cold_runs):
            raw[name] = out
    return raw


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def benchmark(args: argparse.Namespace, cpus: list[int]) -> dict:
    """Prepare, measure, assemble: the whole run; returns the results document."""
    from benchmarks.artifacts import prepare
    from benchmarks.environment import machine, threads_note, versions
    from benchmarks.results import assemble
    from benchmarks.roofline import best_gemm
    from benchmarks.workers import gemm

    started, clock = datetime.now(UTC), time.monotonic()
    preset = "tiny" if args.quick else args.preset
    env = {"machine": machine(cpus), "versions": versions(), "threads": {"count": len(cpus), "cpus": cpus,
                                                                         "how": threads_note(cpus)}}
    with Display(steps=2) as display:
        display.step("preparing artifacts")
        devices = ort_devices(args.device)
        art = prepare(args.out, args.checkpoint, preset, args.audio, args.model, {p for p, d in devices.items() if d},
                      display.note)
        ort_runs = sum(1 for p, d in devices.items() if d and art.models[p].available)
        # prepare, GEMM x2, JAX first run, cold starts, the session table, the profiles, the concurrency table,
        # the corpus runs
        display.set_total(1 + 2 + 1 + args.cold_runs * (2 + ort_runs) + int(args.session_table)
                          + int(args.breakdown) + (1 if args.concurrency else 0) + (1 if args.corpus_copies else 0))
        display.step("GEMM rate (before the variants)")
        before = gemm(cpus, args.gemm_size, GEMM_REPEATS, display.note)
        raw = run_variants(art, args, cpus, devices, display)
        session = session_configurations(art, args, cpus, display)
        profiles = op_breakdown(art, args, cpus, display)
        concurrency = concurrency_levels(art, args, cpus, display)
        corpus = corpus_speeds(art, args, cpus, display)
        display.step("GEMM rate (after the variants)")
        gemm_rate = best_gemm([before, gemm(cpus, args.gemm_size, GEMM_REPEATS, display.note)])
    settings = {"preset": preset if art.demo else None, "quick": args.quick, "runs": args.runs,
                "cold_runs": args.cold_runs,
                "warmup": args.warmup, "batches": [int(b) for b in args.batches.split(",")], "device": args.device}
    results = assemble(art, raw, gemm_rate, env, settings, VARIANTS, BASELINE, started, time.monotonic() - clock)
    if session:
        results["session"] = session
    if profiles:
        from benchmarks.breakdown import summary_lines

        results["breakdown"] = with_warm_figures(profiles, results["variants"])
        results["notes"] += summary_lines(results["breakdown"])
    if concurrency:
        results["concurrency"] = concurrency
    if corpus:
        from benchmarks.corpus_speed import format_section

        results["corpus"] = corpus
        results["notes"] += [f"corpus run, {format_section(c)}" for c in corpus.values() if "error" not in c]
    return results


def corpus_speeds(art, args, cpus: list[int], display: Display) -> dict | None:
    """Each CPU model over a corpus of the piano clips: audio hours per hour beside the floor measured in the run."""
    from benchmarks.workers import WorkerError, run_module

    models = {p: art.models[p].path for p in ("int8", "fp32") if art.models[p].available}
    if not args.corpus_copies or not models:
        return None
    display.step("corpus speed beside this machine's floor")
    out = {}
    for precision, path in models.items():
        argv = ["--model", str(path), "--copies", str(args.corpus_copies), "--threads", str(len(cpus)), "--json"]
        try:
            out[precision] = run_module("benchmarks.corpus_speed", argv, cpus, "cpu", display.note)
        except WorkerError as exc:
            log.error("corpus speed (%s): %s", precision, exc)
            out[precision] = {"error": str(exc)}
    return out


def concurrency_levels(art, args, cpus: list[int], display: Display) -> dict | None:
    """Throughput against concurrency, batching off and on (benchmarks.concurrency), for the CPU model."""
    from benchmarks.workers import WorkerError, run_module

    precision = "int8" if art.models["int8"].available else "fp32"
    if not args.concurrency or not art.models[precision].available:
        return None
    display.step(f"throughput against concurrency ({precision}, batching off and on)")
    argv = ["--model", str(art.models[precision].path), "--clip", str(art.audio), "--levels", args.concurrency,
            "--rounds", "2" if args.quick else "3", "--cpus", str(len(cpus)), "--json"]
    try:
        return run_module("benchmarks.concurrency", argv, cpus, "cpu", display.note)
    except WorkerError as exc:
        log.error("concurrency table: %s", exc)
        return {"failed": str(exc)}


def op_breakdown(art, args, cpus: list[int], display: Display) -> dict | None:
    """Where a warm batch-15 run goes, by kind of op (benchmarks.breakdown), for the CPU variants."""
    from benchmarks.breakdown import section

    models = {p: art.models[p].path for p in ("fp32", "int8") if art.models[p].available}
    if not args.breakdown or not models:
        return None
    display.step("where the time goes: onnxruntime's profiler, batch 15")
    return section(models, cpus, args.profile_runs, args.warmup, mel=art.mel, note=display.note)


def with_warm_figures(profiles: dict, variants: dict) -> dict:
    """The breakdown's summary with this run's warm batch-15 medians of JAX and int8 (the floor's ratio to JAX)."""
    from benchmarks.breakdown import BATCH, summary

    def p50(name: str) -> float | None:
        return ((variants.get(name) or {}).get("warm") or {}).get(str(BATCH), {}).get("p50_s")

    return profiles | {"summary": summary(profiles["results"], jax_warm_s=p50(BASELINE), int8_warm_s=p50("ort-int8"))}


def session_configurations(art, args, cpus: list[int], display: Display) -> dict | None:
    """The session-creation table (benchmarks.session) for the CPU variants, or None when skipped."""
    from benchmarks.session import session_section
    from benchmarks.workers import WorkerError

    models = {p: art.models[p].path for p in ("fp32", "int8") if art.models[p].available}
    if not args.session_table or not models:
        return None
    display.step("session creation: ways of saving and loading the model")
    try:
        return session_section(models, args.out / "session", cpus, args.session_runs, min(args.runs, 5),
                               mel=art.mel, note=display.note)
    except WorkerError as exc:
        log.error("session table: %s", exc)
        return {"failed": str(exc)}


def check_args(args: argparse.Namespace) -> None:
    if args.cold_runs is None:
        args.cold_runs = 1 if args.quick else 3
    if args.session_runs is None:
        args.session_runs = args.cold_runs
    try:
        levels = [int(v) for v in args.concurrency.split(",") if v.strip()]
    except ValueError:
        raise BenchmarkError(f"--concurrency {args.concurrency!r}: expected integers such as 1,2,4") from None
    if levels and min(levels) < 1:
        raise BenchmarkError(f"--concurrency {args.concurrency!r}: client counts must be positive")
    if min(args.runs, args.cold_runs, args.session_runs, args.profile_runs) < 1 or args.warmup < 0:
        raise BenchmarkError(f"--runs, --cold-runs, --session-runs and --profile-runs must be >= 1, --warmup >= 0 "
                             f"(got {args.runs}, {args.cold_runs}, {args.session_runs}, {args.profile_runs}, "
                             f"{args.warmup})")
    try:
        batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        raise BenchmarkError(f"--batches {args.batches!r}: expected integers such as 1,15,32") from None
    if not batches or min(batches) < 1:
        raise BenchmarkError(f"--batches {args.batches!r}: batch sizes must be positive")
    if args.runs < 20:
        log.warning("--runs %d: fewer than 20 timed runs make p99 little more than the maximum", args.runs)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    for name in ("benchmarks", "convert", "runtime"):
        logging.getLogger(name).setLevel(logging.INFO)
    from benchmarks.cost import cost_section
    from benchmarks.environment import pick_cpus
    from benchmarks.report import write_outputs
    from convert.errors import CheckpointError, ExportError, ParityError
    from runtime.errors import AudioError, ModelError

    USER_ERRORS = (BenchmarkError, CheckpointError, ExportError, ParityError, AudioError, ModelError, FileNotFoundError)

    try:
        check_args(args)
        cpus = pick_cpus(args.threads)
        args.out.mkdir(parents=True, exist_ok=True)
        results = benchmark(args, cpus)
        results["cost"] = cost_section(results)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    results["command"] = " ".join(["python -m benchmarks.run", *(argv if argv is not None else sys.argv[1:])])
    write_outputs(results, args.out, plots=not args.no_plots)
    failed = [n for n, v in results["variants"].items() if v.get("failed")]
    if failed:
        print(f"error: variant(s) failed: {', '.join(failed)}; see results.json", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
