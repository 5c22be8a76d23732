"""`python -m runtime analyze | info | serve`: the runtime's command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from runtime.constants import API_KEYS, ORIGINAL_CAP_SECONDS
from runtime.errors import AudioError, ConfigError, InputError, ModelError, ModelOutputError
from runtime.model import DEMO_NOTE, DEVICES
from runtime.self_check import ALLOW_ENV, ALLOW_FLAG, require_passed

DEFAULT_MODEL = Path("artifacts/model.onnx")
USER_ERRORS = (AudioError, ConfigError, InputError, ModelError)
TF32_HELP = ("CUDA only: let onnxruntime run float32 matrix products in TF32 (faster on Ampere and newer, about "
             "1e-4 off; the self-check then uses its own tolerance); default off: fp32 stays fp32")
SKIP_HELP = (f"use the model even if its self-check fails on this device (its scores may then be wrong; "
             f"{ALLOW_ENV}=1 for the service)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m runtime", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the runtime does")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="serve: no per-request JSON log lines (PERCEPIANO_REQUEST_LOG=0 does the same)")
    sub = parser.add_subparsers(dest="command", required=True)

    an = sub.add_parser("analyze", help="score audio files (or, with --out, whole folders) on the 19 dimensions")
    an.add_argument("files", nargs="+", type=Path, metavar="FILE_OR_DIR")
    an.add_argument("--model", type=Path, default=DEFAULT_MODEL, help=f"ONNX model (default {DEFAULT_MODEL})")
    an.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    an.add_argument("--batch-size", type=int, default=16, help="chunks per inference batch (default 16)")
    an.add_argument("--device", choices=DEVICES, default="auto")
    an.add_argument("--threads", type=int, help="onnxruntime intra-op threads (default: all cores)")
    an.add_argument("--tf32", action="store_true", help=TF32_HELP)
    an.add_argument("--cap-seconds", type=float, nargs="?", const=ORIGINAL_CAP_SECONDS, metavar="N",
                    help=f"the cap: analyse only the first N s, cut after resampling as the original did "
                         f"(bare flag: {ORIGINAL_CAP_SECONDS:.0f} s); longer files are not refused")
    an.add_argument("--max-seconds", type=float, nargs="?", const=ORIGINAL_CAP_SECONDS, metavar="N",
                    dest="deprecated_max_seconds", help="deprecated alias of --cap-seconds (the original's name)")
    an.add_argument("--refuse-over", type=float, metavar="SECONDS",
                    help="refuse (per-file error) audio longer than this (default: only the 1 h hard limit)")
    an.add_argument("--out", type=Path, metavar="REPORT_DIR",
                    help="analyse a corpus: journal, scores.csv, timeline.csv and report.md in REPORT_DIR (resumable)")
    an.add_argument("--recursive", action="store_true", help="with --out: include files in subfolders")
    an.add_argument("--per-file", action="store_true",
                    help="with --out: run each file's windows in its own model calls (default: calls filled across "
                         "files whenever the model's scores do not depend on their batch neighbours)")
    an.add_argument("--modal", action="store_true", help=argparse.SUPPRESS)  # moved: python -m deploy analyze
    an.add_argument("--url", metavar="URL[,URL...]",
                    help="with --out: score through a deployed service (local or Modal) instead of a local model; "
                         "several URLs are tried in order, the next when one fails")
    an.add_argument("--token", help="with --url: the service's bearer token (default: $PERCEPIANO_API_TOKEN)")
    an.add_argument("--timeout", type=float, default=300.0, metavar="SECONDS",
                    help="with --url: seconds a request may stay silent before the next endpoint is tried (300)")
    an.add_argument(ALLOW_FLAG, action="store_true", help=SKIP_HELP)

    info = sub.add_parser("info", help="print an exported model's metadata")
    info.add_argument("model", type=Path)
    info.add_argument("--json", action="store_true", help="the whole metadata document as JSON")
    info.add_argument("--device", choices=DEVICES, default="cpu",
                      help="the device whose session is described (default cpu); only cpu opens a session, cuda and "
                           "auto show the providers and options a session would get without opening one")
    info.add_argument("--tf32", action="store_true", help=TF32_HELP)

    serve = sub.add_parser("serve", help="run the HTTP service")
    serve.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--device", choices=DEVICES, default="auto")
    serve.add_argument("--threads", type=int)
    serve.add_argument("--tf32", action="store_true", help=TF32_HELP + " (or PERCEPIANO_CUDA_TF32=1)")
    serve.add_argument(ALLOW_FLAG, action="store_true", help=SKIP_HELP)
    return parser


def warn_about(model, path: Path) -> None:
    """One line on stderr for a demo model, whose scores mean nothing."""
    if model.info.demo:
        print(f"warning: {path} is a {DEMO_NOTE}", file=sys.stderr)


def load_checked(args: argparse.Namespace):
    """The Analyzer of `analyze`: loaded, demo warning printed, self-check run (a failed one refuses the model)."""
    from runtime.analyze import Analyzer

    analyzer = Analyzer.from_path(args.model, device=args.device, threads=args.threads,
                                  batch_size=args.batch_size, cap_seconds=args.cap_seconds,
                                  refuse_over_seconds=args.refuse_over, tf32=args.tf32)
    warn_about(analyzer.model, args.model)
    require_passed(analyzer.model.run_self_check(), allow_failed=args.skip_self_check)
    return analyzer


def analyze_files(analyzer, files: list[Path], progress: bool) -> list[dict]:
    """Analyze each file; a failure becomes that file's `error` and the others still run."""
    results = []
    track = _progress(files, progress)
    for path in track:
        try:
            res = analyzer.analyze_file(path)
            results.append({"file": str(path), **res.to_dict(), "error": None})
        except (AudioError, InputError, ModelOutputError) as exc:
            results.append({"file": str(path), "duration_seconds": None, "scores": None, "timeline": None,
                            "error": str(exc)})
    return results


def _progress(items: list, enabled: bool):
    if not enabled:
        return items
    try:
        from rich.progress import track
    except ImportError:
        return items
    return track(items, description="analyzing", console=_stderr_console(), transient=True)


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True)


def print_tables(results: list[dict]) -> None:
    """One readable block per file: the 19 scores, 3 decimals, as the original app showed them."""
    for res in results:
        if res["error"]:
            print(f"{res['file']}: ERROR {res['error']}")
            continue
        print(f"{res['file']}  ({res['duration_seconds']:.1f} s, {len(res['timeline'])} chunks)")
        for key in API_KEYS:
            score = res["scores"][key]
            print(f"  {key:42s} {score:6.3f}  {'#' * round(score * 20)}")


def cmd_corpus(args: argparse.Namespace) -> int:
    """`analyze DIR ... --out REPORT_DIR`: the corpus run of runtime.corpus.runner."""
    from runtime.corpus.runner import analyze_corpus

    if args.modal:
        raise ConfigError("--modal moved to the deploy package: python -m deploy analyze DIR --out REPORT_DIR")
    if args.out is None or args.json:
        raise ConfigError("--recursive and --url need --out REPORT_DIR (and --out does not take --json)")
    try:
        if args.url:
            return _print_summary(remote_corpus(args))
        analyzer = load_checked(args)  # demo warning and self-check, as for single files
        summary = analyze_corpus(args.files, args.out, model=args.model, recursive=args.recursive,
                                 cap_seconds=args.cap_seconds, batch_size=args.batch_size,
                                 device=args.device, threads=args.threads, progress=sys.stderr.isatty(),
                                 analyzer=analyzer, across_files=False if args.per_file else None)
    except KeyboardInterrupt:
        print(f"interrupted: finished files are in {args.out}/journal.jsonl; run again to resume", file=sys.stderr)
        return 130
    return _print_summary(summary)


def _print_summary(summary) -> int:
    from runtime.corpus.runner import summary_lines

    print("\n".join(summary_lines(summary)))
    return 1 if summary.failed else 0


def remote_corpus(args: argparse.Namespace):
    """`analyze DIR --out REPORT --url URL[,URL...]`: the corpus run through a deployed service."""
    import os

    from runtime.client import Client
    from runtime.corpus.remote import http_results
    from runtime.corpus.runner import find_audio, run_corpus

    client = Client(args.url, token=args.token or os.environ.get("PERCEPIANO_API_TOKEN") or None,
                    timeout=args.timeout)
    files = find_audio(args.files, recursive=args.recursive)
    return run_corpus(files, args.out, http_results(client, args.cap_seconds), model=None,
                      cap_seconds=args.cap_seconds, progress=sys.stderr.isatty())


def cmd_analyze(args: argparse.Namespace) -> int:
    if args.out is not None or args.recursive or args.modal or args.url:
        return cmd_corpus(args)
    analyzer = load_checked(args)
    results = analyze_files(analyzer, args.files, progress=len(args.files) > 1 and sys.stderr.isatty())
    if args.json:
        model = {**analyzer.model.info.summary(), "device": analyzer.model.device,
                 "self_check": analyzer.model.self_check.to_dict(), "demo": analyzer.model.info.demo}
        print(json.dumps({"model": model, "results": results}, indent=2))
    else:
        print_tables(results)
    failed = sum(1 for r in results if r["error"])
    if failed:
        print(f"{failed} of {len(results)} file(s) failed", file=sys.stderr)
    return 1 if failed else 0


class Planned:
    """What `info` says about a model it does not open a session for: metadata and the providers it would get."""

    def __init__(self, path: Path, device: str, tf32: bool):
        import onnxruntime

        from runtime.model import header_metadata, parse_metadata, provider_plan

        if not path.is_file():
            raise ModelError(f"model file not found: {path}")
        try:
            props = header_metadata(str(path))
        except (OSError, ValueError) as exc:
            raise ModelError(f"{path}: not a readable ONNX model ({exc})") from None
        self.info = parse_metadata(props, str(path))
        self.plan = provider_plan(device, self.info.precision, tf32, onnxruntime.get_available_providers())
        self.providers = [p[0] if isinstance(p, tuple) else p for p in self.plan]


def cmd_info(args: argparse.Namespace) -> int:
    import onnxruntime

    from runtime.cuda import describe_plan
    from runtime.model import OnnxModel, provider_plan

    if args.device == "cpu":
        model = OnnxModel(args.model, device="cpu")
        plan, opened = provider_plan("cpu"), True
    else:  # no session: the plan is what one would get (also on a machine without a GPU)
        model = Planned(args.model, args.device, args.tf32)
        plan, opened = model.plan, False
    info = model.info
    warn_about(model, args.model)
    if args.json:
        session = {"demo": info.demo, "providers": model.providers, "onnxruntime": onnxruntime.__version__,
                   "device": args.device, "session_opened": opened, "provider_options": describe_plan(plan)}
        print(json.dumps({**info.raw, "runtime": session}, indent=2))
        return 0
    parity = info.parity or {}
    print(f"model       {args.model} ({args.model.stat().st_size / 1e6:.1f} MB)")
    print(f"version     {info.version}")
    print(f"precision   {info.precision}")
    print(f"source      {info.source.get('filename')} sha256 {info.sha256}")
    print(f"config      {info.model_config}")
    print(f"parity      {'passed' if parity.get('passed') else 'not recorded'}; max abs {parity.get('max_abs')}; "
          f"tolerance {parity.get('tolerance')}")
    if info.variants:
        v = info.variants
        gates = ", ".join(f"{p} {'passed' if g['passed'] else 'FAILED'} (max abs {g['max_abs']:.1e})"
                          for p, g in v.get("gates", {}).items())
        print(f"variants    files {v.get('files')}; recommended {v.get('recommended', '-')}; gates: {gates}")
    print(f"versions    {info.versions}")
    print(f"session     {describe_plan(plan)} (onnxruntime {onnxruntime.__version__}"
          f"{'' if opened else '; planned, not opened'})")
    check = info.raw.get("self_check") or {}
    stored = f"{len(check.get('scores', []))} stored windows, atol {check.get('atol')}" if check else "absent"
    print(f"self-check  {stored} (run at load by analyze and serve)")
    print(f"dimensions  {len(info.dimensions)}: " + ", ".join(info.api_keys))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from runtime.analyze import Analyzer
    from runtime.serve.app import Settings, serve, warm_up

    settings = Settings.from_env(**({"request_log": False} if args.quiet else {}))
    analyzer = Analyzer.from_path(args.model, device=args.device, threads=args.threads,
                                  refuse_over_seconds=settings.refuse_over_seconds,
                                  tf32=args.tf32 or settings.cuda_tf32)
    warm_up(analyzer, allow_failed_self_check=args.skip_self_check or settings.allow_failed_self_check)
    serve(analyzer, host=args.host, port=args.port, settings=settings, model_file=args.model)
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The parsed command line, the deprecated spellings folded into their current names."""
    args = build_parser().parse_args(argv)
    if getattr(args, "deprecated_max_seconds", None) is not None:
        if args.cap_seconds is not None:
            raise ConfigError("--max-seconds is the deprecated name of --cap-seconds: give only --cap-seconds")
        print("warning: --max-seconds is deprecated, use --cap-seconds (the same cap)", file=sys.stderr)
        args.cap_seconds = args.deprecated_max_seconds
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    commands = {"analyze": cmd_analyze, "info": cmd_info, "serve": cmd_serve}
    try:
        return commands[args.command](args)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

